//! Finding NVIDIA's libraries where they usually are, before cudarc opens them by name.
//!
//! cudarc loads `libcuda`, `libcudnn`, `libcublas` by their plain names, which finds only what
//! the system library path holds. GPU machines often have cuDNN and cuBLAS only as Python
//! wheels (`nvidia-cudnn-cu12`, installed with PyTorch) or under `CUDA_HOME`. Opening those
//! files by full path first, with `RTLD_GLOBAL`, makes the later by-name lookups find them.

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Library folders to search, most specific first.
pub fn search_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            dirs.push(PathBuf::from(&home).join("lib64"));
            dirs.push(PathBuf::from(&home).join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    for site in site_packages() {
        for pkg in ["cuda_runtime", "cublas", "cuda_nvrtc", "cudnn", "nvtx"] {
            dirs.push(site.join("nvidia").join(pkg).join("lib"));
        }
    }
    dirs.retain(|d| d.is_dir());
    dirs.dedup();
    dirs
}

/// Python package folders: the active virtual or conda environment, the user's and the
/// system's, for every python3.X found.
fn site_packages() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(p) = std::env::var_os(var) {
            roots.push(PathBuf::from(p).join("lib"));
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        roots.push(PathBuf::from(home).join(".local/lib"));
    }
    roots.push(PathBuf::from("/usr/local/lib"));
    roots.push(PathBuf::from("/usr/lib"));
    roots.push(PathBuf::from("/opt/conda/lib"));
    let mut out = Vec::new();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with("python3") {
                for sub in ["site-packages", "dist-packages"] {
                    let p = e.path().join(sub);
                    if p.is_dir() {
                        out.push(p);
                    }
                }
            }
        }
    }
    out
}

/// Shared libraries of `dir` whose names start with one of `prefixes`.
fn libraries(dir: &Path, prefixes: &[&str]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().to_string())
                .unwrap_or_default();
            name.contains(".so") && prefixes.iter().any(|pre| name.starts_with(pre))
        })
        .collect();
    v.sort();
    v
}

/// Opens the runtime, cuBLAS, NVRTC, cuDNN and NVTX libraries found in [`search_dirs`] (once per
/// process) and returns the files opened. cuDNN's parts depend on each other, so files that
/// fail are retried until a round opens nothing new.
pub fn preload() -> &'static [PathBuf] {
    static LOADED: OnceLock<Vec<PathBuf>> = OnceLock::new();
    LOADED.get_or_init(|| {
        let mut pending: Vec<PathBuf> = search_dirs()
            .iter()
            .flat_map(|d| {
                libraries(
                    d,
                    &[
                        "libcudart",
                        "libcublasLt",
                        "libcublas",
                        "libnvrtc",
                        "libcudnn",
                        "libnvToolsExt",
                    ],
                )
            })
            .collect();
        let mut opened = Vec::new();
        loop {
            let before = pending.len();
            pending.retain(|p| {
                // SAFETY: these are NVIDIA's own libraries; their initialisers have no
                // preconditions. The handle is leaked on purpose: the library must stay
                // loaded for the life of the process.
                match unsafe { Library::open(Some(p), RTLD_NOW | RTLD_GLOBAL) } {
                    Ok(lib) => {
                        std::mem::forget(lib);
                        opened.push(p.clone());
                        false
                    }
                    Err(_) => true,
                }
            });
            if pending.is_empty() || pending.len() == before {
                break;
            }
        }
        opened
    })
}
