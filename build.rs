//! With the `cudnn` feature, compiles every `cuda/*.cu` to PTX in OUT_DIR (`<stem>.ptx`) and
//! writes `OUT_DIR/kernels.rs`, which the CUDA backend includes:
//!
//! ```ignore
//! pub const PTX: &[(&str, &str)] = &[("concat", include_str!(...)), ...]; // (module, PTX)
//! pub const PTX_ISA: &str = "8.7";        // `.version` line of the PTX
//! pub const PTX_MIN_DRIVER: i32 = 12080;  // oldest driver (cuDriverGetVersion) that loads it
//! pub const PTX_ARCH: &str = "compute_80";
//! pub const PTX_COMPILER: &str = "NVRTC 12.8 (/path/libnvrtc.so.12)";
//! pub const CUBIN: &[(&str, u32, &[u8])] = &[("concat", 80, include_bytes!(...)), ...];
//! ```
//!
//! Where `ptxas` is found (CUDA toolkit, or the pip wheel `nvidia-cuda-nvcc-cu12`), each PTX is
//! also assembled for the real GPUs of `INCEPT_CUBIN_ARCHS` (default `sm_80 sm_90`): the
//! backend loads the cubin matching the GPU, which needs no JIT at start-up and no driver that
//! knows the PTX's ISA version, and falls back to the PTX for other GPUs.
//!
//! Without the feature it does nothing and needs nothing.
//!
//! Compiler: `nvcc` (CUDA toolkit) if found, else NVRTC loaded at build time with libloading:
//! from a toolkit, or from the pip wheels `nvidia-cuda-nvrtc-cu12` + `nvidia-cuda-runtime-cu12`
//! (headers) in the site-packages of `$INCEPT_PYTHON` or `python3`. How they are found and run
//! lives in the `ptx-build` crate (with its tests); this script says what to build. Environment:
//!
//! | variable | meaning |
//! | --- | --- |
//! | `INCEPT_CUDA_ARCH` | virtual architecture, default `compute_80` (PTX that JITs on sm_80+) |
//! | `INCEPT_PTX_COMPILER` | `nvcc` or `nvrtc` to force one (default: nvcc if found) |
//! | `INCEPT_NVRTC` | path of a libnvrtc.so (or its folder) to use |
//! | `INCEPT_PYTHON` | interpreter (e.g. a venv's) whose site-packages hold the NVIDIA wheels |
//! | `CUDA_HOME`, `CUDA_PATH` | CUDA toolkit root (`bin/nvcc`, `lib64/libnvrtc.so`, `include/`) |
//! | `INCEPT_CUBIN_ARCHS` | real architectures to assemble cubins for (default `sm_80 sm_90`; empty: none) |
//! | `INCEPT_PTXAS` | the `ptxas` to use |

use ptx_build::{locate, Compiler};
use std::env;
use std::fs;
use std::path::PathBuf;
use std::process;

const ENV_VARS: &[&str] = &[
    "INCEPT_CUDA_ARCH",
    "INCEPT_PTX_COMPILER",
    "INCEPT_NVRTC",
    "INCEPT_PYTHON",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
    "INCEPT_CUBIN_ARCHS",
    "INCEPT_PTXAS",
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDNN").is_none() {
        return;
    }
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if let Err(msg) = build_kernels() {
        eprintln!("\nerror: {msg}\n");
        process::exit(1);
    }
    build_nvtx();
}

/// Compiles cuda/nvtx.c against NVIDIA's header-only NVTX 3 (the CUDA toolkit's
/// `include/nvtx3`, or the `nvidia-nvtx` wheel's) and sets `cfg(incept_nvtx)`; without the
/// headers the binary is built without profiler ranges, and `incept info` says so.
fn build_nvtx() {
    println!("cargo:rustc-check-cfg=cfg(incept_nvtx)");
    println!("cargo:rerun-if-changed=cuda/nvtx.c");
    let mut dirs: Vec<PathBuf> =
        locate::toolkit_roots().into_iter().map(|(_, root)| root.join("include")).collect();
    for site in locate::site_packages(&mut Vec::new()) {
        for sub in ["nvidia/nvtx/include", "nvidia/cu13/include", "nvidia/cuda_runtime/include"] {
            dirs.push(site.join(sub));
        }
    }
    let Some(dir) = dirs.into_iter().find(|d| d.join("nvtx3/nvToolsExt.h").is_file()) else {
        println!(
            "cargo:warning=incept: NVTX 3 headers (nvtx3/nvToolsExt.h) not found under $CUDA_HOME/include or the nvidia-nvtx wheel: building without profiler ranges"
        );
        return;
    };
    cc::Build::new().file("cuda/nvtx.c").include(&dir).warnings(false).compile("incept_nvtx");
    // NVTX 3 loads the profiler's injection library with dlopen.
    println!("cargo:rustc-link-lib=dl");
    println!("cargo:rustc-cfg=incept_nvtx");
    println!("cargo:warning=incept: NVTX 3 ranges from {}", dir.display());
}

/// cuda/*.cu → PTX (and cubins where ptxas is found) in OUT_DIR, and OUT_DIR/kernels.rs.
fn build_kernels() -> Result<(), String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let cuda_dir = manifest.join("cuda");
    let arch = ptx_build::target_arch(&env::var("INCEPT_CUDA_ARCH").unwrap_or_default())?;

    println!("cargo:rerun-if-changed={}", cuda_dir.display());
    let mut sources = Vec::new();
    if cuda_dir.is_dir() {
        let entries = fs::read_dir(&cuda_dir)
            .map_err(|e| format!("cannot list {}: {e}", cuda_dir.display()))?;
        for entry in entries {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_file() {
                println!("cargo:rerun-if-changed={}", path.display());
                if path.extension().is_some_and(|ext| ext == "cu") {
                    sources.push(path);
                }
            }
        }
    }
    sources.sort();

    let compiler = if sources.is_empty() {
        None
    } else {
        Some(Compiler::find(&env::var("INCEPT_PTX_COMPILER").unwrap_or_default())?)
    };
    let compiled = match &compiler {
        Some(c) => ptx_build::compile_all(c, &sources, &cuda_dir, &out_dir, &arch)?,
        None => Vec::new(),
    };
    ptx_build::remove_stale_ptx(&out_dir, &compiled);
    // Warnings of a successful compile, shown by cargo (at most 20 lines a file).
    for ptx in &compiled {
        for line in ptx.log.lines().filter(|l| !l.trim().is_empty()).take(20) {
            println!("cargo:warning=cuda/{}.cu: {line}", ptx.stem);
        }
    }

    let mut isas: Vec<&str> = compiled.iter().map(|p| p.isa.as_str()).collect();
    isas.sort();
    isas.dedup();
    let isa = isas.join(",");
    let compiler_name = compiler.as_ref().map_or("none".to_string(), Compiler::describe);
    let archs = env::var("INCEPT_CUBIN_ARCHS").unwrap_or_else(|_| "sm_80 sm_90".into());
    let cubins = ptx_build::assemble_cubins(&out_dir, &compiled, &archs)?;
    let rs = ptx_build::kernels_rs(&compiled, &isa, &arch, &compiler_name, &cubins);
    let path = out_dir.join("kernels.rs");
    fs::write(&path, rs).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    if compiled.is_empty() {
        println!("cargo:warning=incept: no cuda/*.cu to compile; the PTX table is empty");
    } else {
        println!(
            "cargo:warning=incept: {} cuda/*.cu -> PTX ISA {isa} for {arch} with {compiler_name}",
            compiled.len()
        );
    }
    Ok(())
}
