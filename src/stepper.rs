//! How the training loop runs a step: where the batch is built ([`Feed`]: on the host, or on
//! the GPU from the resident training set) and how the step is issued ([`Stepper`]: op by op,
//! or replayed as one CUDA graph, or data-parallel over several processes).

use crate::backend::{Backend, Sgd};
use crate::data::{self, Augment, Cifar10};
use crate::dist::ddp::{average_gradients, rank_slice};
use crate::dist::Collective;
use crate::model::net::Net;
use anyhow::Result;
use std::sync::atomic::{AtomicBool, Ordering};

/// Where the training batches are built.
pub trait Feed<B: Backend<f32>> {
    /// The images `idx` (positions `first_pos..` of epoch `epoch`'s order), augmented, as an
    /// input on the backend; their labels go to `labels`.
    fn batch(
        &mut self, be: &B, idx: &[usize], epoch: u64, first_pos: u64, labels: &mut Vec<u32>,
    ) -> B::Buf;
}

/// [`data::make_batch`] on the CPU, then a copy to the backend.
pub struct HostFeed<'a> {
    set: &'a Cifar10,
    aug: Augment,
    seed: u64,
    x: Vec<f32>,
}

impl<'a> HostFeed<'a> {
    pub fn new(set: &'a Cifar10, aug: Augment, seed: u64) -> Self {
        HostFeed { set, aug, seed, x: Vec::new() }
    }
}

impl<B: Backend<f32>> Feed<B> for HostFeed<'_> {
    fn batch(
        &mut self, be: &B, idx: &[usize], epoch: u64, first_pos: u64, labels: &mut Vec<u32>,
    ) -> B::Buf {
        data::make_batch(self.set, idx, self.aug, self.seed, epoch, first_pos, &mut self.x, labels);
        be.upload_act(&self.x)
    }
}

/// The rows of `logits` ([N, k]) whose first maximum is the label.
fn correct(logits: &[f32], labels: &[u32], k: usize) -> u64 {
    logits
        .chunks(k)
        .zip(labels)
        .filter(|(row, &l)| {
            let best = (0..row.len()).fold(0, |b, j| if row[j] > row[b] { j } else { b });
            best == l as usize
        })
        .count() as u64
}

/// Runs training steps.
pub trait Stepper<B: Backend<f32>> {
    /// One step on the images `idx` (positions `first_pos..` of epoch `epoch`'s order) with
    /// `opt`. Returns the mean loss and the number of images classified right when they are
    /// known on the host now, `None` when they stay on the device until [`Stepper::drain`].
    /// A loss that is not finite is returned before the backward, and no weight moves.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self, net: &mut Net<f32, B>, idx: &[usize], epoch: u64, first_pos: u64, opt: &Sgd,
        smoothing: f64,
    ) -> Result<Option<(f64, u64)>>;
    /// Σ loss·n and Σ correct of the steps that returned `None` since the last call.
    fn drain(&mut self, _net: &Net<f32, B>) -> Result<(f64, u64)> {
        Ok((0.0, 0))
    }
    /// Whether an epoch's last partial batch is left out (PyTorch's `drop_last`).
    fn drop_last(&self) -> bool {
        false
    }
    /// The epoch's training steps are over: what follows (evaluation) changes the buffers.
    fn end_epoch(&mut self) {}
    /// The data-parallel group this stepper trains with (`None`: a process training alone).
    fn group(&mut self) -> Option<&mut dyn Collective> {
        None
    }
    /// Whether the ranks agreed in the last step to stop (a stop request on any of them);
    /// `None` alone, where the stop request itself decides.
    fn agreed_stop(&self) -> Option<bool> {
        None
    }
}

/// Data-parallel steps: each step's `idx` is the global batch, of which this rank trains its
/// slice; the gradients are averaged over the ranks before the optimizer step, in the same
/// all-reduce as the step's loss, correct count and stop request.
pub struct DataParallelStepper<F> {
    pub feed: F,
    labels: Vec<u32>,
    group: Box<dyn Collective>,
    /// This process's stop request (Ctrl-C, SIGTERM), sent to the others with every step.
    stop: &'static AtomicBool,
    agreed_stop: bool,
    /// This epoch: steps, their time, and the part spent averaging (the gradient all-reduce
    /// with the metrics, including the wait for the slowest rank).
    timing: (u64, std::time::Duration, std::time::Duration),
}

impl<F> DataParallelStepper<F> {
    pub fn new(feed: F, group: Box<dyn Collective>, stop: &'static AtomicBool) -> Self {
        let timing = Default::default();
        DataParallelStepper { feed, labels: Vec::new(), group, stop, agreed_stop: false, timing }
    }
}

impl<B: Backend<f32>, F: Feed<B>> Stepper<B> for DataParallelStepper<F> {
    fn step(
        &mut self, net: &mut Net<f32, B>, idx: &[usize], epoch: u64, first_pos: u64, opt: &Sgd,
        smoothing: f64,
    ) -> Result<Option<(f64, u64)>> {
        let started = std::time::Instant::now();
        let (rank, world) = (self.group.rank(), self.group.world());
        let mine = rank_slice(idx, rank, world)?;
        // The positions of this rank's images in the epoch's order: the same augmentation as
        // one process training the whole batch.
        let first_pos = first_pos + (rank * mine.len()) as u64;
        let input = self.feed.batch(net.backend(), mine, epoch, first_pos, &mut self.labels);
        net.zero_grad();
        let logits = net.forward_buf(input, mine.len(), true)?;
        // Every rank takes part in the all-reduce whatever its loss: one that is not finite
        // makes the summed loss so on every rank, and none steps.
        let loss = net.loss(&self.labels, smoothing)?;
        net.backward()?;
        let n = self.labels.len() as f32;
        let right = correct(&logits, &self.labels, net.spec.classes) as f32;
        let stop = if self.stop.load(Ordering::SeqCst) { 1.0 } else { 0.0 };
        let mut metrics = [loss as f32 * n, right, n, stop];
        let averaging = std::time::Instant::now();
        average_gradients(net, self.group.as_mut(), &mut metrics)?;
        self.timing.2 += averaging.elapsed();
        self.agreed_stop = metrics[3] > 0.0;
        let [loss_sum, right, n, _] = metrics;
        let loss = (loss_sum / n) as f64;
        if loss.is_finite() {
            net.sgd_step(opt);
        }
        self.timing.0 += 1;
        self.timing.1 += started.elapsed();
        Ok(Some((loss, right as u64)))
    }
    /// Every rank runs the same number of steps.
    fn drop_last(&self) -> bool {
        true
    }
    /// Logs where this rank's step time went (the global img/s is the epoch line's).
    fn end_epoch(&mut self) {
        let (steps, total, averaging) = std::mem::take(&mut self.timing);
        if steps > 0 {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3 / steps as f64;
            tracing::info!(
                rank = self.group.rank(),
                step_ms = ms(total),
                all_reduce_ms = ms(averaging),
                all_reduce_share = averaging.as_secs_f64() / total.as_secs_f64().max(1e-12),
                "data-parallel step time (all-reduce: gradients and metrics, with the wait for the slowest rank)"
            );
        }
    }
    fn group(&mut self) -> Option<&mut dyn Collective> {
        Some(self.group.as_mut())
    }
    fn agreed_stop(&self) -> Option<bool> {
        Some(self.agreed_stop)
    }
}

/// Every step issued op by op from the host, the loss read back each step.
pub struct EagerStepper<F> {
    pub feed: F,
    labels: Vec<u32>,
}

impl<F> EagerStepper<F> {
    pub fn new(feed: F) -> Self {
        EagerStepper { feed, labels: Vec::new() }
    }
}

/// One eager step: build the batch, forward, loss, backward, SGD.
fn eager_step<B: Backend<f32>, F: Feed<B>>(
    feed: &mut F, labels: &mut Vec<u32>, net: &mut Net<f32, B>,
    (idx, epoch, first_pos): (&[usize], u64, u64), opt: &Sgd, smoothing: f64,
) -> Result<Option<(f64, u64)>> {
    let input = feed.batch(net.backend(), idx, epoch, first_pos, labels);
    net.zero_grad();
    let logits = net.forward_buf(input, idx.len(), true)?;
    let loss = net.loss(labels, smoothing)?;
    if !loss.is_finite() {
        return Ok(Some((loss, 0)));
    }
    net.backward()?;
    net.sgd_step(opt);
    Ok(Some((loss, correct(&logits, labels, net.spec.classes))))
}

impl<B: Backend<f32>, F: Feed<B>> Stepper<B> for EagerStepper<F> {
    fn step(
        &mut self, net: &mut Net<f32, B>, idx: &[usize], epoch: u64, first_pos: u64, opt: &Sgd,
        smoothing: f64,
    ) -> Result<Option<(f64, u64)>> {
        eager_step(&mut self.feed, &mut self.labels, net, (idx, epoch, first_pos), opt, smoothing)
    }
}

pub use gpu::{DeviceFeed, GraphStepper};

mod gpu {
    use super::*;
    use crate::backend::cuda::{DeviceRecords, Gpu, GpuBuf, StepGraph, StepInputs};

    /// The training set resident on the GPU: each step sends only the indices, the crop/flip
    /// draws (the same draws as [`data::make_batch`]) and the labels, and `cuda/data.cu`
    /// renders the batch.
    pub struct DeviceFeed<'a> {
        set: &'a Cifar10,
        records: DeviceRecords,
        aug: Augment,
        seed: u64,
    }

    impl<'a> DeviceFeed<'a> {
        /// Copies `set` to the GPU of `gpu`.
        pub fn new(gpu: &Gpu, set: &'a Cifar10, aug: Augment, seed: u64) -> Result<Self> {
            Ok(DeviceFeed { set, records: gpu.upload_records(set)?, aug, seed })
        }

        fn labels(&self, idx: &[usize], labels: &mut Vec<u32>) {
            labels.clear();
            labels.extend(idx.iter().map(|&i| u32::from(self.set.label(i))));
        }

        fn views(&self, n: usize, epoch: u64, first_pos: u64) -> Vec<(i32, i32, bool)> {
            (0..n as u64)
                .map(|j| data::augment_view(self.aug, self.seed, epoch, first_pos + j))
                .collect()
        }
    }

    impl Feed<Gpu> for DeviceFeed<'_> {
        fn batch(
            &mut self, be: &Gpu, idx: &[usize], epoch: u64, first_pos: u64, labels: &mut Vec<u32>,
        ) -> GpuBuf {
            self.labels(idx, labels);
            let views = self.views(idx.len(), epoch, first_pos);
            be.augment_batch(&self.records, idx, &views)
        }
    }

    /// The whole step (data kernel, forward, loss, backward, optimizer with its on-device
    /// overflow skip, metrics) captured once per epoch as a CUDA graph and replayed: per step
    /// the host only copies the batch's indices, crop/flip draws, labels and the learning rate.
    ///
    /// Each epoch's first step runs op by op (so every shape of that batch size has its
    /// buffers and cuDNN algorithms, which a capture cannot create), the second is captured,
    /// and the rest replay it. Evaluation between epochs reallocates the buffers the graph
    /// points into, so the graph is dropped at the end of each epoch. Partial batches are left
    /// out: the graph has one batch size.
    ///
    /// Capturing is an optimisation, never a requirement: if a capture fails (a call the
    /// driver will not capture, an allocation it refuses, a driver without graph support),
    /// the step counters it advanced are put back, a warning says why, and this step and all
    /// later ones run op by op, with the same numerics.
    pub struct GraphStepper<'a> {
        feed: DeviceFeed<'a>,
        labels: Vec<u32>,
        graph: Option<StepGraph>,
        /// The batch size of this epoch's eager step, once it has run.
        warm: Option<usize>,
        /// Set once a capture has failed: every later step runs eagerly.
        eager_only: bool,
    }

    impl<'a> GraphStepper<'a> {
        pub fn new(feed: DeviceFeed<'a>) -> Self {
            GraphStepper { feed, labels: Vec::new(), graph: None, warm: None, eager_only: false }
        }

        fn eager(
            &mut self, net: &mut Net<f32, Gpu>, step: (&[usize], u64, u64), opt: &Sgd,
            smoothing: f64,
        ) -> Result<Option<(f64, u64)>> {
            eager_step(&mut self.feed, &mut self.labels, net, step, opt, smoothing)
        }

        /// The crop/flip draws of the images `idx`; their labels go to `self.labels`.
        fn prepare(&mut self, idx: &[usize], epoch: u64, first_pos: u64) -> Vec<(i32, i32, bool)> {
            self.feed.labels(idx, &mut self.labels);
            self.feed.views(idx.len(), epoch, first_pos)
        }

        /// Records one step, its inputs staged first; nothing runs until the graph is
        /// replayed.
        fn capture(
            &mut self, net: &mut Net<f32, Gpu>, (idx, epoch, first_pos): (&[usize], u64, u64),
            opt: &Sgd, smoothing: f64,
        ) -> Result<StepGraph> {
            let b = idx.len();
            let views = self.prepare(idx, epoch, first_pos);
            net.backend().stage_step(&StepInputs {
                indices: idx,
                views: &views,
                labels: &self.labels,
                lr: opt.lr as f32,
            })?;
            net.backend().capture_begin()?;
            let records = &self.feed.records;
            let labels = &self.labels;
            let recorded = (|| -> Result<()> {
                net.with_input(|gpu, input| gpu.augment_staged(records, input));
                net.zero_grad();
                net.forward_loaded(true)?;
                net.loss_summed(labels, smoothing)?;
                net.backward()?;
                net.sgd_step(opt);
                // Fault injection for the GPU tests: the whole step is recorded, then refused
                // as a driver would refuse it, which exercises the fallback end to end.
                if std::env::var_os("INCEPT_REFUSE_CUDA_GRAPH").is_some() {
                    anyhow::bail!("refused: INCEPT_REFUSE_CUDA_GRAPH is set");
                }
                Ok(())
            })();
            // Always end the capture, so a failure leaves the stream usable.
            let graph = net.backend().capture_end(b);
            recorded?;
            graph
        }
    }

    impl Stepper<Gpu> for GraphStepper<'_> {
        fn step(
            &mut self, net: &mut Net<f32, Gpu>, idx: &[usize], epoch: u64, first_pos: u64,
            opt: &Sgd, smoothing: f64,
        ) -> Result<Option<(f64, u64)>> {
            let b = idx.len();
            if self.graph.as_ref().is_some_and(|g| g.batch() != b) {
                self.graph = None;
            }
            if self.graph.is_none() {
                if self.eager_only || self.warm != Some(b) {
                    self.warm = Some(b);
                    return self.eager(net, (idx, epoch, first_pos), opt, smoothing);
                }
                let counters = net.step_counters();
                match self.capture(net, (idx, epoch, first_pos), opt, smoothing) {
                    // The capture advanced the host's step counters once; its replay below is
                    // that step.
                    Ok(graph) => self.graph = Some(graph),
                    Err(e) => {
                        // Nothing recorded ran: undo the counting, clear what the capture
                        // left behind, and take this step op by op.
                        net.set_step_counters(&counters);
                        net.backend().recover_from_capture()?;
                        tracing::warn!(
                            "CUDA graph capture failed ({e:#}); continuing without CUDA graphs (same results, more launch overhead; --no-cuda-graph skips the attempt)"
                        );
                        self.eager_only = true;
                        return self.eager(net, (idx, epoch, first_pos), opt, smoothing);
                    }
                }
            } else {
                net.count_replayed_step();
            }
            let views = self.prepare(idx, epoch, first_pos);
            let step =
                StepInputs { indices: idx, views: &views, labels: &self.labels, lr: opt.lr as f32 };
            let graph = self.graph.as_ref().expect("captured above");
            net.backend().replay(graph, &step)?;
            Ok(None)
        }

        fn drain(&mut self, net: &Net<f32, Gpu>) -> Result<(f64, u64)> {
            net.backend().take_step_sums()
        }

        fn drop_last(&self) -> bool {
            true
        }

        fn end_epoch(&mut self) {
            self.graph = None;
            self.warm = None;
        }
    }
}
