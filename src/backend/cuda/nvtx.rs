//! NVTX ranges for Nsight: layers, branches, blocks and steps appear by name on the profiler's
//! timeline (`--profile-steps` limits the capture to chosen steps).
//!
//! NVIDIA's NVTX 3 is compiled in by build.rs (cuda/nvtx.c). It needs no library at run time:
//! the profiler names its injection library in `NVTX_INJECTION64_PATH` and NVTX 3 loads it on
//! the first range. Without a profiler the ranges are skipped here altogether, so training pays
//! nothing for them.

#[cfg(incept_nvtx)]
mod ffi {
    use std::ffi::{c_char, c_int};
    extern "C" {
        pub fn incept_nvtx_range_push(name: *const c_char) -> c_int;
        pub fn incept_nvtx_range_pop() -> c_int;
    }
}

/// The injection library a profiler set, if one did.
fn injection() -> Option<std::ffi::OsString> {
    std::env::var_os("NVTX_INJECTION64_PATH").filter(|p| !p.is_empty())
}

/// Whether ranges reach a profiler in this process.
pub fn active() -> bool {
    cfg!(incept_nvtx) && injection().is_some()
}

/// What `incept info` says about NVTX.
pub fn status() -> String {
    match (cfg!(incept_nvtx), injection()) {
        (false, _) => {
            "not compiled in (build.rs found no nvtx3 headers: install the nvidia-nvtx wheel or set CUDA_HOME, and rebuild)".into()
        }
        (true, None) => "NVTX 3 compiled in; inactive (no profiler: nsys and ncu set NVTX_INJECTION64_PATH)".into(),
        (true, Some(p)) => format!(
            "NVTX 3 compiled in; active (profiler injection {})",
            std::path::Path::new(&p).display()
        ),
    }
}

/// Opens a range named `name` (nested in the current one).
pub fn push(name: &str) {
    #[cfg(incept_nvtx)]
    if let Ok(c) = std::ffi::CString::new(name) {
        // SAFETY: a NUL-terminated string that outlives the call (NVTX copies it).
        unsafe { ffi::incept_nvtx_range_push(c.as_ptr()) };
    }
    #[cfg(not(incept_nvtx))]
    let _ = name;
}

/// Closes the innermost range.
pub fn pop() {
    // SAFETY: no arguments; NVTX ignores a pop without a push.
    #[cfg(incept_nvtx)]
    unsafe {
        ffi::incept_nvtx_range_pop()
    };
}
