//! Compiles every `../cuda/*.cu` as host C++20 with `-DINCEPT_EMU` (cuda/emu.h stands in for
//! the CUDA built-ins, `shim/` for the toolkit's fp16/bf16 headers), plus the extern "C" launch
//! wrappers of `src/launch.cpp`, into one static library.

use std::path::PathBuf;

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let cuda = here.join("../cuda");
    let shim = here.join("shim");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/launch.cpp");
    println!("cargo:rerun-if-changed={}", shim.display());
    // A directory: cargo rescans it, so adding, editing or removing a kernel rebuilds.
    println!("cargo:rerun-if-changed={}", cuda.display());

    let mut kernels: Vec<PathBuf> = std::fs::read_dir(&cuda)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", cuda.display()))
        .map(|entry| entry.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    kernels.sort();
    assert!(!kernels.is_empty(), "no .cu files in {}", cuda.display());

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++20")
        .define("INCEPT_EMU", None)
        .include(&cuda)
        .include(&shim)
        // Treat .cu as C++; IEEE float as written (no FMA contraction), type punning of the
        // vectorised copies, threads for the emulated blocks.
        .flag("-x")
        .flag("c++")
        .flag("-ffp-contract=off")
        .flag("-fno-strict-aliasing")
        .flag("-pthread")
        .warnings(true)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-unknown-pragmas");
    for k in &kernels {
        build.file(k);
    }
    build.file(here.join("src/launch.cpp"));
    build.compile("incept_kernel_emu");
}
