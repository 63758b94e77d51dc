//! The CUDA backend (`--features cudnn`): cuDNN convolutions and pooling, cuBLAS for the
//! linear head, and the PTX kernels of `cuda/` (BatchNorm, concat, loss, optimizer, ReLU,
//! conversions).
//!
//! It implements the same [`Backend`] trait as the CPU reference, so the same
//! [`crate::model::net::Net`] trains on it and every op is compared with the CPU at the
//! model's shapes (`tests/gpu.rs`). Two precisions:
//! - fp32 everywhere (`--no-amp`), no TF32: the path that matches the CPU reference tightly;
//! - mixed precision (`--amp`, the default on CUDA): activations and their gradients in fp16
//!   (or bf16), convolutions on tensor cores with fp32 accumulation; fp32 master weights (each
//!   convolution weight keeps a 16-bit copy, refreshed after every optimizer step), fp32
//!   BatchNorm statistics, fp32 logits and loss; dynamic loss scaling on the device
//!   (torch.amp.GradScaler's rule), an overflowed step skipped on the device.
//!
//! Work goes to a main stream and, with `--streams N > 1`, the Inception branches to streams
//! of their own, ordered by events at each fork and join (see `Lane`, `branches_begin`);
//! cudarc's automatic event tracking is off, since this backend orders its own work. A whole
//! training step can be captured as a CUDA graph (`capture_begin` … `replay`). Ops cannot
//! return errors through the trait: the first failure (a launch, an allocation) is recorded
//! and reported by [`Backend::status`], which the network checks after each forward and
//! backward.

mod dnn;
pub mod libs;
mod nvtx;
mod ops;

use libs::Lib;

pub use ops::DeviceRecords;

use anyhow::{bail, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Mutex};

/// The PTX of every `cuda/*.cu`, compiled by build.rs: `PTX: &[(module, source)]`.
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// The element type of a device buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
    /// The suffix of the kernels instantiated for this type (`relu_forward_f16`).
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
    fn cudnn(self) -> cudarc::cudnn::sys::cudnnDataType_t {
        use cudarc::cudnn::sys::cudnnDataType_t as D;
        match self {
            DType::F32 => D::CUDNN_DATA_FLOAT,
            DType::F16 => D::CUDNN_DATA_HALF,
            DType::Bf16 => D::CUDNN_DATA_BFLOAT16,
        }
    }
}

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
}

impl Default for GpuOptions {
    fn default() -> Self {
        GpuOptions {
            activations: DType::F32,
            deterministic: false,
            streams: 1,
        }
    }
}

/// Device memory whose last users may still be queued on other streams: freed only once every
/// stream has passed the point where it was dropped (see [`Gpu::settle`]).
type Graveyard = Arc<Mutex<Vec<CudaSlice<u8>>>>;

/// A device buffer: `len` elements of `dtype`.
pub struct GpuBuf {
    /// `None` when its allocation failed (and once `drop` has taken it): every use goes
    /// through `Gpu::ptr` / `Gpu::usable`, which record that instead of touching memory.
    mem: Option<CudaSlice<u8>>,
    len: usize,
    dtype: DType,
    /// For an fp32 weight in mixed precision: its 16-bit copy for the convolutions, made on
    /// first use and remade after each change (`shadow_fresh` false).
    shadow: Mutex<Option<CudaSlice<u8>>>,
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
            g.extend(
                self.shadow
                    .get_mut()
                    .unwrap_or_else(|p| p.into_inner())
                    .take(),
            );
        }
    }
}

impl GpuBuf {
    fn mem(&self) -> &CudaSlice<u8> {
        self.mem
            .as_ref()
            .expect("checked by Gpu::ptr / Gpu::usable before use")
    }
    fn mem_mut(&mut self) -> &mut CudaSlice<u8> {
        self.mem
            .as_mut()
            .expect("checked by Gpu::ptr / Gpu::usable before use")
    }

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
    /// The scale (starts at 2^16).
    scale: CudaSlice<f32>,
    /// Clean steps since the last change of the scale.
    growth: CudaSlice<i32>,
    /// Set by the unscale kernel when a gradient is inf or NaN; cleared by the update.
    found_inf: CudaSlice<i32>,
    /// Steps skipped because of an overflow, since the start.
    skipped: CudaSlice<i32>,
}

/// Bytes of cuBLAS workspace (its own default for Hopper is 32 MiB).
const BLAS_WORKSPACE: usize = 32 << 20;

/// torch.amp.GradScaler's defaults.
pub const LOSS_SCALE_INIT: f32 = 65536.0;
const LOSS_SCALE_GROWTH: f32 = 2.0;
const LOSS_SCALE_BACKOFF: f32 = 0.5;
const LOSS_SCALE_INTERVAL: i32 = 2000;

/// One CUDA stream with what work on it needs to itself: cuDNN handles and workspaces are
/// per stream, and so are the BatchNorm reduction buffers (two reductions running at once on
/// different streams must not share partial sums or arrival counters).
struct Lane {
    stream: Arc<CudaStream>,
    dnn: Mutex<dnn::Dnn>,
    /// Scratch memory for cuDNN, grown on demand.
    workspace: Mutex<CudaSlice<u8>>,
    /// Partial sums (doubles) and arrival counters of the per-channel reductions.
    bn_scratch: Mutex<(CudaSlice<f64>, CudaSlice<i32>)>,
    /// Marks a point of this stream's work for another stream to wait on.
    event: CudaEvent,
}

/// The device side of a training step replayed as a CUDA graph: buffers whose addresses the
/// graph bakes in, refilled before each replay (`params`, `lr`) or by the graph itself.
struct StepState {
    batch: usize,
    /// The batch's record indices, crop offsets dy, dx and flips: 4·batch ints.
    params: CudaSlice<i32>,
    /// Labels, written by the data kernel inside the graph and read by the loss.
    labels: CudaSlice<i32>,
    /// The step's mean loss and correct count, as the loss kernel writes them.
    loss: CudaSlice<f32>,
    correct: CudaSlice<i32>,
    /// Σ loss·n and Σ correct since the last read.
    sums: CudaSlice<f64>,
    /// The learning rate of the next replay.
    lr: CudaSlice<f32>,
}

/// A captured training step (see [`Gpu::capture_begin`]).
pub struct StepGraph {
    graph: cudarc::driver::CudaGraph,
    batch: usize,
}

impl StepGraph {
    /// Images per step.
    pub fn batch(&self) -> usize {
        self.batch
    }
}

/// A CUDA device with its streams, library handles and loaded kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    /// `lanes[0]` is the main stream (everything outside the Inception branches); the others
    /// run branches.
    lanes: Vec<Lane>,
    /// The lane ops go to now (set around each branch by the network).
    current: AtomicUsize,
    blas: CudaBlas,
    funcs: HashMap<String, CudaFunction>,
    opts: GpuOptions,
    /// Present in mixed precision.
    loss_scale: Option<LossScale>,
    /// Present with several streams.
    graveyard: Option<Graveyard>,
    /// NVTX ranges (a profiler is attached).
    nvtx: bool,
    /// Streaming multiprocessors, for launch geometry (read once: the reduction kernels'
    /// grids, hence their bits, must not change from launch to launch).
    sm_count: u32,
    /// Set between [`Gpu::capture_begin`] and [`Gpu::capture_end`]: ops must not touch the
    /// host (no copies, no reads), and the loss, labels and learning rate come from `step`.
    capturing: AtomicBool,
    step: Mutex<Option<StepState>>,
    /// cuBLAS's workspace, set once so that cuBLAS never allocates inside a capture.
    _blas_workspace: CudaSlice<u8>,
    /// The first failure since the last [`Backend::status`] call.
    error: Mutex<Option<String>>,
}

/// Parses `cuda` / `cuda:N` into a device ordinal.
pub fn parse_device(device: &str) -> Result<usize> {
    match device {
        "cuda" => Ok(0),
        d => d
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("--device {d}: expected cpu, cuda or cuda:N")),
    }
}

/// `Ok` if `lib` was found and cudarc, which looks it up by name and panics when that fails,
/// will find it too.
fn present(lib: Lib) -> Result<()> {
    let found = libs::libraries().require(lib)?;
    if !cudarc_finds(lib) {
        bail!(
            "{} was loaded from {} but cannot be opened by any of the names this build looks for; point INCEPT_CUDA_LIBS at a CUDA 13 or 12 library set",
            lib.name(),
            found.file.as_deref().unwrap_or(std::path::Path::new("?")).display()
        );
    }
    Ok(())
}

/// Whether cudarc's own by-name lookup of `lib` succeeds (true for those it does not open).
fn cudarc_finds(lib: Lib) -> bool {
    // SAFETY: each only tries to open the library by the names cudarc uses.
    unsafe {
        match lib {
            Lib::Driver => cudarc::driver::sys::is_culib_present(),
            Lib::Cublas => cudarc::cublas::sys::is_culib_present(),
            Lib::Cudnn => cudarc::cudnn::sys::is_culib_present(),
            Lib::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
            Lib::CublasLt | Lib::Nccl => true,
        }
    }
}

/// Checks, before anything else is read or computed, that CUDA device `ordinal` can be used:
/// the driver, a device of that number, cuBLAS and cuDNN.
pub fn probe(ordinal: usize) -> Result<()> {
    present(Lib::Driver)?;
    let count = CudaContext::device_count().map_err(|e| {
        anyhow::anyhow!("the NVIDIA driver found no usable CUDA device ({e}); use --device cpu")
    })?;
    if count == 0 {
        bail!("the NVIDIA driver reports no CUDA device; use --device cpu");
    }
    if ordinal >= count as usize {
        bail!("this machine has {count} CUDA device(s), numbered from 0");
    }
    present(Lib::CublasLt)?;
    present(Lib::Cublas)?;
    present(Lib::Cudnn)
}

/// The driver's CUDA version, e.g. `12.8`.
fn driver_version() -> Result<String> {
    let mut v = 0;
    // SAFETY: a pure query after the library was found.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        bail!("cuDriverGetVersion failed: {r:?}");
    }
    Ok(format!("{}.{}", v / 1000, v % 1000 / 10))
}

/// Every kernel the backend launches. Those in `TYPED` exist once per activation type
/// (`_f32`, `_f16`, `_bf16`).
const KERNELS: &[&str] = &[
    "batch_norm_eval_invstd",
    "cross_entropy_forward_backward",
    "sgd_step",
    "update_loss_scale",
    "accumulate_step_metrics",
];
const TYPED: &[&str] = &[
    "augment_batch",
    "relu_forward",
    "relu_backward",
    "fork_backward",
    "convert_from_f32",
    "convert_to_f32",
    "weight_oihw_to_ohwi",
    "add_ohwi_to_oihw",
    "bias_add",
    "bias_grad",
    "batch_norm_stats",
    "batch_norm_relu_apply",
    "batch_norm_relu_backward_reduce",
    "batch_norm_relu_backward_apply",
    "concat_forward",
    "concat_backward",
    "amp_unscale",
    "avg_pool2d_backward",
];

fn kernel_names() -> Vec<String> {
    let mut names: Vec<String> = KERNELS.iter().map(|k| k.to_string()).collect();
    for k in TYPED {
        for t in [DType::F32, DType::F16, DType::Bf16] {
            names.push(format!("{k}_{}", t.suffix()));
        }
    }
    names
}

/// The embedded cubin of `module` for a GPU of compute capability `major.minor`: one assembled
/// for the same major version and a minor version up to the GPU's (sm_80 code runs on 8.6 and
/// 8.9; 9.0 needs sm_90), the newest such.
fn matching_cubin(module: &str, major: u32, minor: u32) -> Option<&'static [u8]> {
    ptx::CUBIN
        .iter()
        .filter(|(m, sm, _)| *m == module && sm / 10 == major && sm % 10 <= minor)
        .max_by_key(|(_, sm, _)| *sm)
        .map(|(_, _, bin)| *bin)
}

/// The kernels the backend launches that no embedded PTX module defines (an `.entry`), and
/// entries missing from a cubin, so a build whose kernels and launches disagree is caught
/// without a GPU.
pub fn missing_kernels() -> Vec<String> {
    let mut missing: Vec<String> = kernel_names()
        .into_iter()
        .filter(|name| {
            let entry = format!(".entry {name}(");
            !ptx::PTX.iter().any(|(_, src)| src.contains(&entry))
        })
        .collect();
    // Each cubin must hold every entry of the PTX it was assembled from (its symbol names).
    for (module, sm, bin) in ptx::CUBIN {
        let Some((_, src)) = ptx::PTX.iter().find(|(m, _)| m == module) else {
            missing.push(format!("{module} (sm_{sm} cubin without its PTX)"));
            continue;
        };
        for line in src.lines() {
            let Some(name) = line
                .split(".entry ")
                .nth(1)
                .and_then(|rest| rest.split('(').next())
            else {
                continue;
            };
            let name = name.trim();
            if !bin.windows(name.len()).any(|w| w == name.as_bytes()) {
                missing.push(format!("{name} (in the sm_{sm} cubin of {module})"));
            }
        }
    }
    missing
}

impl Gpu {
    /// Opens device `ordinal` for the fp32 path.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        Gpu::with_options(ordinal, GpuOptions::default())
    }

    /// Opens device `ordinal`, its cuDNN and cuBLAS handles, and loads the kernels.
    pub fn with_options(ordinal: usize, opts: GpuOptions) -> Result<Gpu> {
        probe(ordinal).with_context(|| format!("--device cuda:{ordinal}"))?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow::anyhow!("cannot open CUDA device {ordinal}: {e}"))?;
        // SAFETY: called before any buffer or stream exists; this backend orders its own work
        // (events between its streams at the Inception forks and joins), so cudarc's
        // per-buffer events are not needed (and would serialise branches writing disjoint
        // slices of one buffer).
        unsafe { ctx.disable_event_tracking() };
        if opts.streams == 0 {
            bail!("--streams must be at least 1");
        }
        let alloc = |e| anyhow::anyhow!("CUDA allocation failed: {e}");
        let n_lanes = if opts.streams == 1 {
            1
        } else {
            opts.streams + 1
        };
        let mut lanes = Vec::with_capacity(n_lanes);
        for _ in 0..n_lanes {
            let stream = ctx
                .new_stream()
                .map_err(|e| anyhow::anyhow!("cannot create a CUDA stream: {e}"))?;
            let dnn = dnn::Dnn::new(stream.cu_stream() as _, opts.deterministic)?;
            lanes.push(Lane {
                dnn: Mutex::new(dnn),
                workspace: Mutex::new(stream.alloc_zeros::<u8>(1).map_err(alloc)?),
                bn_scratch: Mutex::new((
                    stream.alloc_zeros::<f64>(1).map_err(alloc)?,
                    stream.alloc_zeros::<i32>(1).map_err(alloc)?,
                )),
                event: ctx
                    .new_event(None)
                    .map_err(|e| anyhow::anyhow!("cannot create a CUDA event: {e}"))?,
                stream,
            });
        }
        let stream = lanes[0].stream.clone();
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| anyhow::anyhow!("cannot start cuBLAS: {e}"))?;
        let blas_workspace = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE)
            .map_err(|e| anyhow::anyhow!("CUDA allocation failed: {e}"))?;
        {
            use cudarc::driver::DevicePtr;
            let (p, _s) = blas_workspace.device_ptr(&stream);
            // SAFETY: the buffer outlives the handle's use (both live in the Gpu).
            let r = unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    p as *mut std::ffi::c_void,
                    BLAS_WORKSPACE,
                )
            };
            if r != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                bail!("cannot give cuBLAS its workspace: {r:?}");
            }
        }
        let names = kernel_names();
        let mut funcs = HashMap::new();
        let (major, minor) = ctx.compute_capability().unwrap_or((0, 0));
        let mut from_cubin = 0;
        for (module, src) in ptx::PTX {
            // A cubin assembled for this GPU's generation (same major, minor up to the GPU's)
            // loads without JIT; any failure falls back to the PTX.
            let cubin = matching_cubin(module, major as u32, minor as u32).and_then(|bin| {
                ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bin.to_vec()))
                    .ok()
            });
            if cubin.is_some() {
                from_cubin += 1;
            }
            let loaded = match cubin {
                Some(m) => Ok(m),
                None => ctx.load_module(cudarc::nvrtc::Ptx::from_src(*src)),
            };
            let m = loaded.map_err(|e| {
                let isa = src.lines().find(|l| l.starts_with(".version")).unwrap_or("?");
                anyhow::anyhow!(
                    "cannot load the {module} kernels ({e}); they are PTX {isa} and the driver supports CUDA {}: update the NVIDIA driver, or rebuild with an older CUDA toolkit/NVRTC",
                    driver_version().unwrap_or_else(|_| "?".into())
                )
            })?;
            for name in &names {
                if let Ok(f) = m.load_function(name) {
                    funcs.insert(name.clone(), f);
                }
            }
        }
        if let Some(missing) = names.iter().find(|k| !funcs.contains_key(*k)) {
            bail!("kernel {missing} is missing from the embedded PTX; the build is inconsistent");
        }
        tracing::debug!(
            from_cubin,
            from_ptx = ptx::PTX.len() - from_cubin,
            "kernel modules loaded for compute capability {major}.{minor}"
        );
        if opts.activations == DType::Bf16 {
            let (major, _) = ctx.compute_capability().unwrap_or((0, 0));
            if major < 8 {
                bail!("--amp-dtype bf16 needs a GPU of compute capability 8.0 or newer (Ampere); use --amp-dtype f16");
            }
        }
        let loss_scale = if opts.activations == DType::F32 {
            None
        } else {
            Some(LossScale {
                scale: stream.clone_htod(&[LOSS_SCALE_INIT]).map_err(alloc)?,
                growth: stream.alloc_zeros::<i32>(1).map_err(alloc)?,
                found_inf: stream.alloc_zeros::<i32>(1).map_err(alloc)?,
                skipped: stream.alloc_zeros::<i32>(1).map_err(alloc)?,
            })
        };
        let nvtx = nvtx::active();
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| anyhow::anyhow!("cannot query the GPU's multiprocessors: {e}"))?
            .max(1) as u32;
        Ok(Gpu {
            ctx,
            graveyard: (lanes.len() > 1).then(Graveyard::default),
            lanes,
            current: AtomicUsize::new(0),
            blas,
            funcs,
            opts,
            loss_scale,
            nvtx,
            sm_count,
            capturing: AtomicBool::new(false),
            step: Mutex::new(None),
            _blas_workspace: blas_workspace,
            error: Mutex::new(None),
        })
    }

    /// The main stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.lanes[0].stream
    }

    /// The lane ops go to now.
    fn lane(&self) -> &Lane {
        &self.lanes[self.current.load(std::sync::atomic::Ordering::Relaxed)]
    }

    /// The stream ops go to now.
    fn cur(&self) -> &Arc<CudaStream> {
        &self.lane().stream
    }

    /// The lane of Inception branch `i`.
    fn branch_lane(&self, i: usize) -> usize {
        match self.lanes.len() {
            1 => 0,
            n => 1 + i % (n - 1),
        }
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
        if let Err(e) = main.event.record(&main.stream) {
            self.record("recording a CUDA event", e);
            // Without the ordering, keep the memory rather than free it early.
            std::mem::forget(dead);
            return;
        }
        for lane in &self.lanes[1..] {
            if let Err(e) = lane.stream.wait(&main.event) {
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
        let Some(ls) = &mut self.loss_scale else {
            bail!("the fp32 path has no loss scale");
        };
        if !(scale.is_finite() && scale > 0.0) {
            bail!("the loss scale must be a positive finite number, got {scale}");
        }
        self.lanes[0]
            .stream
            .memcpy_htod(&[scale], &mut ls.scale)
            .map_err(|e| anyhow::anyhow!("setting the loss scale: {e}"))
    }

    /// The current loss scale and the number of optimizer steps skipped for an overflow so
    /// far, in mixed precision (reading them waits for the queued work).
    pub fn read_loss_scale(&self) -> Result<Option<(f32, u64)>> {
        let Some(ls) = &self.loss_scale else {
            return Ok(None);
        };
        let err = |e| anyhow::anyhow!("reading the loss scale: {e}");
        let scale = self.stream().clone_dtoh(&ls.scale).map_err(err)?;
        let skipped = self.stream().clone_dtoh(&ls.skipped).map_err(err)?;
        Ok(Some((scale[0], skipped[0].max(0) as u64)))
    }

    /// Waits for all queued work and reports any failure.
    pub fn synchronize(&self) -> Result<()> {
        self.ctx
            .synchronize()
            .map_err(|e| anyhow::anyhow!("CUDA error: {e}"))?;
        self.take_error()
    }

    /// After a failed CUDA graph capture, whose recorded work never ran: waits for the
    /// device and forgets the failures the capture left (including those of freeing memory
    /// allocated inside it), so that eager steps can follow. An error only if the device
    /// itself has failed.
    pub fn recover_from_capture(&self) -> Result<()> {
        self.capturing
            .store(false, std::sync::atomic::Ordering::Release);
        let _ = self.take_error();
        self.ctx
            .synchronize()
            .map_err(|e| anyhow::anyhow!("CUDA error after a failed graph capture: {e}"))?;
        let _ = self.ctx.check_err();
        let _ = self.take_error();
        Ok(())
    }

    /// Records the first failure; later ones are consequences of it.
    fn record(&self, what: &str, e: impl std::fmt::Display) {
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(format!("{what}: {e}"));
        }
    }

    fn take_error(&self) -> Result<()> {
        match self.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            Some(e) => bail!("{e}"),
            None => Ok(()),
        }
    }

    fn func(&self, name: &str) -> &CudaFunction {
        // Every name used is in KERNELS, checked at construction.
        &self.funcs[name]
    }

    /// Device name, compute capability and memory, for `incept info`.
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "?".into());
        let (major, minor) = self.ctx.compute_capability().unwrap_or((0, 0));
        let mem = self.ctx.total_mem().unwrap_or(0) as f64 / (1u64 << 30) as f64;
        format!("{name} (compute capability {major}.{minor}, {mem:.1} GiB)")
    }
}

/// What `incept info` prints: the build, each library (file and version, or where it looked),
/// the devices, and whether device 0 opens with the kernels loaded. The flag is false when
/// the CUDA backend cannot run here.
pub fn info() -> (String, bool) {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "build: CUDA backend (cudarc 0.19.10, CUDA 13 bindings; opens CUDA 13 or 12 libraries), kernels: {}",
        ptx::PTX
            .iter()
            .map(|(m, _)| *m)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut archs: Vec<u32> = ptx::CUBIN.iter().map(|(_, sm, _)| *sm).collect();
    archs.sort();
    archs.dedup();
    line(format!(
        "kernels: PTX {} for {} (JIT), cubins for {}",
        ptx::PTX_ISA,
        ptx::PTX_ARCH,
        if archs.is_empty() {
            "none".to_string()
        } else {
            archs
                .iter()
                .map(|a| format!("sm_{a}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    ));
    let libraries = libs::libraries();
    for lib in Lib::ALL {
        let found = libraries.get(lib);
        let mut l = found.describe(&libraries.places);
        if found.file.is_some() && !cudarc_finds(lib) {
            l.push_str("; but cudarc cannot open it by name (unsupported soname)");
        }
        line(l);
    }
    line(format!("NVTX: {}", nvtx::status()));
    let usable = match probe(0) {
        Err(e) => {
            line(format!("cuda: not usable: {e:#}"));
            false
        }
        Ok(()) => {
            match CudaContext::device_count() {
                Ok(n) => line(format!("devices: {n}")),
                Err(e) => line(format!("devices: cannot query ({e})")),
            }
            match Gpu::new(0) {
                Ok(g) => {
                    line(format!("cuda:0: {}; kernels load", g.describe()));
                    true
                }
                Err(e) => {
                    line(format!("cuda:0: {e:#}"));
                    false
                }
            }
        }
    };
    (out, usable)
}
