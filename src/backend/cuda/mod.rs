//! The CUDA backend (`--features cudnn`): cuDNN convolutions and pooling, cuBLAS for the
//! linear head, and the PTX kernels of `cuda/` (BatchNorm, concat, loss, optimizer, ReLU).
//!
//! This is the fp32 path: it implements the same [`Backend`] trait as the CPU reference, so
//! the same [`crate::model::net::Net`] trains on it and every op is compared with the CPU at
//! the model's shapes (`tests/gpu.rs`). Work goes to one stream; cudarc's automatic event
//! tracking is off, since this backend orders its own work. Ops cannot return errors through
//! the trait: the first failure (a launch, an allocation) is recorded and reported by
//! [`Backend::status`], which the network checks after each forward and backward.

mod dnn;
pub mod libs;
mod ops;

use anyhow::{bail, Context, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// The PTX of every `cuda/*.cu`, compiled by build.rs: `PTX: &[(module, source)]`.
mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

/// A CUDA device with its stream, library handles and loaded kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    dnn: Mutex<dnn::Dnn>,
    blas: CudaBlas,
    funcs: HashMap<String, CudaFunction>,
    /// Scratch memory for cuDNN, grown on demand.
    workspace: Mutex<CudaSlice<u8>>,
    /// Partial sums (doubles) and arrival counters of the BatchNorm reductions.
    bn_scratch: Mutex<(CudaSlice<f64>, CudaSlice<i32>)>,
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

/// Checks that the driver library loads, without which cudarc would panic.
fn driver_present() -> Result<()> {
    libs::preload();
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!(
            "no NVIDIA driver found (libcuda.so.1 could not be loaded): install the NVIDIA driver on this machine, or use --device cpu"
        );
    }
    Ok(())
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

fn cudnn_present() -> Result<()> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::cudnn::sys::is_culib_present() } {
        bail!(
            "cuDNN not found (libcudnn.so.9): install it (e.g. `pip install nvidia-cudnn-cu12`, found automatically in the active Python environment) or add its lib folder to LD_LIBRARY_PATH; searched: {}",
            libs::search_dirs().iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    Ok(())
}

/// Every kernel the backend launches, by module.
const KERNELS: &[&str] = &[
    "relu_forward_f32",
    "relu_backward_f32",
    "fork_backward_f32",
    "batch_norm_stats_f32",
    "batch_norm_relu_apply_f32",
    "batch_norm_eval_invstd",
    "batch_norm_relu_backward_reduce_f32",
    "batch_norm_relu_backward_apply_f32",
    "concat_forward_f32",
    "concat_backward_f32",
    "cross_entropy_forward_backward",
    "sgd_step",
];

impl Gpu {
    /// Opens device `ordinal`, its cuDNN and cuBLAS handles, and loads the kernels.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        driver_present()?;
        let count = CudaContext::device_count()
            .map_err(|e| anyhow::anyhow!("cannot query CUDA devices: {e}"))?;
        if count == 0 {
            bail!("the NVIDIA driver reports no CUDA device; use --device cpu");
        }
        if ordinal >= count as usize {
            bail!(
                "--device cuda:{ordinal}: this machine has {count} CUDA device(s), numbered from 0"
            );
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow::anyhow!("cannot open CUDA device {ordinal}: {e}"))?;
        // SAFETY: called before any buffer or stream exists; this backend orders its own work
        // on one stream, so cudarc's per-buffer events are not needed (and would serialise
        // branches writing disjoint slices of one buffer).
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow::anyhow!("cannot create a CUDA stream: {e}"))?;
        cudnn_present()?;
        let dnn = dnn::Dnn::new(stream.cu_stream() as _)?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| anyhow::anyhow!("cannot start cuBLAS: {e}"))?;
        let mut funcs = HashMap::new();
        for (module, src) in ptx::PTX {
            let m = ctx.load_module(cudarc::nvrtc::Ptx::from_src(*src)).map_err(|e| {
                let isa = src.lines().find(|l| l.starts_with(".version")).unwrap_or("?");
                anyhow::anyhow!(
                    "cannot load the {module} kernels ({e}); they are PTX {isa} and the driver supports CUDA {}: update the NVIDIA driver, or rebuild with an older CUDA toolkit/NVRTC",
                    driver_version().unwrap_or_else(|_| "?".into())
                )
            })?;
            for name in KERNELS {
                if let Ok(f) = m.load_function(name) {
                    funcs.insert(name.to_string(), f);
                }
            }
        }
        if let Some(missing) = KERNELS.iter().find(|k| !funcs.contains_key(**k)) {
            bail!("kernel {missing} is missing from the embedded PTX; the build is inconsistent");
        }
        let alloc = |e| anyhow::anyhow!("CUDA allocation failed: {e}");
        let workspace = stream.alloc_zeros::<u8>(1).map_err(alloc)?;
        let bn_scratch = (
            stream.alloc_zeros::<f64>(1).map_err(alloc)?,
            stream.alloc_zeros::<i32>(1).map_err(alloc)?,
        );
        Ok(Gpu {
            ctx,
            stream,
            dnn: Mutex::new(dnn),
            blas,
            funcs,
            workspace: Mutex::new(workspace),
            bn_scratch: Mutex::new(bn_scratch),
            error: Mutex::new(None),
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for all queued work and reports any failure.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| anyhow::anyhow!("CUDA error: {e}"))?;
        self.take_error()
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

/// What `incept info` prints: driver, devices, cuDNN, and whether the kernels load.
pub fn info() -> String {
    let mut out = String::new();
    let mut line = |s: String| {
        out.push_str(&s);
        out.push('\n');
    };
    line(format!(
        "build: CUDA backend (cudarc {}), kernels: {}",
        "0.19.10",
        ptx::PTX
            .iter()
            .map(|(m, _)| *m)
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let loaded = libs::preload();
    if !loaded.is_empty() {
        line(format!(
            "preloaded: {}",
            loaded
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let Err(e) = driver_present() {
        line(format!("driver: {e}"));
        return out;
    }
    line(format!(
        "driver: CUDA {}",
        driver_version().unwrap_or_else(|e| e.to_string())
    ));
    match CudaContext::device_count() {
        Ok(n) => line(format!("devices: {n}")),
        Err(e) => line(format!("devices: cannot query ({e})")),
    }
    match cudnn_present() {
        Ok(()) => line(format!("cuDNN: {}", dnn::Dnn::version())),
        Err(e) => line(format!("cuDNN: {e}")),
    }
    match Gpu::new(0) {
        Ok(g) => line(format!("cuda:0: {}; kernels load", g.describe())),
        Err(e) => line(format!("cuda:0: {e:#}")),
    }
    out
}
