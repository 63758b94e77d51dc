//! A training step captured as a CUDA graph and replayed.

use super::*;

impl Gpu {
    pub(super) fn capturing(&self) -> bool {
        self.capturing.load(Ordering::Acquire)
    }

    /// Starts recording a training step of `batch` images as a CUDA graph. Until
    /// [`Gpu::capture_end`] nothing executes: ops are recorded, may not read anything back, and
    /// the batch comes from [`Gpu::augment_staged`]. Every shape must have run once before
    /// (cuDNN's algorithm search and the buffers of that batch size exist), and no memory
    /// allocated before may be freed inside (the caller keeps the network's buffers).
    pub fn capture_begin(&self, batch: usize) -> anyhow::Result<()> {
        {
            let mut step = self.step.lock().unwrap_or_else(|p| p.into_inner());
            if step.as_ref().is_none_or(|st| st.batch != batch) {
                self.current.store(0, Ordering::Relaxed);
                let z = |bytes: usize| {
                    self.zeroed(bytes).map_err(|e| {
                        anyhow::anyhow!("allocating the CUDA graph's step state: {e:#}")
                    })
                };
                *step = Some(StepState {
                    batch,
                    params: z(4 * 4 * batch)?,
                    labels: z(4 * batch)?,
                    loss: z(4)?,
                    correct: z(4)?,
                    sums: z(16)?,
                    lr: z(4)?,
                });
            }
        }
        // Memory dropped before the capture is freed now, outside it.
        self.settle();
        self.synchronize()?;
        self.current.store(0, Ordering::Relaxed);
        self.dev
            .capture_begin(self.stream())
            .map_err(|e| anyhow::anyhow!("cannot start a CUDA graph capture: {e:#}"))?;
        self.capturing.store(true, Ordering::Release);
        // Every branch stream joins the capture now, so that capture_end can rejoin them all
        // (waiting on a stream that never joined would break the capture).
        let main = &self.lanes[0];
        let joined = self
            .dev
            .event_record(main.event, main.stream)
            .and_then(|()| {
                self.lanes[1..]
                    .iter()
                    .try_for_each(|lane| self.dev.stream_wait(lane.stream, main.event))
            });
        if let Err(e) = joined {
            self.record("ordering CUDA streams in a capture", e);
        }
        Ok(())
    }

    /// Ends the recording (also after a failure inside it, so the stream is usable again) and
    /// instantiates the graph.
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
        self.capturing.store(false, Ordering::Release);
        let graph = self.dev.capture_end(main.stream);
        self.take_error()?;
        let graph = graph.map_err(|e| {
            anyhow::anyhow!("cannot build the CUDA graph of a training step: {e:#}")
        })?;
        Ok(StepGraph {
            dev: self.dev.clone(),
            graph,
            batch,
        })
    }

    /// Runs the captured step once on the batch `indices` with crop/flip draws `views`, at
    /// learning rate `lr`: two small copies into the step's buffers, then the graph.
    pub fn replay(
        &self,
        g: &StepGraph,
        indices: &[usize],
        views: &[(i32, i32, bool)],
        lr: f32,
    ) -> anyhow::Result<()> {
        // A failure recorded outside the graph is reported before the graph runs again.
        self.take_error()?;
        if indices.len() != g.batch || views.len() != g.batch {
            anyhow::bail!(
                "a CUDA graph of {} images replayed on {} images",
                g.batch,
                indices.len()
            );
        }
        let mut step = self.step.lock().unwrap_or_else(|p| p.into_inner());
        let st = step
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("a CUDA graph without its step state"))?;
        let mut params = Vec::with_capacity(4 * g.batch);
        params.extend(indices.iter().map(|&i| i as i32));
        params.extend(views.iter().map(|v| v.0));
        params.extend(views.iter().map(|v| v.1));
        params.extend(views.iter().map(|v| v.2 as i32));
        let s = self.stream();
        let err = |e| anyhow::anyhow!("staging a training step: {e:#}");
        let bytes: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.dev.htod(s, st.params.ptr(), &bytes).map_err(err)?;
        self.dev
            .htod(s, st.lr.ptr(), &lr.to_le_bytes())
            .map_err(err)?;
        self.dev
            .graph_launch(g.graph, s)
            .map_err(|e| anyhow::anyhow!("replaying the CUDA graph of a training step: {e:#}"))
    }
}
