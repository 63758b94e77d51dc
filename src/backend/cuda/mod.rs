//! The CUDA backend: cuDNN convolutions and pooling, cuBLAS for the linear head, and the
//! kernels of `cuda/` (BatchNorm, concat, loss, optimizer, ReLU, conversions), driven through
//! the device seam ([`device::Device`]): on a real GPU (`--device cuda`, feature `cudnn`) or on
//! the emulated one (`--device emu`, every build), which runs the same backend code on the CPU
//! with a race and memory checker.
//!
//! It implements the same [`Backend`] trait as the CPU reference, so the same
//! [`crate::model::net::Net`] trains on it and every op is compared with the CPU at the
//! model's shapes. Two precisions:
//! - fp32 everywhere (`--no-amp`), no TF32: the path that matches the CPU reference tightly;
//! - mixed precision (`--amp`, the default on CUDA): activations and their gradients in fp16
//!   (or bf16), convolutions on tensor cores with fp32 accumulation; fp32 master weights (each
//!   convolution weight keeps a 16-bit copy, refreshed after every optimizer step), fp32
//!   BatchNorm statistics, fp32 logits and loss; dynamic loss scaling on the device
//!   (torch.amp.GradScaler's rule), an overflowed step skipped on the device.
//!
//! Work goes to a main stream and, with `--streams N > 1`, the Inception branches to streams
//! of their own, ordered by events at each fork and join (see `Lane`, `branches_begin`). A
//! whole training step can be captured as a CUDA graph (`capture_begin` … `replay`). Ops cannot
//! return errors through the trait: the first failure (a launch, an allocation) is recorded
//! and reported by [`Buffers::status`](crate::backend::Buffers::status), which the network checks after each forward and
//! backward.
//!
//! [`Backend`]: crate::backend::Backend

pub mod comm;
pub mod device;
mod dnn;
#[cfg(feature = "cudnn")]
mod driver;
pub mod emu;
#[cfg(feature = "cudnn")]
pub mod libs;
#[cfg(feature = "cudnn")]
mod nvtx;
mod ops;
#[cfg(feature = "cudnn")]
mod real;

pub use device::DType;
#[cfg(feature = "cudnn")]
pub use driver::{info, missing_kernels, probe};
pub use ops::{DeviceRecords, StepInputs};

use anyhow::{bail, Context, Result};
use device::{Device, Event, Graph, Stream};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};

/// How a [`Gpu`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuOptions {
    /// Element type of activations and their gradients: `F32` is the fp32 path, `F16`/`Bf16`
    /// mixed precision with fp32 master weights and loss scaling.
    pub activations: DType,
    /// Only convolution algorithms cuDNN reports as deterministic, chosen by cuDNN's
    /// heuristics rather than by timing, so that every run makes the same choices.
    pub deterministic: bool,
    /// Streams for the Inception branches: 1 runs everything in order on the main stream;
    /// N > 1 gives the branches N streams of their own beside the main one (branch `i` on
    /// branch stream `i mod N`).
    pub streams: usize,
    /// For the checker's own tests: the n-th event wait of the branch scheduler (counting
    /// from 0 over the backend's life) is left out, which must show as a race.
    #[doc(hidden)]
    pub skip_wait: Option<usize>,
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions { activations: DType::F32, deterministic: false, streams: 1, skip_wait: None }
    }
}

/// Device memory owned by the host side: freed (stream-ordered) on the stream that allocated
/// it when dropped.
pub struct DevMem {
    dev: Arc<dyn Device>,
    ptr: u64,
    bytes: usize,
    stream: Stream,
}

impl DevMem {
    fn ptr(&self) -> u64 {
        self.ptr
    }
    fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for DevMem {
    fn drop(&mut self) {
        if let Err(e) = self.dev.free(self.stream, self.ptr) {
            tracing::warn!("freeing device memory: {e:#}");
        }
    }
}

/// Device memory whose last users may still be queued on other streams: freed only once every
/// stream has passed the point where it was dropped (see [`Gpu::settle`]).
type Graveyard = Arc<Mutex<Vec<DevMem>>>;

/// A device buffer: `len` elements of `dtype`.
pub struct GpuBuf {
    /// `None` when its allocation failed (and once `drop` has taken it): every use goes
    /// through `Gpu::ptr` / `Gpu::usable`, which record that instead of touching memory.
    mem: Option<DevMem>,
    len: usize,
    dtype: DType,
    /// For an fp32 weight in mixed precision: its 16-bit copy for the convolutions, made on
    /// first use and remade after each change (`shadow_fresh` false).
    shadow: Mutex<Option<DevMem>>,
    shadow_fresh: AtomicBool,
    /// With several streams: where the memory goes when dropped, instead of being freed on
    /// the stream that allocated it while another stream may still read it.
    grave: Option<Graveyard>,
}

impl Drop for GpuBuf {
    fn drop(&mut self) {
        if let Some(grave) = &self.grave {
            let mut g = grave.lock().unwrap_or_else(|p| p.into_inner());
            g.extend(self.mem.take());
            g.extend(self.shadow.get_mut().unwrap_or_else(|p| p.into_inner()).take());
        }
    }
}

impl GpuBuf {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
}

/// Dynamic loss scaling, all in device memory so that no step needs a host sync.
struct LossScale {
    /// The scale (starts at 2^16), an f32.
    scale: DevMem,
    /// Clean steps since the last change of the scale (i32).
    growth: DevMem,
    /// Set by the unscale kernel when a gradient is inf or NaN; cleared by the update (i32).
    found_inf: DevMem,
    /// Steps skipped because of an overflow, since the start (i32).
    skipped: DevMem,
}

/// torch.amp.GradScaler's defaults.
pub const LOSS_SCALE_INIT: f32 = 65536.0;
const LOSS_SCALE_GROWTH: f32 = 2.0;
const LOSS_SCALE_BACKOFF: f32 = 0.5;
const LOSS_SCALE_INTERVAL: i32 = 2000;

/// One stream with what work on it needs to itself: cuDNN workspaces are per stream, and so
/// are the BatchNorm reduction buffers (two reductions running at once on different streams
/// must not share partial sums or arrival counters).
struct Lane {
    stream: Stream,
    /// Scratch memory for cuDNN, grown on demand.
    workspace: Mutex<Option<DevMem>>,
    /// Partial sums (doubles) and arrival counters (ints) of the per-channel reductions.
    bn_scratch: Mutex<(Option<DevMem>, Option<DevMem>)>,
    /// Marks a point of this stream's work for another stream to wait on.
    event: Event,
}

/// The device memory a training step reads its host inputs from (batch draws, labels,
/// learning rate) and writes its metrics to, whether the step runs op by op or is replayed as
/// a CUDA graph, which bakes these addresses in. It grows and never shrinks, so a graph's
/// addresses stay valid until a larger batch needs more room (`generation` then changes and
/// the graph is refused).
struct StepSlots {
    /// Images the slots hold.
    capacity: usize,
    /// Counts reallocations.
    generation: u64,
    /// The batch's record indices, crop offsets dy, dx and flips: four runs of `batch` ints.
    draws: DevMem,
    /// Labels (i32).
    labels: DevMem,
    /// The learning rate (f32).
    lr: DevMem,
    /// The step's mean loss (f32) and correct count (i32), as the loss kernel writes them.
    loss: DevMem,
    correct: DevMem,
    /// Σ loss·n and Σ correct (two f64) of the steps whose metrics stay on the device, since
    /// the last read.
    sums: DevMem,
    /// What the host last copied into `labels` and `lr`: an input equal to it is not copied
    /// again, so a step captured right after its inputs were staged copies nothing.
    staged_labels: Vec<u32>,
    staged_lr: Option<f32>,
}

/// A captured training step (see [`Gpu::capture_begin`]).
pub struct StepGraph {
    dev: Arc<dyn Device>,
    graph: Graph,
    batch: usize,
    /// The [`StepSlots`] generation it was captured on.
    generation: u64,
}

impl StepGraph {
    /// Images per step.
    pub fn batch(&self) -> usize {
        self.batch
    }
}

impl Drop for StepGraph {
    fn drop(&mut self) {
        self.dev.graph_destroy(self.graph);
    }
}

/// A GPU (real or emulated) with its streams and the backend's state on it.
pub struct Gpu {
    dev: Arc<dyn Device>,
    /// `lanes[0]` is the main stream (everything outside the Inception branches); the others
    /// run branches.
    lanes: Vec<Lane>,
    /// The lane ops go to now (set around each branch by the network).
    current: AtomicUsize,
    opts: GpuOptions,
    /// The convolution algorithms chosen per shape.
    algos: Mutex<HashMap<(crate::backend::Nhwc, crate::backend::Conv2d, DType), dnn::Algos>>,
    /// Present in mixed precision.
    loss_scale: Option<LossScale>,
    /// Present with several streams.
    graveyard: Option<Graveyard>,
    /// Streaming multiprocessors, for launch geometry (read once: the reduction kernels'
    /// grids, hence their bits, must not change from launch to launch).
    sm_count: u32,
    /// Allocated by the first training step.
    slots: Mutex<Option<StepSlots>>,
    /// Event waits issued by the branch scheduler (for `GpuOptions::skip_wait`).
    waits: AtomicUsize,
    /// The first failure since the last [`Buffers::status`] call.
    ///
    /// [`Buffers::status`]: crate::backend::Buffers::status
    error: Mutex<Option<String>>,
    /// In a data-parallel run: how gradients reach the other ranks.
    comm: Option<comm::Comm>,
}

impl Gpu {
    /// Opens CUDA device `ordinal` for the fp32 path.
    #[cfg(feature = "cudnn")]
    pub fn new(ordinal: usize) -> Result<Gpu> {
        Gpu::with_options(ordinal, GpuOptions::default())
    }

    /// Opens CUDA device `ordinal`: the driver, cuDNN, cuBLAS and the kernels.
    #[cfg(feature = "cudnn")]
    pub fn with_options(ordinal: usize, opts: GpuOptions) -> Result<Gpu> {
        probe(ordinal).with_context(|| format!("--device cuda:{ordinal}"))?;
        let dev =
            real::RealDevice::open(ordinal).with_context(|| format!("--device cuda:{ordinal}"))?;
        let (major, _) = dev.info().compute_capability;
        if opts.activations == DType::Bf16 && major < 8 {
            bail!("--amp-dtype bf16 needs a GPU of compute capability 8.0 or newer (Ampere); use --amp-dtype f16");
        }
        Gpu::on(Arc::new(dev), opts)
    }

    /// The backend on the emulated GPU.
    pub fn emulated(emu: emu::EmuOptions, opts: GpuOptions) -> Result<Gpu> {
        Gpu::on(Arc::new(emu::EmuDevice::new(emu)), opts)
    }

    /// The backend on `dev`.
    pub fn on(dev: Arc<dyn Device>, opts: GpuOptions) -> Result<Gpu> {
        if opts.streams == 0 {
            bail!("--streams must be at least 1");
        }
        let n_lanes = if opts.streams == 1 { 1 } else { opts.streams + 1 };
        let mut lanes = Vec::with_capacity(n_lanes);
        for _ in 0..n_lanes {
            lanes.push(Lane {
                stream: dev.stream_create()?,
                workspace: Mutex::new(None),
                bn_scratch: Mutex::new((None, None)),
                event: dev.event_create()?,
            });
        }
        let main = lanes[0].stream;
        let loss_scale = if opts.activations == DType::F32 {
            None
        } else {
            let zeroed = |what: &str| -> Result<DevMem> {
                let m = alloc_mem(&dev, main, 4).with_context(|| what.to_string())?;
                dev.memset(main, m.ptr, 0, 4)?;
                Ok(m)
            };
            let scale = alloc_mem(&dev, main, 4).context("the loss scale")?;
            dev.htod(main, scale.ptr, &LOSS_SCALE_INIT.to_le_bytes())?;
            Some(LossScale {
                scale,
                growth: zeroed("the loss scale's growth tracker")?,
                found_inf: zeroed("the overflow flag")?,
                skipped: zeroed("the skipped-step counter")?,
            })
        };
        let sm_count = dev.info().multiprocessors.max(1);
        Ok(Gpu {
            graveyard: (lanes.len() > 1).then(Graveyard::default),
            dev,
            lanes,
            current: AtomicUsize::new(0),
            opts,
            algos: Mutex::new(HashMap::new()),
            loss_scale,
            sm_count,
            slots: Mutex::new(None),
            waits: AtomicUsize::new(0),
            error: Mutex::new(None),
            comm: None,
        })
    }

    /// The device this backend drives.
    pub fn device(&self) -> &Arc<dyn Device> {
        &self.dev
    }

    /// The main stream.
    fn stream(&self) -> Stream {
        self.lanes[0].stream
    }

    /// The lane ops go to now.
    fn lane(&self) -> &Lane {
        &self.lanes[self.current.load(std::sync::atomic::Ordering::Relaxed)]
    }

    /// The stream ops go to now.
    fn current_stream(&self) -> Stream {
        self.lane().stream
    }

    /// The lane of Inception branch `i`.
    fn branch_lane(&self, i: usize) -> usize {
        match self.lanes.len() {
            1 => 0,
            n => 1 + i % (n - 1),
        }
    }

    /// `stream` waits for `event`, unless this is the wait the checker's test leaves out.
    fn wait(&self, stream: Stream, event: Event) -> Result<()> {
        let n = self.waits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.opts.skip_wait == Some(n) {
            return Ok(());
        }
        self.dev.stream_wait(stream, event)
    }

    /// Frees the memory of the buffers dropped so far, once it is safe: every stream first
    /// waits for the main stream, which has joined the branch streams at the end of each
    /// Inception block, so each free (issued on the stream that allocated the memory) comes
    /// after every use.
    fn settle(&self) {
        let Some(grave) = &self.graveyard else {
            return;
        };
        let dead = std::mem::take(&mut *grave.lock().unwrap_or_else(|p| p.into_inner()));
        if dead.is_empty() {
            return;
        }
        let main = &self.lanes[0];
        if let Err(e) = self.dev.event_record(main.event, main.stream) {
            self.record("recording a CUDA event", e);
            // Without the ordering, keep the memory rather than free it early.
            std::mem::forget(dead);
            return;
        }
        for lane in &self.lanes[1..] {
            if let Err(e) = self.dev.stream_wait(lane.stream, main.event) {
                self.record("ordering CUDA streams", e);
                std::mem::forget(dead);
                return;
            }
        }
        drop(dead);
    }

    pub fn options(&self) -> GpuOptions {
        self.opts
    }

    /// Sets the loss scale of mixed precision (e.g. to continue a run at its scale); an
    /// error on the fp32 path, which has none.
    pub fn set_loss_scale(&mut self, scale: f32) -> Result<()> {
        let Some(ls) = &self.loss_scale else {
            bail!("the fp32 path has no loss scale");
        };
        if !(scale.is_finite() && scale > 0.0) {
            bail!("the loss scale must be a positive finite number, got {scale}");
        }
        self.dev
            .htod(self.stream(), ls.scale.ptr, &scale.to_le_bytes())
            .context("setting the loss scale")
    }

    /// The current loss scale and the number of optimizer steps skipped for an overflow so
    /// far, in mixed precision (reading them waits for the queued work).
    pub fn read_loss_scale(&self) -> Result<Option<(f32, u64)>> {
        let Some(ls) = &self.loss_scale else {
            return Ok(None);
        };
        let (mut scale, mut skipped) = ([0u8; 4], [0u8; 4]);
        self.dev.dtoh(self.stream(), &mut scale, ls.scale.ptr).context("reading the loss scale")?;
        self.dev
            .dtoh(self.stream(), &mut skipped, ls.skipped.ptr)
            .context("reading the loss scale")?;
        Ok(Some((f32::from_le_bytes(scale), i32::from_le_bytes(skipped).max(0) as u64)))
    }

    /// Waits for all queued work and reports any failure.
    pub fn synchronize(&self) -> Result<()> {
        self.dev.synchronize().context("CUDA error")?;
        self.take_error()
    }

    /// After a failed CUDA graph capture, whose recorded work never ran: abandons the capture,
    /// waits for the device and forgets the failures the capture left, so that eager steps
    /// can follow. An error only if the device itself has failed.
    pub fn recover_from_capture(&self) -> Result<()> {
        self.dev.capture_abort(self.stream());
        let _ = self.take_error();
        self.dev.synchronize().context("CUDA error after a failed graph capture")?;
        let _ = self.take_error();
        Ok(())
    }

    /// Records the first failure; later ones are consequences of it.
    fn record(&self, what: &str, e: impl std::fmt::Display) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(format!("{what}: {e:#}"));
        }
    }

    fn take_error(&self) -> Result<()> {
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => bail!("{e}"),
            None => Ok(()),
        }
    }

    /// Device name, compute capability and memory, for `incept info`.
    pub fn describe(&self) -> String {
        let i = self.dev.info();
        let (major, minor) = i.compute_capability;
        let mem = i.total_memory as f64 / (1u64 << 30) as f64;
        format!("{} (compute capability {major}.{minor}, {mem:.1} GiB)", i.name)
    }
}

/// `bytes` of device memory on `stream`, owned.
fn alloc_mem(dev: &Arc<dyn Device>, stream: Stream, bytes: usize) -> Result<DevMem> {
    let bytes = bytes.max(1);
    let ptr = dev.alloc(stream, bytes)?;
    Ok(DevMem { dev: dev.clone(), ptr, bytes, stream })
}
