//! The NVIDIA driver and libraries as the command line sees them: whether a CUDA device can be
//! used (checked before any data is read), what `incept info` prints, and whether the embedded
//! PTX defines every kernel of `cuda/*.cu`.

use super::libs::{self, Lib};
use super::nvtx;
use super::Gpu;
use anyhow::{bail, Result};
use cudarc::driver::CudaContext;

/// The PTX of every `cuda/*.cu`, compiled by build.rs: `PTX: &[(module, source)]`, and the
/// cubins assembled from it.
pub(crate) mod ptx {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
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
pub(crate) fn driver_version() -> Result<String> {
    let mut v = 0;
    // SAFETY: a pure query after the library was found.
    let r = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if r != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
        bail!("cuDriverGetVersion failed: {r:?}");
    }
    Ok(format!("{}.{}", v / 1000, v % 1000 / 10))
}

/// The embedded cubin of `module` for a GPU of compute capability `major.minor`: one assembled
/// for the same major version and a minor version up to the GPU's (sm_80 code runs on 8.6 and
/// 8.9; 9.0 needs sm_90), the newest such.
pub(crate) fn matching_cubin(module: &str, major: u32, minor: u32) -> Option<&'static [u8]> {
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
    // Every kernel of cuda/*.cu, as the host build of the same sources registers them.
    let mut missing: Vec<String> = kernel_emu::kernels()
        .iter()
        .map(|k| k.name.to_string())
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
            let Some(name) = line.split(".entry ").nth(1).and_then(|rest| rest.split('(').next())
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
            archs.iter().map(|a| format!("sm_{a}")).collect::<Vec<_>>().join(", ")
        }
    ));
    let libraries = libs::libraries();
    for lib in Lib::ALL {
        let found = libraries.get(lib);
        let mut l = found.describe(&libraries.places);
        if found.file.is_some() && !cudarc_finds(lib) {
            l.push_str("; but cudarc cannot open it by name (unsupported soname)");
        }
        // NCCL is called through this handle alone: every function the ranks use must be in it.
        if lib == Lib::Nccl && found.file.is_some() {
            match super::real::nccl::available() {
                Ok(()) => l.push_str("; every function data parallelism calls is present"),
                Err(e) => l.push_str(&format!("; unusable: {e:#}")),
            }
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
