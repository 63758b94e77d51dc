//! The CPU reference backend: the specification every other backend is checked against.
//!
//! Plain loops over NHWC buffers, parallel with rayon where the work splits into independent
//! rows, and GEMMs from the `gemm` crate; on CPUs with AVX-512, f32 convolutions run the
//! direct kernels of [`direct`] instead of im2col + GEMM (`INCEPT_CPU_CONV=reference` turns
//! them off). Every reduction runs over fixed chunks summed in a fixed order (finished in
//! `f64`), so results never depend on the number of threads or on which thread ran what: the
//! branch scheduler relies on that for its bitwise-equality guarantee.
//!
//! The ops live in files by family (`conv`, `batch_norm`, `pool`, `concat`, `elementwise`,
//! `loss`, `optim`, with the products in `matmul`), each implementing the family's trait of
//! [`super::ops`].

use super::{
    Affine, Backend, BatchNormCfg, BatchNormOps, BatchNormSync, BatchStats, Buffers, ConcatOps,
    Conv2d, ConvOps, Elem, ElementwiseOps, LossOps, MaxPool2d, Nhwc, OptimOps, PoolOps,
    RunningStats, Sgd,
};

#[cfg(target_arch = "x86_64")]
pub mod direct;
#[cfg(target_arch = "x86_64")]
pub mod winograd;
use rayon::prelude::*;

mod batch_norm;
mod concat;
mod conv;
mod elementwise;
mod loss;
mod matmul;
mod optim;
mod pool;

#[cfg(target_arch = "x86_64")]
pub use conv::direct_enabled;
pub use conv::{
    add_ohwi_to_oihw, col2im, conv2d_backward_data_reference, conv2d_backward_weight_reference,
    conv2d_forward_reference, conv_kernels, im2col, weight_oihw_to_ohwi, ConvKernel,
};
pub(crate) use matmul::gemm_on;
pub use matmul::{matmul, matmul_long_k};
pub use pool::max_pool2d_argmax;

// Shared between the families.
use elementwise::{relu, relu_grad};

/// The CPU backend. Stateless: threads come from the current rayon pool.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// Rows per chunk of a per-channel reduction. Fixed (never derived from the thread count) so
/// that the order of the partial sums, and hence the rounding, is always the same.
const REDUCE_ROWS: usize = 512;

/// Rows summed in the element type before [`channel_sums`] moves the sums to `f64`.
const FLUSH_ROWS: usize = 8;

/// Fewest rows per rayon task in per-row elementwise loops: one row (16–256 channels) is too
/// little work to be worth a task of its own.
const ELEMENTWISE_ROWS: usize = 64;

/// `K` per-channel sums of `f(row)` over the rows of an `[rows, c]` matrix, in a fixed order:
/// chunks of [`REDUCE_ROWS`] rows summed in parallel, then the chunk sums in order. Within a
/// chunk, `f(row, acc)` adds a row's terms into `T` accumulators laid out `[K][c]` (so the
/// loops run across channels in SIMD lanes); every [`FLUSH_ROWS`] rows they are added into
/// `f64` sums and cleared. Rounding stays that of short `T` sums plus `f64` sums: as exact as
/// summing in `f64` throughout for all the training dynamics can tell, at the speed of `T`.
fn channel_sums<A: Elem, const K: usize>(
    rows: usize, c: usize, f: impl Fn(usize, &mut [A]) + Sync,
) -> [Vec<f64>; K] {
    let chunks = rows.div_ceil(REDUCE_ROWS);
    let partial: Vec<Vec<f64>> = (0..chunks)
        .into_par_iter()
        .map(|ch| {
            let mut wide = vec![0.0f64; K * c];
            let mut acc = vec![A::zero(); K * c];
            let end = ((ch + 1) * REDUCE_ROWS).min(rows);
            for r0 in (ch * REDUCE_ROWS..end).step_by(FLUSH_ROWS) {
                for r in r0..(r0 + FLUSH_ROWS).min(end) {
                    f(r, &mut acc);
                }
                for (w, a) in wide.iter_mut().zip(acc.iter_mut()) {
                    *w += a.as_f64();
                    *a = A::zero();
                }
            }
            wide
        })
        .collect();
    std::array::from_fn(|j| {
        let mut total = vec![0.0f64; c];
        for p in &partial {
            for (t, v) in total.iter_mut().zip(&p[j * c..(j + 1) * c]) {
                *t += v;
            }
        }
        total
    })
}

impl<T: Elem> Buffers<T> for Cpu {
    type Buf = Vec<T>;

    fn zeros(&self, len: usize) -> Vec<T> {
        vec![T::zero(); len]
    }
    fn upload(&self, data: &[T]) -> Vec<T> {
        data.to_vec()
    }
    fn download(&self, buf: &Vec<T>) -> Vec<T> {
        buf.clone()
    }
    fn fill_zero(&self, buf: &mut Vec<T>) {
        buf.fill(T::zero());
    }
}

/// The ops are in the family files; one thread issues everything, with no streams.
impl<T: Elem> Backend<T> for Cpu {}
