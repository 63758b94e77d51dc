//! `incept info`: what this build has, and what it finds on this machine.

use std::process::ExitCode;

/// Prints the build, the CPU and, in the CUDA build, every NVIDIA library and device. Exits
/// with status 1 when the CUDA build finds no usable GPU, so scripts can test for one.
pub fn run() -> ExitCode {
    println!("incept {}", env!("CARGO_PKG_VERSION"));
    println!("cpu: {} threads", rayon::current_num_threads());
    #[cfg(feature = "cudnn")]
    {
        let (text, usable) = incept::backend::cuda::info();
        print!("{text}");
        if !usable {
            return ExitCode::FAILURE;
        }
    }
    #[cfg(not(feature = "cudnn"))]
    println!("cuda: not in this build (rebuild with `cargo build --release --features cudnn`)");
    ExitCode::SUCCESS
}
