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
//! `loss`, `optim`, with the products in `matmul`), each named as the op; the trait's
//! implementation below is their index.

use super::{Backend, BatchNormCfg, Conv2d, Elem, MaxPool2d, Nhwc, Sgd};

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
    rows: usize,
    c: usize,
    f: impl Fn(usize, &mut [A]) + Sync,
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

impl<T: Elem> Backend<T> for Cpu {
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

    fn conv2d_forward(
        &self,
        y: &mut Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        b: &Vec<T>,
        xs: Nhwc,
        conv: &Conv2d,
    ) {
        conv::conv2d_forward(y, x, w, b, xs, conv)
    }

    fn conv2d_batch_norm_relu_forward_eval(
        &self,
        y: &mut Vec<T>,
        x: &Vec<T>,
        (w, b): (&Vec<T>, &Vec<T>),
        (gamma, beta, running_mean, running_var): (&Vec<T>, &Vec<T>, &Vec<T>, &Vec<T>),
        xs: Nhwc,
        conv: &Conv2d,
        cfg: &BatchNormCfg,
    ) -> bool {
        conv::conv2d_batch_norm_relu_forward_eval(
            y,
            x,
            (w, b),
            (gamma, beta, running_mean, running_var),
            xs,
            conv,
            cfg,
        )
    }

    fn conv2d_backward(
        &self,
        dx: Option<&mut Vec<T>>,
        dw: &mut Vec<T>,
        db: &mut Vec<T>,
        dy: &Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        xs: Nhwc,
        conv: &Conv2d,
    ) {
        conv::conv2d_backward(dx, dw, db, dy, x, w, xs, conv)
    }

    fn batch_norm_forward_train(
        &self,
        y: &mut Vec<T>,
        mean: &mut Vec<T>,
        invstd: &mut Vec<T>,
        running_mean: &mut Vec<T>,
        running_var: &mut Vec<T>,
        x: &Vec<T>,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) -> anyhow::Result<()> {
        batch_norm::batch_norm_forward_train(
            y,
            mean,
            invstd,
            running_mean,
            running_var,
            x,
            gamma,
            beta,
            xs,
            cfg,
        )
    }

    fn batch_norm_relu_forward_train(
        &self,
        y: &mut Vec<T>,
        mean: &mut Vec<T>,
        invstd: &mut Vec<T>,
        running_mean: &mut Vec<T>,
        running_var: &mut Vec<T>,
        x: &Vec<T>,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) -> anyhow::Result<()> {
        batch_norm::batch_norm_relu_forward_train(
            y,
            mean,
            invstd,
            running_mean,
            running_var,
            x,
            gamma,
            beta,
            xs,
            cfg,
        )
    }

    fn batch_norm_forward_eval(
        &self,
        y: &mut Vec<T>,
        x: &Vec<T>,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        running_mean: &Vec<T>,
        running_var: &Vec<T>,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) {
        batch_norm::batch_norm_forward_eval(y, x, gamma, beta, running_mean, running_var, xs, cfg)
    }

    fn batch_norm_relu_forward_eval(
        &self,
        y: &mut Vec<T>,
        x: &Vec<T>,
        gamma: &Vec<T>,
        beta: &Vec<T>,
        running_mean: &Vec<T>,
        running_var: &Vec<T>,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) {
        batch_norm::batch_norm_relu_forward_eval(
            y,
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            xs,
            cfg,
        )
    }

    fn batch_norm_backward(
        &self,
        dx: &mut Vec<T>,
        dgamma: &mut Vec<T>,
        dbeta: &mut Vec<T>,
        dy: &Vec<T>,
        x: &Vec<T>,
        gamma: &Vec<T>,
        mean: &Vec<T>,
        invstd: &Vec<T>,
        xs: Nhwc,
    ) {
        batch_norm::batch_norm_backward(dx, dgamma, dbeta, dy, x, gamma, mean, invstd, xs)
    }

    fn batch_norm_relu_backward(
        &self,
        dx: &mut Vec<T>,
        dgamma: &mut Vec<T>,
        dbeta: &mut Vec<T>,
        dy: &mut Vec<T>,
        y: &Vec<T>,
        x: &Vec<T>,
        gamma: &Vec<T>,
        mean: &Vec<T>,
        invstd: &Vec<T>,
        xs: Nhwc,
    ) {
        batch_norm::batch_norm_relu_backward(dx, dgamma, dbeta, dy, y, x, gamma, mean, invstd, xs)
    }

    fn relu_forward(&self, y: &mut Vec<T>, x: &Vec<T>) {
        elementwise::relu_forward(y, x)
    }

    fn relu_backward(&self, dy: &mut Vec<T>, y: &Vec<T>) {
        elementwise::relu_backward(dy, y)
    }

    fn max_pool2d_forward(&self, y: &mut Vec<T>, x: &Vec<T>, xs: Nhwc, pool: &MaxPool2d) {
        pool::max_pool2d_forward(y, x, xs, pool)
    }

    fn max_pool2d_backward(
        &self,
        dx: &mut Vec<T>,
        dy: &Vec<T>,
        x: &Vec<T>,
        y: &Vec<T>,
        xs: Nhwc,
        pool: &MaxPool2d,
    ) {
        pool::max_pool2d_backward(dx, dy, x, y, xs, pool)
    }

    fn fork_backward(&self, dx: &mut Vec<T>, parts: &[&Vec<T>]) {
        concat::fork_backward(dx, parts)
    }

    fn concat_forward(&self, y: &mut Vec<T>, parts: &[&Vec<T>], channels: &[usize]) {
        concat::concat_forward(y, parts, channels)
    }

    fn concat_backward(&self, dparts: &mut [&mut Vec<T>], dy: &Vec<T>, channels: &[usize]) {
        concat::concat_backward(dparts, dy, channels)
    }

    fn avg_pool2d_forward(&self, y: &mut Vec<T>, x: &Vec<T>, xs: Nhwc) {
        pool::avg_pool2d_forward(y, x, xs)
    }

    fn avg_pool2d_backward(&self, dx: &mut Vec<T>, dy: &Vec<T>, xs: Nhwc) {
        pool::avg_pool2d_backward(dx, dy, xs)
    }

    fn linear_forward(
        &self,
        y: &mut Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        b: &Vec<T>,
        n: usize,
        fin: usize,
        fout: usize,
    ) {
        conv::linear_forward(y, x, w, b, n, fin, fout)
    }

    fn linear_backward(
        &self,
        dx: Option<&mut Vec<T>>,
        dw: &mut Vec<T>,
        db: &mut Vec<T>,
        dy: &Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        n: usize,
        fin: usize,
        fout: usize,
    ) {
        conv::linear_backward(dx, dw, db, dy, x, w, n, fin, fout)
    }

    fn cross_entropy_forward(
        &self,
        probs: &mut Vec<T>,
        logits: &Vec<T>,
        labels: &[u32],
        k: usize,
        smoothing: f64,
    ) -> f64 {
        loss::cross_entropy_forward(probs, logits, labels, k, smoothing)
    }

    fn cross_entropy_backward(
        &self,
        dlogits: &mut Vec<T>,
        probs: &Vec<T>,
        labels: &[u32],
        k: usize,
        smoothing: f64,
    ) {
        loss::cross_entropy_backward(dlogits, probs, labels, k, smoothing)
    }

    fn sgd_step(
        &self,
        param: &mut Vec<T>,
        grad: &Vec<T>,
        momentum_buf: &mut Vec<T>,
        first_step: bool,
        opt: &Sgd,
    ) {
        optim::sgd_step(param, grad, momentum_buf, first_step, opt)
    }
}
