//! # incept
//!
//! Trains the Inception-style CNN of the seed article (`InceptionNetSmall`) on CIFAR-10.
//!
//! ## Map
//! - [`model`]: the network as data ([`model::ModelSpec`]: layers, Inception blocks, branches,
//!   PyTorch module names) and [`model::net::Net`], the network instantiated on a backend.
//! - [`backend`]: the op families ([`backend::ops`]) gathered by [`backend::Backend`], and the
//!   CPU implementation [`backend::cpu::Cpu`] (NHWC, rayon; im2col + GEMM convolutions as the
//!   reference, direct AVX-512 and Winograd kernels as the fast path on CPUs that have it);
//!   with the `cudnn` feature, `backend::cuda::Gpu` (cuDNN, cuBLAS, the kernels of `cuda/`).
//! - [`schedule`]: runs the branches of each Inception block, in sequence or concurrently; the
//!   network also tells the backend where each branch forks and joins, which the CUDA backend
//!   turns into one stream per branch with events between them.
//! - [`stepper`]: how the training loop runs a step: batches built on the host or, on CUDA,
//!   on the GPU from the resident training set; issued op by op, or replayed as a CUDA graph.
//! - [`checkpoint`]: safetensors files with PyTorch's names and shapes (NCHW/OIHW).
//! - [`train`]: the training loop (epochs, LR schedule `train::lr`, eval, metrics, checkpoints
//!   that resume exactly); [`report`] draws a run's curves.
//! - [`mod@bench`]: the `incept bench` measurements.
//! - [`data`]: CIFAR-10 binary files (memory-mapped, validated), augmented NHWC batches,
//!   synthetic data for tests, `incept data check`, and the verified download.
//! - [`dist`]: data parallelism: the rank, world size and meeting point a launcher (torchrun,
//!   Slurm, MPI) put in the environment, and the collectives over TCP.
//!
//! ## One training step
//! 1. The batch (NHWC) is uploaded to the backend (or rendered there by the data kernel).
//! 2. Forward: each layer writes its own output; an Inception block hands its input to the
//!    scheduler, which runs the four branches, then joins their outputs along channels.
//! 3. Loss: softmax cross-entropy, mean over the batch.
//! 4. Backward: the same walk reversed; a block splits the gradient of its output among the
//!    branches, runs them, and sums their input gradients in branch order.
//! 5. SGD with momentum (PyTorch semantics) updates every parameter; in mixed precision the
//!    gradients are first unscaled and checked, and an overflowed step is skipped.
//!
//! A BatchNorm followed by a ReLU runs as one fused op; activations are fp32 on the CPU and
//! fp16/bf16 or fp32 on CUDA (`Buffers::act_zeros`).

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod dist;
pub mod layout;
pub mod model;
pub mod report;
pub mod schedule;
pub mod stepper;
pub mod train;

/// A training step allocates and frees the same large buffers every time. glibc would return
/// each one to the kernel (mmap above 128 KiB, heap trimming), so every step pays page faults and
/// zeroing again for memory it just gave back: about a tenth of a CPU step. This keeps freed
/// memory in the heap instead, so the step's working set is reused from the second step on.
/// The binary calls it first thing; so do the benchmarks.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_memory() {
    // 32 MiB is the largest mmap threshold glibc accepts on 64-bit.
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// No allocator tuning outside glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_memory() {}
