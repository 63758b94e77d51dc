//! A training step's device slots ([`StepSlots`]): the one way its host inputs (batch draws,
//! labels, learning rate) reach the kernels, op by op or replayed; and the step captured as a
//! CUDA graph and replayed.

use super::*;

/// The host inputs of one training step on resident data: what a replayed step cannot read
/// from the host itself.
pub struct StepInputs<'a> {
    /// Record indices of the batch.
    pub indices: &'a [usize],
    /// Crop offsets (dy, dx) and flip of each image.
    pub views: &'a [(i32, i32, bool)],
    pub labels: &'a [u32],
    pub lr: f32,
}

impl Gpu {
    /// Runs `f` on the step slots, first grown to hold `n` images. Growing allocates, which a
    /// capture cannot: a captured step's inputs are staged before the capture starts.
    pub(super) fn with_slots<R>(
        &self, n: usize, f: impl FnOnce(&mut StepSlots) -> anyhow::Result<R>,
    ) -> anyhow::Result<R> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.as_ref().is_none_or(|s| s.capacity < n) {
            let old = slots.take();
            let grown = self.new_slots(n.max(1), old.as_ref())?;
            *slots = Some(grown);
        }
        f(slots.as_mut().expect("allocated above"))
    }

    /// Slots for `capacity` images, carrying over the metric sums of `old`.
    fn new_slots(&self, capacity: usize, old: Option<&StepSlots>) -> anyhow::Result<StepSlots> {
        let z = |bytes: usize| {
            self.zeroed(bytes)
                .map_err(|e| anyhow::anyhow!("allocating a training step's inputs: {e:#}"))
        };
        let slots = StepSlots {
            capacity,
            generation: old.map_or(0, |o| o.generation + 1),
            draws: z(4 * 4 * capacity)?,
            labels: z(4 * capacity)?,
            lr: z(4)?,
            loss: z(4)?,
            correct: z(4)?,
            sums: z(16)?,
            staged_labels: Vec::new(),
            staged_lr: None,
        };
        if let Some(old) = old {
            self.dev
                .dtod(self.current_stream(), slots.sums.ptr(), old.sums.ptr(), 16)
                .map_err(|e| anyhow::anyhow!("keeping the step metrics: {e:#}"))?;
        }
        Ok(slots)
    }

    /// The device address of the labels, copied there unless they are there already.
    pub(super) fn stage_labels(&self, labels: &[u32]) -> anyhow::Result<u64> {
        self.with_slots(labels.len(), |s| {
            if s.staged_labels != labels {
                let bytes: Vec<u8> = labels.iter().flat_map(|&l| l.to_le_bytes()).collect();
                s.staged_labels.clear();
                self.dev.htod(self.current_stream(), s.labels.ptr(), &bytes)?;
                s.staged_labels.extend_from_slice(labels);
            }
            Ok(s.labels.ptr())
        })
    }

    /// The device address of the learning rate, copied there unless it is there already.
    pub(super) fn stage_lr(&self, lr: f32) -> anyhow::Result<u64> {
        self.with_slots(0, |s| {
            if s.staged_lr != Some(lr) {
                s.staged_lr = None;
                self.dev.htod(self.current_stream(), s.lr.ptr(), &lr.to_le_bytes())?;
                s.staged_lr = Some(lr);
            }
            Ok(s.lr.ptr())
        })
    }

    /// The device address of the batch's draws (four runs of `indices.len()` ints: indices,
    /// dy, dx, flip), copied there.
    pub(super) fn stage_draws(
        &self, indices: &[usize], views: &[(i32, i32, bool)],
    ) -> anyhow::Result<u64> {
        let b = indices.len();
        if views.len() != b {
            anyhow::bail!("{b} images but {} crop/flip draws", views.len());
        }
        let mut draws = Vec::with_capacity(4 * b);
        draws.extend(indices.iter().map(|&i| i as i32));
        draws.extend(views.iter().map(|v| v.0));
        draws.extend(views.iter().map(|v| v.1));
        draws.extend(views.iter().map(|v| v.2 as i32));
        let bytes: Vec<u8> = draws.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.with_slots(b, |s| {
            self.dev.htod(self.current_stream(), s.draws.ptr(), &bytes)?;
            Ok(s.draws.ptr())
        })
    }

    /// Copies a step's host inputs into the step slots: before a capture (so the recorded
    /// step finds them there and copies nothing) and before each replay.
    pub fn stage_step(&self, step: &StepInputs) -> anyhow::Result<()> {
        let staged = self
            .stage_draws(step.indices, step.views)
            .and_then(|_| self.stage_labels(step.labels))
            .and_then(|_| self.stage_lr(step.lr));
        staged.map(|_| ()).map_err(|e| anyhow::anyhow!("staging a training step: {e:#}"))
    }

    /// Starts recording a training step as a CUDA graph; its inputs must have been staged
    /// ([`Gpu::stage_step`]). Until [`Gpu::capture_end`] nothing executes: ops are recorded,
    /// may not read anything back, and the batch comes from [`Gpu::augment_staged`]. Every
    /// shape must have run once before (cuDNN's algorithm search and the buffers of that batch
    /// size exist), and no memory allocated before may be freed inside (the caller keeps the
    /// network's buffers).
    pub fn capture_begin(&self) -> anyhow::Result<()> {
        // Memory dropped before the capture is freed now, outside it.
        self.settle();
        self.synchronize()?;
        self.current.store(0, Ordering::Relaxed);
        self.dev
            .capture_begin(self.stream())
            .map_err(|e| anyhow::anyhow!("cannot start a CUDA graph capture: {e:#}"))?;
        // Every branch stream joins the capture now, so that capture_end can rejoin them all
        // (waiting on a stream that never joined would break the capture).
        let main = &self.lanes[0];
        let joined = self.dev.event_record(main.event, main.stream).and_then(|()| {
            self.lanes[1..]
                .iter()
                .try_for_each(|lane| self.dev.stream_wait(lane.stream, main.event))
        });
        if let Err(e) = joined {
            self.record("ordering CUDA streams in a capture", e);
        }
        Ok(())
    }

    /// Ends the recording of a step of `batch` images (also after a failure inside it, so the
    /// stream is usable again) and instantiates the graph.
    pub fn capture_end(&self, batch: usize) -> anyhow::Result<StepGraph> {
        // Temporaries dropped inside the step are freed inside the graph, and every branch
        // stream rejoins the main one: a capture must end where it began.
        self.settle();
        let main = &self.lanes[0];
        for lane in &self.lanes[1..] {
            if let Err(e) = self.dev.event_record(lane.event, lane.stream) {
                self.record("recording a CUDA event", e);
            } else if let Err(e) = self.dev.stream_wait(main.stream, lane.event) {
                self.record("ordering CUDA streams", e);
            }
        }
        let graph = self.dev.capture_end(main.stream);
        self.take_error()?;
        let graph = graph.map_err(|e| {
            anyhow::anyhow!("cannot build the CUDA graph of a training step: {e:#}")
        })?;
        let generation = self.with_slots(0, |s| Ok(s.generation))?;
        Ok(StepGraph { dev: self.dev.clone(), graph, batch, generation })
    }

    /// Runs the captured step once on `step`'s inputs: they are staged, then the graph runs.
    pub fn replay(&self, g: &StepGraph, step: &StepInputs) -> anyhow::Result<()> {
        // A failure recorded outside the graph is reported before the graph runs again.
        self.take_error()?;
        if step.indices.len() != g.batch || step.labels.len() != g.batch {
            anyhow::bail!(
                "a CUDA graph of {} images replayed on {} images",
                g.batch,
                step.indices.len()
            );
        }
        self.stage_step(step)?;
        if self.with_slots(0, |s| Ok(s.generation))? != g.generation {
            anyhow::bail!("a CUDA graph replayed after its step's device memory was reallocated");
        }
        self.dev
            .graph_launch(g.graph, self.stream())
            .map_err(|e| anyhow::anyhow!("replaying the CUDA graph of a training step: {e:#}"))
    }
}
