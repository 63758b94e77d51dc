//! The CPU reference backend: the specification every other backend is checked against.
//!
//! Plain loops over NHWC buffers, parallel with rayon where the work splits into independent
//! rows, and GEMMs from the `gemm` crate; on CPUs with AVX-512, f32 convolutions run the
//! direct kernels of [`direct`] instead of im2col + GEMM (`INCEPT_CPU_CONV=reference` turns
//! them off). Every reduction runs over fixed chunks summed in a fixed order (finished in
//! `f64`), so results never depend on the number of threads or on which thread ran what: the
//! branch scheduler relies on that for its bitwise-equality guarantee.

use super::{Backend, BatchNormCfg, Conv2d, Elem, MaxPool2d, Nhwc, Sgd};

#[cfg(target_arch = "x86_64")]
pub mod direct;
#[cfg(target_arch = "x86_64")]
pub mod winograd;
use rayon::prelude::*;

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

/// `c (=|+=) a · b` for row-major views given as (slice, row stride, column stride):
/// a is m×k, b is k×n, c is m×n with row stride `c_rs` and unit column stride.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Elem>(
    c: &mut [T],
    c_rs: usize,
    a: (&[T], usize, usize),
    b: (&[T], usize, usize),
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    gemm_on(
        c,
        c_rs,
        a,
        b,
        (m, n, k),
        accumulate,
        gemm::Parallelism::Rayon(0),
    );
}

/// [`matmul`] with the threads to use: the rayon pool, or only the calling thread.
pub(crate) fn gemm_on<T: Elem>(
    c: &mut [T],
    c_rs: usize,
    a: (&[T], usize, usize),
    b: (&[T], usize, usize),
    (m, n, k): (usize, usize, usize),
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, c_rs, 1) < c.len(), "matmul: c too small");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * c_rs..r * c_rs + n].fill(T::zero());
            }
        }
        return;
    }
    assert!(last(m, k, a.1, a.2) < a.0.len(), "matmul: a too small");
    assert!(last(k, n, b.1, b.2) < b.0.len(), "matmul: b too small");
    // SAFETY: the asserts above keep every index the kernel touches inside the three slices,
    // and `c` is borrowed mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            c_rs as isize,
            accumulate,
            a.0.as_ptr(),
            a.2 as isize,
            a.1 as isize,
            b.0.as_ptr(),
            b.2 as isize,
            b.1 as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

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

/// Unfolds the k×k windows of an NHWC image batch into rows:
/// `cols[p, (ky·k + kx)·Cin + ci] = x[n, oy·s + ky − pad, ox·s + kx − pad, ci]` (0 outside),
/// with p the output pixel `(n·Ho + oy)·Wo + ox`. cols: [N·Ho·Wo, k·k·Cin].
pub fn im2col<T: Elem>(cols: &mut [T], x: &[T], xs: Nhwc, conv: &Conv2d) {
    let (ho, wo) = (conv.out_side(xs.h), conv.out_side(xs.w));
    let (k, cin) = (conv.k, xs.c);
    let row_len = k * k * cin;
    cols.par_chunks_mut(row_len)
        .enumerate()
        .for_each(|(p, row)| {
            let (n, oy, ox) = (p / (ho * wo), (p / wo) % ho, p % wo);
            // In NHWC the k pixels of one window row are adjacent: one copy of k·cin values
            // per row (the first layer has cin = 3), zeros where the window leaves the image.
            let x0 = (ox * conv.stride) as isize - conv.pad as isize;
            let kx_lo = (-x0).clamp(0, k as isize) as usize;
            let kx_hi = (xs.w as isize - x0).clamp(0, k as isize) as usize;
            for ky in 0..k {
                let iy = (oy * conv.stride + ky) as isize - conv.pad as isize;
                let dst = &mut row[ky * k * cin..(ky + 1) * k * cin];
                if iy < 0 || iy >= xs.h as isize || kx_lo >= kx_hi {
                    dst.fill(T::zero());
                    continue;
                }
                dst[..kx_lo * cin].fill(T::zero());
                dst[kx_hi * cin..].fill(T::zero());
                let ix = (x0 + kx_lo as isize) as usize;
                let src = ((n * xs.h + iy as usize) * xs.w + ix) * cin;
                dst[kx_lo * cin..kx_hi * cin].copy_from_slice(&x[src..src + (kx_hi - kx_lo) * cin]);
            }
        });
}

/// The adjoint of [`im2col`]: adds every window row back onto the image it came from.
/// dx is overwritten. Parallel over images, whose gradients are disjoint.
pub fn col2im<T: Elem>(dx: &mut [T], dcols: &[T], xs: Nhwc, conv: &Conv2d) {
    let (ho, wo) = (conv.out_side(xs.h), conv.out_side(xs.w));
    let (k, cin) = (conv.k, xs.c);
    let row_len = k * k * cin;
    dx.par_chunks_mut(xs.h * xs.w * cin)
        .enumerate()
        .for_each(|(n, img)| {
            img.fill(T::zero());
            for oy in 0..ho {
                for ox in 0..wo {
                    let row = &dcols[((n * ho + oy) * wo + ox) * row_len..][..row_len];
                    for ky in 0..k {
                        let iy = (oy * conv.stride + ky) as isize - conv.pad as isize;
                        if iy < 0 || iy >= xs.h as isize {
                            continue;
                        }
                        for kx in 0..k {
                            let ix = (ox * conv.stride + kx) as isize - conv.pad as isize;
                            if ix < 0 || ix >= xs.w as isize {
                                continue;
                            }
                            let dst = &mut img[(iy as usize * xs.w + ix as usize) * cin..][..cin];
                            let src = &row[(ky * k + kx) * cin..][..cin];
                            for (d, s) in dst.iter_mut().zip(src) {
                                *d += *s;
                            }
                        }
                    }
                }
            }
        });
}

/// For each output of a max pooling, the flat index into `x` of the value that wins: the
/// first maximum of the window in scan order (row by row), NaN winning, as in PyTorch. Padding
/// counts as −∞, so a window's winner is always a real input.
pub fn max_pool2d_argmax<T: Elem>(x: &[T], xs: Nhwc, pool: &MaxPool2d) -> Vec<u32> {
    let ys = pool.out_shape(xs);
    let c = xs.c;
    assert!(
        xs.len() <= u32::MAX as usize,
        "max_pool2d: input too large for u32 indices"
    );
    let mut argmax = vec![0u32; ys.len()];
    argmax.par_chunks_mut(c).enumerate().for_each(|(p, ar)| {
        let (n, oy, ox) = (p / (ys.h * ys.w), (p / ys.w) % ys.h, p % ys.w);
        let mut best = vec![T::neg_infinity(); c];
        let mut first = true;
        for ky in 0..pool.k {
            let iy = (oy * pool.stride + ky) as isize - pool.pad as isize;
            if iy < 0 || iy >= xs.h as isize {
                continue;
            }
            for kx in 0..pool.k {
                let ix = (ox * pool.stride + kx) as isize - pool.pad as isize;
                if ix < 0 || ix >= xs.w as isize {
                    continue;
                }
                let base = ((n * xs.h + iy as usize) * xs.w + ix as usize) * c;
                for ch in 0..c {
                    let v = x[base + ch];
                    // Strict >: a later equal value never wins. NaN wins, so it propagates.
                    if first || v > best[ch] || v.is_nan() {
                        best[ch] = v;
                        ar[ch] = (base + ch) as u32;
                    }
                }
                first = false;
            }
        }
    });
    argmax
}

/// Calls `f(iy, ix)` for the in-bounds positions of output `(oy, ox)`'s window, row by row.
#[inline]
fn for_window(xs: Nhwc, pool: &MaxPool2d, oy: usize, ox: usize, mut f: impl FnMut(usize, usize)) {
    let y0 = (oy * pool.stride) as isize - pool.pad as isize;
    let x0 = (ox * pool.stride) as isize - pool.pad as isize;
    for iy in y0.max(0)..(y0 + pool.k as isize).min(xs.h as isize) {
        for ix in x0.max(0)..(x0 + pool.k as isize).min(xs.w as isize) {
            f(iy as usize, ix as usize);
        }
    }
}

/// Pieces of the reduction dimension [`matmul_long_k`] cuts: fixed, so the result does not
/// depend on the number of threads.
const K_PIECES: usize = 8;

/// [`matmul`] for a product whose reduction dimension `k` dwarfs `m` and `n` (a weight
/// gradient: `[Cout, k·k·Cin]` summed over every pixel of the batch). The GEMM would split
/// only the small output among the threads; here `k` is cut into `K_PIECES` (8) fixed pieces
/// computed in parallel, then summed in piece order. `a` is `[m, k]` with unit row stride
/// along `k` given by `a.1`/`a.2` as in [`matmul`], likewise `b`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_long_k<T: Elem>(
    c: &mut [T],
    c_rs: usize,
    a: (&[T], usize, usize),
    b: (&[T], usize, usize),
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    if k < K_PIECES * 1024 || k < 8 * m.max(n) {
        return matmul(c, c_rs, a, b, m, n, k, accumulate);
    }
    let piece = k.div_ceil(K_PIECES);
    let parts: Vec<Vec<T>> = (0..K_PIECES)
        .into_par_iter()
        .map(|i| {
            let (k0, k1) = (i * piece, ((i + 1) * piece).min(k));
            let mut part = vec![T::zero(); m * n];
            if k1 > k0 {
                // Columns k0.. of a and rows k0.. of b: offset the slices, same strides.
                gemm_on(
                    &mut part,
                    n,
                    (&a.0[k0 * a.2..], a.1, a.2),
                    (&b.0[k0 * b.1..], b.1, b.2),
                    (m, n, k1 - k0),
                    false,
                    gemm::Parallelism::None,
                );
            }
            part
        })
        .collect();
    for r in 0..m {
        let row = &mut c[r * c_rs..r * c_rs + n];
        if !accumulate {
            row.fill(T::zero());
        }
        for part in &parts {
            for (d, &v) in row.iter_mut().zip(&part[r * n..(r + 1) * n]) {
                *d += v;
            }
        }
    }
}

/// OIHW → O(HW)I, the weight as the `[Cout, k·k·Cin]` matrix that matches [`im2col`]'s rows.
pub fn weight_oihw_to_ohwi<T: Elem>(w: &[T], conv: &Conv2d) -> Vec<T> {
    let (kk, cin) = (conv.k * conv.k, conv.cin);
    let mut out = vec![T::zero(); w.len()];
    for co in 0..conv.cout {
        for ci in 0..cin {
            for s in 0..kk {
                out[(co * kk + s) * cin + ci] = w[(co * cin + ci) * kk + s];
            }
        }
    }
    out
}

/// `dw += dwp`, `dwp` the weight gradient laid out as [`weight_oihw_to_ohwi`] makes it and
/// `dw` OIHW.
pub fn add_ohwi_to_oihw<T: Elem>(dw: &mut [T], dwp: &[T], conv: &Conv2d) {
    let (kk, cin) = (conv.k * conv.k, conv.cin);
    for o in 0..conv.cout {
        for ci in 0..cin {
            for s in 0..kk {
                dw[(o * cin + ci) * kk + s] += dwp[(o * kk + s) * cin + ci];
            }
        }
    }
}

/// Whether the convolution reads its input directly as a `[pixels, Cin]` matrix.
fn is_pointwise(conv: &Conv2d) -> bool {
    conv.k == 1 && conv.stride == 1 && conv.pad == 0
}

/// ReLU as PyTorch computes it: `x < 0` rather than `x <= 0`, so NaN passes through.
#[inline]
fn relu<T: Elem>(v: T) -> T {
    if v < T::zero() {
        T::zero()
    } else {
        v
    }
}

/// The gradient ReLU lets through: `y <= 0` blocks it (a NaN output keeps its gradient, as in
/// PyTorch).
#[inline]
fn relu_grad<T: Elem>(g: T, y: T) -> T {
    if y <= T::zero() {
        T::zero()
    } else {
        g
    }
}

/// Training-mode BatchNorm (then ReLU when `relu`): batch statistics in f64 over fixed row
/// chunks, PyTorch's running-statistics rule. Outputs: y, mean, invstd, running mean and var.
#[allow(clippy::type_complexity)]
fn bn_train<T: Elem>(
    (y, mean, invstd, running_mean, running_var): (
        &mut [T],
        &mut [T],
        &mut [T],
        &mut [T],
        &mut [T],
    ),
    (x, gamma, beta): (&[T], &[T], &[T]),
    xs: Nhwc,
    cfg: &BatchNormCfg,
    relu_after: bool,
) -> anyhow::Result<()> {
    crate::backend::check_batch_norm_train(xs)?;
    let (m, c) = (xs.pixels(), xs.c);
    // Two passes (mean, then squared deviations), as exact as the data allows.
    // In f64 per term: with small batches the variance of a channel can be tiny next to its
    // mean, and PyTorch's trajectories are only reproduced with exact statistics (the
    // 5-step Nesterov fixture diverges from PyTorch's within tolerance otherwise).
    let [s1] = channel_sums::<f64, 1>(m, c, |r, acc| {
        for (a, &v) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]) {
            *a += v.as_f64();
        }
    });
    let mu: Vec<f64> = s1.iter().map(|s| s / m as f64).collect();
    let [s2] = channel_sums::<f64, 1>(m, c, |r, acc| {
        for ((a, &v), &mu) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]).zip(&mu) {
            let d = v.as_f64() - mu;
            *a += d * d;
        }
    });
    let var: Vec<f64> = s2.iter().map(|s| s / m as f64).collect();
    let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + cfg.eps).sqrt()).collect();
    for ch in 0..c {
        mean[ch] = T::cast(mu[ch]);
        invstd[ch] = T::cast(inv[ch]);
        let unbiased = var[ch] * m as f64 / (m - 1) as f64;
        running_mean[ch] =
            T::cast((1.0 - cfg.momentum) * running_mean[ch].as_f64() + cfg.momentum * mu[ch]);
        running_var[ch] =
            T::cast((1.0 - cfg.momentum) * running_var[ch].as_f64() + cfg.momentum * unbiased);
    }
    // y = (x − μ)·(invstd·γ) + β; subtracting the mean first keeps f32 exact enough when
    // |μ| is large next to the spread.
    let mean_t: Vec<T> = mu.iter().map(|&v| T::cast(v)).collect();
    let scale: Vec<T> = (0..c)
        .map(|ch| T::cast(inv[ch] * gamma[ch].as_f64()))
        .collect();
    bn_apply(y, x, &mean_t, &scale, beta, c, relu_after);
    Ok(())
}

/// `y = (x − mean)·scale + beta` per channel, then ReLU when `relu_after`.
fn bn_apply<T: Elem>(
    y: &mut [T],
    x: &[T],
    mean: &[T],
    scale: &[T],
    beta: &[T],
    c: usize,
    relu_after: bool,
) {
    y.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .with_min_len(ELEMENTWISE_ROWS)
        .for_each(|(yr, xr)| {
            if relu_after {
                for ch in 0..c {
                    yr[ch] = relu((xr[ch] - mean[ch]) * scale[ch] + beta[ch]);
                }
            } else {
                for ch in 0..c {
                    yr[ch] = (xr[ch] - mean[ch]) * scale[ch] + beta[ch];
                }
            }
        });
}

/// Eval-mode BatchNorm (then ReLU when `relu_after`) with the running statistics.
fn bn_eval<T: Elem>(
    y: &mut [T],
    (x, gamma, beta): (&[T], &[T], &[T]),
    (running_mean, running_var): (&[T], &[T]),
    xs: Nhwc,
    cfg: &BatchNormCfg,
    relu_after: bool,
) {
    let c = xs.c;
    let scale: Vec<T> = (0..c)
        .map(|ch| {
            let inv = 1.0 / (running_var[ch].as_f64() + cfg.eps).sqrt();
            T::cast(inv * gamma[ch].as_f64())
        })
        .collect();
    bn_apply(y, x, running_mean, &scale, beta, c, relu_after);
}

/// Backward of training-mode BatchNorm, of BatchNorm+ReLU when `y` (the ReLU's output) is
/// given: the incoming gradient is masked by ReLU on the fly, in both passes.
fn bn_backward<T: Elem>(
    (dx, dgamma, dbeta): (&mut [T], &mut [T], &mut [T]),
    dy: &[T],
    y: Option<&[T]>,
    (x, gamma, mean, invstd): (&[T], &[T], &[T], &[T]),
    xs: Nhwc,
) {
    let (m, c) = (xs.pixels(), xs.c);
    let inv: Vec<f64> = invstd.iter().map(|v| v.as_f64()).collect();
    // Σ dy and Σ dy·x̂ per channel, x̂ = (x − μ)·invstd, dy masked by the ReLU when there is
    // one. The row loops take slices and branch once per row, so they stay vectorisable.
    let [sum_g, sum_gx] = channel_sums::<T, 2>(m, c, |r, acc| {
        let (dyr, xr) = (&dy[r * c..(r + 1) * c], &x[r * c..(r + 1) * c]);
        let (sg, sgx) = acc.split_at_mut(c);
        // Σ g and Σ g·(x − μ); x̂ = (x − μ)·invstd is applied to the totals.
        match y {
            Some(y) => {
                let yr = &y[r * c..(r + 1) * c];
                for ch in 0..c {
                    let g = relu_grad(dyr[ch], yr[ch]);
                    sg[ch] += g;
                    sgx[ch] += g * (xr[ch] - mean[ch]);
                }
            }
            None => {
                for ch in 0..c {
                    let g = dyr[ch];
                    sg[ch] += g;
                    sgx[ch] += g * (xr[ch] - mean[ch]);
                }
            }
        }
    });
    let sums: Vec<[f64; 2]> = (0..c).map(|ch| [sum_g[ch], sum_gx[ch] * inv[ch]]).collect();
    for ch in 0..c {
        dbeta[ch] += T::cast(sums[ch][0]);
        dgamma[ch] += T::cast(sums[ch][1]);
    }
    // dx = γ·invstd/M · (M·dy − Σdy − x̂·Σ(dy·x̂)) = a·dy + b·(x − μ) + c per channel.
    let mf = m as f64;
    let mut a = vec![T::zero(); c];
    let mut b = vec![T::zero(); c];
    let mut c0 = vec![T::zero(); c];
    for ch in 0..c {
        let k = gamma[ch].as_f64() * inv[ch] / mf;
        a[ch] = T::cast(k * mf);
        b[ch] = T::cast(-k * sums[ch][1] * inv[ch]);
        c0[ch] = T::cast(-k * sums[ch][0]);
    }
    dx.par_chunks_mut(c)
        .enumerate()
        .with_min_len(ELEMENTWISE_ROWS)
        .for_each(|(r, dxr)| {
            let (dyr, xr) = (&dy[r * c..(r + 1) * c], &x[r * c..(r + 1) * c]);
            match y {
                Some(y) => {
                    let yr = &y[r * c..(r + 1) * c];
                    for ch in 0..c {
                        let g = relu_grad(dyr[ch], yr[ch]);
                        dxr[ch] = a[ch] * g + b[ch] * (xr[ch] - mean[ch]) + c0[ch];
                    }
                }
                None => {
                    for ch in 0..c {
                        dxr[ch] = a[ch] * dyr[ch] + b[ch] * (xr[ch] - mean[ch]) + c0[ch];
                    }
                }
            }
        });
}

/// Whether convolutions take the direct AVX-512 kernels ([`direct`]): f32 on a CPU that has
/// AVX-512, unless `INCEPT_CPU_CONV=reference` asks for the im2col + GEMM reference everywhere
/// (for A/B comparisons).
#[cfg(target_arch = "x86_64")]
pub fn direct_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        direct::available() && std::env::var("INCEPT_CPU_CONV").map_or(true, |v| v != "reference")
    })
}

/// The implementation an f32 convolution runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKernel {
    /// im2col + GEMM (a plain GEMM for 1×1): any CPU, any element type.
    Reference,
    /// The direct AVX-512 kernels of [`direct`].
    Direct,
    /// Input gradient of a strided convolution: each output pixel's window added back.
    Scatter,
    /// Winograd F(4×4, 3×3), [`winograd`].
    Winograd,
}

impl ConvKernel {
    pub fn name(self) -> &'static str {
        match self {
            ConvKernel::Reference => "im2col+gemm",
            ConvKernel::Direct => "direct",
            ConvKernel::Scatter => "scatter",
            ConvKernel::Winograd => "winograd",
        }
    }
}

/// The kernels an f32 convolution runs on: forward, weight gradient, input gradient. The
/// backend dispatches through this, and `incept bench --profile` prints it.
pub fn conv_kernels(conv: &Conv2d) -> [ConvKernel; 3] {
    #[cfg(target_arch = "x86_64")]
    if direct_enabled() && direct::supports(conv) {
        let main = if winograd::supports(conv) {
            ConvKernel::Winograd
        } else {
            ConvKernel::Direct
        };
        let dx = if winograd::supports(&winograd::backward_data_conv(conv)) {
            ConvKernel::Winograd
        } else if conv.stride == 1 && conv.pad < conv.k && conv.cin.is_multiple_of(16) {
            ConvKernel::Direct
        } else {
            ConvKernel::Scatter
        };
        return [main, main, dx];
    }
    let _ = conv;
    [ConvKernel::Reference; 3]
}

/// The reference convolution: `y = b + im2col(x) · wᵀ` (a plain GEMM for 1×1).
pub fn conv2d_forward_reference<T: Elem>(
    y: &mut [T],
    x: &[T],
    w: &[T],
    b: &[T],
    xs: Nhwc,
    conv: &Conv2d,
) {
    let ys = conv.out_shape(xs);
    let (p, kdim) = (ys.pixels(), conv.k * conv.k * conv.cin);
    assert_eq!(xs.c, conv.cin, "conv2d_forward: input channels");
    assert_eq!(x.len(), xs.len(), "conv2d_forward: x length");
    assert_eq!(y.len(), ys.len(), "conv2d_forward: y length");
    // Start from the bias, then accumulate the GEMM onto it.
    y.par_chunks_mut(conv.cout)
        .for_each(|row| row.copy_from_slice(b));
    if is_pointwise(conv) {
        // y[p, co] += Σ_ci x[p, ci] · w[co, ci]
        matmul(
            y,
            conv.cout,
            (x, conv.cin, 1),
            (w, 1, conv.cin),
            p,
            conv.cout,
            kdim,
            true,
        );
    } else {
        let mut cols = vec![T::zero(); p * kdim];
        im2col(&mut cols, x, xs, conv);
        let wp = weight_oihw_to_ohwi(w, conv);
        matmul(
            y,
            conv.cout,
            (&cols, kdim, 1),
            (&wp, 1, kdim),
            p,
            conv.cout,
            kdim,
            true,
        );
    }
}

/// The reference weight gradient: `dw += dyᵀ · im2col(x)` (OIHW).
pub fn conv2d_backward_weight_reference<T: Elem>(
    dw: &mut [T],
    dy: &[T],
    x: &[T],
    xs: Nhwc,
    conv: &Conv2d,
) {
    let ys = conv.out_shape(xs);
    let (p, co, kdim) = (ys.pixels(), conv.cout, conv.k * conv.k * conv.cin);
    assert_eq!(dy.len(), ys.len(), "conv2d_backward: dy length");
    if is_pointwise(conv) {
        // dw[co, ci] += Σ_p dy[p, co] · x[p, ci]
        matmul_long_k(dw, kdim, (dy, 1, co), (x, conv.cin, 1), co, kdim, p, true);
        return;
    }
    let mut cols = vec![T::zero(); p * kdim];
    im2col(&mut cols, x, xs, conv);
    // dwp[co, j] = Σ_p dy[p, co] · cols[p, j], then back to OIHW.
    let mut dwp = vec![T::zero(); co * kdim];
    matmul_long_k(
        &mut dwp,
        kdim,
        (dy, 1, co),
        (&cols, kdim, 1),
        co,
        kdim,
        p,
        false,
    );
    add_ohwi_to_oihw(dw, &dwp, conv);
}

/// The reference input gradient: `dx = col2im(dy · w)`, overwriting dx.
pub fn conv2d_backward_data_reference<T: Elem>(
    dx: &mut [T],
    dy: &[T],
    w: &[T],
    xs: Nhwc,
    conv: &Conv2d,
) {
    let ys = conv.out_shape(xs);
    let (p, co, kdim) = (ys.pixels(), conv.cout, conv.k * conv.k * conv.cin);
    assert_eq!(dy.len(), ys.len(), "conv2d_backward: dy length");
    assert_eq!(dx.len(), xs.len(), "conv2d_backward: dx length");
    if is_pointwise(conv) {
        // dx[p, ci] = Σ_co dy[p, co] · w[co, ci]
        matmul(
            dx,
            conv.cin,
            (dy, co, 1),
            (w, kdim, 1),
            p,
            conv.cin,
            co,
            false,
        );
        return;
    }
    // dcols[p, j] = Σ_co dy[p, co] · wp[co, j]; dx = col2im(dcols).
    let wp = weight_oihw_to_ohwi(w, conv);
    let mut dcols = vec![T::zero(); p * kdim];
    matmul(
        &mut dcols,
        kdim,
        (dy, co, 1),
        (&wp, kdim, 1),
        p,
        kdim,
        co,
        false,
    );
    col2im(dx, &dcols, xs, conv);
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
        #[cfg(target_arch = "x86_64")]
        if let (Some(yf), Some(xf), Some(wf), Some(bf)) =
            (T::f32s_mut(y), T::f32s(x), T::f32s(w), T::f32s(b))
        {
            match conv_kernels(conv)[0] {
                ConvKernel::Winograd => {
                    return winograd::conv_forward(yf, xf, wf, Some(bf), xs, conv, false)
                }
                ConvKernel::Direct => return direct::conv_forward(yf, xf, wf, Some(bf), xs, conv),
                _ => {}
            }
        }
        conv2d_forward_reference(y, x, w, b, xs, conv);
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
        #[cfg(target_arch = "x86_64")]
        let kernel = conv_kernels(conv)[0];
        #[cfg(target_arch = "x86_64")]
        if kernel != ConvKernel::Reference {
            if let (Some(yf), Some(xf), Some(wf)) = (T::f32s_mut(y), T::f32s(x), T::f32s(w)) {
                // BatchNorm with running statistics is affine per channel: relu(s·(conv + b − μ)
                // + β) with s = γ/√(σ² + eps) is a convolution with weight s·w and bias
                // s·(b − μ) + β, then ReLU.
                let per_out = conv.weight_len() / conv.cout;
                let mut wf2 = wf.to_vec();
                let mut bias = vec![0.0f32; conv.cout];
                for co in 0..conv.cout {
                    let s = gamma[co].as_f64() / (running_var[co].as_f64() + cfg.eps).sqrt();
                    for v in &mut wf2[co * per_out..(co + 1) * per_out] {
                        *v = (*v as f64 * s) as f32;
                    }
                    bias[co] = ((b[co].as_f64() - running_mean[co].as_f64()) * s
                        + beta[co].as_f64()) as f32;
                }
                if kernel == ConvKernel::Winograd {
                    winograd::conv_forward(yf, xf, &wf2, Some(&bias), xs, conv, true);
                } else {
                    direct::conv_forward_epilogue(yf, xf, &wf2, Some(&bias), xs, conv, true);
                }
                return true;
            }
        }
        let _ = (y, x, w, b, gamma, beta, running_mean, running_var, xs, cfg);
        false
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
        let ys = conv.out_shape(xs);
        let (p, co) = (ys.pixels(), conv.cout);
        assert_eq!(dy.len(), ys.len(), "conv2d_backward: dy length");
        // db[co] += Σ_p dy[p, co]
        let [sums] = channel_sums::<T, 1>(p, co, |r, acc| {
            for (a, &v) in acc.iter_mut().zip(&dy[r * co..(r + 1) * co]) {
                *a += v;
            }
        });
        for (d, s) in db.iter_mut().zip(&sums) {
            *d += T::cast(*s);
        }
        #[cfg(target_arch = "x86_64")]
        if let [_, dw_kernel @ (ConvKernel::Direct | ConvKernel::Winograd), dx_kernel] =
            conv_kernels(conv)
        {
            if let (Some(dwf), Some(dyf), Some(xf), Some(wf)) =
                (T::f32s_mut(dw), T::f32s(dy), T::f32s(x), T::f32s(w))
            {
                if dw_kernel == ConvKernel::Winograd {
                    winograd::conv_backward_weight(dwf, dyf, xf, xs, conv);
                } else {
                    direct::conv_backward_weight(dwf, dyf, xf, xs, conv);
                }
                if let Some(dxf) = dx.and_then(|d| T::f32s_mut(d)) {
                    match dx_kernel {
                        ConvKernel::Winograd => {
                            winograd::conv_backward_data(dxf, dyf, wf, xs, conv)
                        }
                        ConvKernel::Direct => direct::conv_backward_data(dxf, dyf, wf, xs, conv),
                        _ => direct::conv_backward_data_scatter(dxf, dyf, wf, xs, conv),
                    }
                }
                return;
            }
        }
        conv2d_backward_weight_reference(dw, dy, x, xs, conv);
        if let Some(dx) = dx {
            conv2d_backward_data_reference(dx, dy, w, xs, conv);
        }
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
        bn_train(
            (y, mean, invstd, running_mean, running_var),
            (x, gamma, beta),
            xs,
            cfg,
            false,
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
        bn_train(
            (y, mean, invstd, running_mean, running_var),
            (x, gamma, beta),
            xs,
            cfg,
            true,
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
        bn_eval(
            y,
            (x, gamma, beta),
            (running_mean, running_var),
            xs,
            cfg,
            false,
        );
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
        bn_eval(
            y,
            (x, gamma, beta),
            (running_mean, running_var),
            xs,
            cfg,
            true,
        );
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
        bn_backward((dx, dgamma, dbeta), dy, None, (x, gamma, mean, invstd), xs);
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
        bn_backward(
            (dx, dgamma, dbeta),
            dy,
            Some(y),
            (x, gamma, mean, invstd),
            xs,
        );
    }

    fn relu_forward(&self, y: &mut Vec<T>, x: &Vec<T>) {
        y.par_iter_mut()
            .zip(x.par_iter())
            .for_each(|(y, x)| *y = relu(*x));
    }

    fn relu_backward(&self, dy: &mut Vec<T>, y: &Vec<T>) {
        // A select on every element rather than a conditional store: about half the outputs
        // are zero in no predictable pattern, and the select vectorises.
        dy.par_chunks_mut(4096)
            .zip(y.par_chunks(4096))
            .for_each(|(g, y)| {
                for (g, y) in g.iter_mut().zip(y) {
                    *g = relu_grad(*g, *y);
                }
            });
    }

    fn max_pool2d_forward(&self, y: &mut Vec<T>, x: &Vec<T>, xs: Nhwc, pool: &MaxPool2d) {
        let ys = pool.out_shape(xs);
        let c = xs.c;
        // One output row per task; each output pixel starts from the first in-bounds window
        // position and keeps a later value only if it is larger (or NaN), as PyTorch does.
        y.par_chunks_mut(ys.w * c)
            .enumerate()
            .for_each(|(row, yrow)| {
                let (n, oy) = (row / ys.h, row % ys.h);
                for (ox, yr) in yrow.chunks_mut(c).enumerate() {
                    let mut first = true;
                    for_window(xs, pool, oy, ox, |iy, ix| {
                        let xr = &x[((n * xs.h + iy) * xs.w + ix) * c..][..c];
                        if first {
                            yr.copy_from_slice(xr);
                            first = false;
                        } else {
                            // A select, not a branch: it vectorises, and ReLU outputs (half
                            // zeros, half random) would mispredict a branch every other time.
                            for (b, &v) in yr.iter_mut().zip(xr) {
                                let take = (v > *b) | v.is_nan();
                                *b = if take { v } else { *b };
                            }
                        }
                    });
                }
            });
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
        let ys = pool.out_shape(xs);
        let c = xs.c;
        // The winner of a window is its first element equal to the maximum in scan order (the
        // last NaN when the maximum is NaN), which is what the forward kept. Images own
        // disjoint parts of dx, so they run in parallel.
        let plane = xs.h * xs.w * c;
        dx.par_chunks_mut(plane).enumerate().for_each(|(n, img)| {
            img.fill(T::zero());
            let xi = &x[n * plane..(n + 1) * plane];
            let mut found = vec![false; c];
            let mut last_nan = vec![usize::MAX; c];
            let mut win = vec![0u32; c];
            let mut window: Vec<u32> = Vec::with_capacity(pool.k * pool.k);
            for oy in 0..ys.h {
                for ox in 0..ys.w {
                    let o = ((n * ys.h + oy) * ys.w + ox) * c;
                    let (m, g) = (&y[o..o + c], &dy[o..o + c]);
                    if !m.iter().any(|v| v.is_nan()) {
                        // No NaN in the window (it would be the maximum). Each channel's
                        // winner is the first position equal to the maximum: scanning the
                        // window backwards, the last match kept is the first. Selects on
                        // positions vectorise (ReLU zeros tie a lot, and a branch per element
                        // would mispredict); one scalar pass then routes the gradient.
                        window.clear();
                        for_window(xs, pool, oy, ox, |iy, ix| {
                            window.push(((iy * xs.w + ix) * c) as u32)
                        });
                        win.fill(window[0]);
                        for &at in window.iter().rev() {
                            let src = &xi[at as usize..at as usize + c];
                            for ((w, &v), &mx) in win.iter_mut().zip(src).zip(m) {
                                *w = if v == mx { at } else { *w };
                            }
                        }
                        for (ch, (&w, &gv)) in win.iter().zip(g).enumerate() {
                            img[w as usize + ch] += gv;
                        }
                        continue;
                    }
                    found.fill(false);
                    for_window(xs, pool, oy, ox, |iy, ix| {
                        let at = (iy * xs.w + ix) * c;
                        for ch in 0..c {
                            let v = xi[at + ch];
                            if !found[ch] && v == m[ch] {
                                img[at + ch] += g[ch];
                                found[ch] = true;
                            } else if v.is_nan() {
                                last_nan[ch] = at + ch;
                            }
                        }
                    });
                    // A NaN maximum equals nothing: its gradient goes to the last NaN.
                    for ch in 0..c {
                        if m[ch].is_nan() && last_nan[ch] != usize::MAX {
                            img[last_nan[ch]] += g[ch];
                        }
                        last_nan[ch] = usize::MAX;
                    }
                }
            }
        });
    }

    fn fork_backward(&self, dx: &mut Vec<T>, parts: &[&Vec<T>]) {
        dx.par_chunks_mut(4096).enumerate().for_each(|(i, chunk)| {
            let start = i * 4096;
            chunk.copy_from_slice(&parts[0][start..start + chunk.len()]);
            for part in &parts[1..] {
                for (d, s) in chunk.iter_mut().zip(&part[start..]) {
                    *d += *s;
                }
            }
        });
    }

    fn concat_forward(&self, y: &mut Vec<T>, parts: &[&Vec<T>], channels: &[usize]) {
        let total: usize = channels.iter().sum();
        y.par_chunks_mut(total).enumerate().for_each(|(p, row)| {
            let mut off = 0;
            for (part, &c) in parts.iter().zip(channels) {
                row[off..off + c].copy_from_slice(&part[p * c..(p + 1) * c]);
                off += c;
            }
        });
    }

    fn concat_backward(&self, dparts: &mut [&mut Vec<T>], dy: &Vec<T>, channels: &[usize]) {
        let total: usize = channels.iter().sum();
        let mut off = 0;
        for (part, &c) in dparts.iter_mut().zip(channels) {
            part.par_chunks_mut(c)
                .zip(dy.par_chunks(total))
                .for_each(|(d, row)| d.copy_from_slice(&row[off..off + c]));
            off += c;
        }
    }

    fn avg_pool2d_forward(&self, y: &mut Vec<T>, x: &Vec<T>, xs: Nhwc) {
        let (ho, wo, c) = (xs.h / 2, xs.w / 2, xs.c);
        let quarter = T::cast(0.25);
        y.par_chunks_mut(c).enumerate().for_each(|(p, yr)| {
            let (n, oy, ox) = (p / (ho * wo), (p / wo) % ho, p % wo);
            let at = |dy: usize, dx: usize| ((n * xs.h + 2 * oy + dy) * xs.w + 2 * ox + dx) * c;
            let (a, b, cc, d) = (at(0, 0), at(0, 1), at(1, 0), at(1, 1));
            for ch in 0..c {
                yr[ch] = (x[a + ch] + x[b + ch] + x[cc + ch] + x[d + ch]) * quarter;
            }
        });
    }

    fn avg_pool2d_backward(&self, dx: &mut Vec<T>, dy: &Vec<T>, xs: Nhwc) {
        let (ho, wo, c) = (xs.h / 2, xs.w / 2, xs.c);
        let quarter = T::cast(0.25);
        dx.par_chunks_mut(c).enumerate().for_each(|(p, dxr)| {
            let (n, iy, ix) = (p / (xs.h * xs.w), (p / xs.w) % xs.h, p % xs.w);
            let (oy, ox) = (iy / 2, ix / 2);
            if oy >= ho || ox >= wo {
                dxr.fill(T::zero()); // an odd last row or column is not pooled
                return;
            }
            let src = ((n * ho + oy) * wo + ox) * c;
            for ch in 0..c {
                dxr[ch] = dy[src + ch] * quarter;
            }
        });
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
        for row in y.chunks_mut(fout) {
            row.copy_from_slice(b);
        }
        // y[i, o] += Σ_j x[i, j] · w[o, j]
        matmul(y, fout, (x, fin, 1), (w, 1, fin), n, fout, fin, true);
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
        for o in 0..fout {
            let s: f64 = (0..n).map(|i| dy[i * fout + o].as_f64()).sum();
            db[o] += T::cast(s);
        }
        // dw[o, j] += Σ_i dy[i, o] · x[i, j]
        matmul(dw, fin, (dy, 1, fout), (x, fin, 1), fout, fin, n, true);
        if let Some(dx) = dx {
            // dx[i, j] = Σ_o dy[i, o] · w[o, j]
            matmul(dx, fin, (dy, fout, 1), (w, fin, 1), n, fin, fout, false);
        }
    }

    fn cross_entropy_forward(
        &self,
        probs: &mut Vec<T>,
        logits: &Vec<T>,
        labels: &[u32],
        k: usize,
        smoothing: f64,
    ) -> f64 {
        let n = labels.len();
        let mut total = 0.0;
        for (i, &label) in labels.iter().enumerate() {
            let z = &logits[i * k..(i + 1) * k];
            let zmax = z.iter().fold(f64::NEG_INFINITY, |m, v| m.max(v.as_f64()));
            let sum_exp: f64 = z.iter().map(|v| (v.as_f64() - zmax).exp()).sum();
            let lse = zmax + sum_exp.ln();
            let label = label as usize;
            assert!(
                label < k,
                "cross_entropy: label {label} out of range 0..{k}"
            );
            // −log p_y, and with smoothing the mean of −log p over all classes too.
            let nll = lse - z[label].as_f64();
            let mean_nll = lse - z.iter().map(|v| v.as_f64()).sum::<f64>() / k as f64;
            total += (1.0 - smoothing) * nll + smoothing * mean_nll;
            for (p, v) in probs[i * k..(i + 1) * k].iter_mut().zip(z) {
                *p = T::cast((v.as_f64() - lse).exp());
            }
        }
        total / n as f64
    }

    fn cross_entropy_backward(
        &self,
        dlogits: &mut Vec<T>,
        probs: &Vec<T>,
        labels: &[u32],
        k: usize,
        smoothing: f64,
    ) {
        let n = labels.len() as f64;
        for (i, &label) in labels.iter().enumerate() {
            for j in 0..k {
                let target = smoothing / k as f64
                    + if j == label as usize {
                        1.0 - smoothing
                    } else {
                        0.0
                    };
                dlogits[i * k + j] = T::cast((probs[i * k + j].as_f64() - target) / n);
            }
        }
    }

    fn sgd_step(
        &self,
        param: &mut Vec<T>,
        grad: &Vec<T>,
        momentum_buf: &mut Vec<T>,
        first_step: bool,
        opt: &Sgd,
    ) {
        let (lr, mu, wd) = (
            T::cast(opt.lr),
            T::cast(opt.momentum),
            T::cast(opt.weight_decay),
        );
        for ((p, g), b) in param.iter_mut().zip(grad).zip(momentum_buf.iter_mut()) {
            let g = *g + wd * *p;
            let step = if opt.momentum == 0.0 {
                g
            } else {
                *b = if first_step { g } else { mu * *b + g };
                if opt.nesterov {
                    g + mu * *b
                } else {
                    *b
                }
            };
            *p -= lr * step;
        }
    }
}
