//! Convolutions and the linear layer: the im2col + GEMM reference (the specification), the
//! choice of the AVX-512 direct and Winograd kernels where they apply, and the weight layouts.

// The ops take the arguments `Backend` declares for them, one for one.
#![allow(clippy::too_many_arguments)]

use super::*;

/// Unfolds the k×k windows of an NHWC image batch into rows:
/// `cols[p, (ky·k + kx)·Cin + ci] = x[n, oy·s + ky − pad, ox·s + kx − pad, ci]` (0 outside),
/// with p the output pixel `(n·Ho + oy)·Wo + ox`. cols: [N·Ho·Wo, k·k·Cin].
pub fn im2col<T: Elem>(cols: &mut [T], x: &[T], xs: Nhwc, conv: &Conv2d) {
    let (ho, wo) = (conv.out_side(xs.h), conv.out_side(xs.w));
    let (k, cin) = (conv.k, xs.c);
    let row_len = k * k * cin;
    cols.par_chunks_mut(row_len).enumerate().for_each(|(p, row)| {
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
    dx.par_chunks_mut(xs.h * xs.w * cin).enumerate().for_each(|(n, img)| {
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
pub(super) fn is_pointwise(conv: &Conv2d) -> bool {
    conv.k == 1 && conv.stride == 1 && conv.pad == 0
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
        let main = if winograd::supports(conv) { ConvKernel::Winograd } else { ConvKernel::Direct };
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
    y: &mut [T], x: &[T], w: &[T], b: &[T], xs: Nhwc, conv: &Conv2d,
) {
    let ys = conv.out_shape(xs);
    let (p, kdim) = (ys.pixels(), conv.k * conv.k * conv.cin);
    assert_eq!(xs.c, conv.cin, "conv2d_forward: input channels");
    assert_eq!(x.len(), xs.len(), "conv2d_forward: x length");
    assert_eq!(y.len(), ys.len(), "conv2d_forward: y length");
    // Start from the bias, then accumulate the GEMM onto it.
    y.par_chunks_mut(conv.cout).for_each(|row| row.copy_from_slice(b));
    if is_pointwise(conv) {
        // y[p, co] += Σ_ci x[p, ci] · w[co, ci]
        matmul(y, conv.cout, (x, conv.cin, 1), (w, 1, conv.cin), p, conv.cout, kdim, true);
    } else {
        let mut cols = vec![T::zero(); p * kdim];
        im2col(&mut cols, x, xs, conv);
        let wp = weight_oihw_to_ohwi(w, conv);
        matmul(y, conv.cout, (&cols, kdim, 1), (&wp, 1, kdim), p, conv.cout, kdim, true);
    }
}

/// The reference weight gradient: `dw += dyᵀ · im2col(x)` (OIHW).
pub fn conv2d_backward_weight_reference<T: Elem>(
    dw: &mut [T], dy: &[T], x: &[T], xs: Nhwc, conv: &Conv2d,
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
    matmul_long_k(&mut dwp, kdim, (dy, 1, co), (&cols, kdim, 1), co, kdim, p, false);
    add_ohwi_to_oihw(dw, &dwp, conv);
}

/// The reference input gradient: `dx = col2im(dy · w)`, overwriting dx.
pub fn conv2d_backward_data_reference<T: Elem>(
    dx: &mut [T], dy: &[T], w: &[T], xs: Nhwc, conv: &Conv2d,
) {
    let ys = conv.out_shape(xs);
    let (p, co, kdim) = (ys.pixels(), conv.cout, conv.k * conv.k * conv.cin);
    assert_eq!(dy.len(), ys.len(), "conv2d_backward: dy length");
    assert_eq!(dx.len(), xs.len(), "conv2d_backward: dx length");
    if is_pointwise(conv) {
        // dx[p, ci] = Σ_co dy[p, co] · w[co, ci]
        matmul(dx, conv.cin, (dy, co, 1), (w, kdim, 1), p, conv.cin, co, false);
        return;
    }
    // dcols[p, j] = Σ_co dy[p, co] · wp[co, j]; dx = col2im(dcols).
    let wp = weight_oihw_to_ohwi(w, conv);
    let mut dcols = vec![T::zero(); p * kdim];
    matmul(&mut dcols, kdim, (dy, co, 1), (&wp, kdim, 1), p, kdim, co, false);
    col2im(dx, &dcols, xs, conv);
}

impl<T: Elem> ConvOps<T> for Cpu {
    fn conv2d_forward(
        &self, y: &mut Vec<T>, x: &Vec<T>, w: &Vec<T>, b: &Vec<T>, xs: Nhwc, conv: &Conv2d,
    ) {
        #[cfg(target_arch = "x86_64")]
        if let (Some(yf), Some(xf), Some(wf), Some(bf)) =
            (T::f32s_mut(y), T::f32s(x), T::f32s(w), T::f32s(b))
        {
            match conv_kernels(conv)[0] {
                ConvKernel::Winograd => {
                    return winograd::conv_forward(yf, xf, wf, Some(bf), xs, conv, false)
                }
                ConvKernel::Direct => {
                    return direct::conv_forward(yf, xf, wf, Some(bf), xs, conv, false)
                }
                _ => {}
            }
        }
        conv2d_forward_reference(y, x, w, b, xs, conv);
    }

    fn conv2d_batch_norm_relu_forward_eval(
        &self, y: &mut Vec<T>, x: &Vec<T>, (w, b): (&Vec<T>, &Vec<T>),
        Affine { gamma, beta }: Affine<&Vec<T>>, running: RunningStats<&Vec<T>>, xs: Nhwc,
        conv: &Conv2d, cfg: &BatchNormCfg,
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
                    let s = gamma[co].as_f64() / (running.var[co].as_f64() + cfg.eps).sqrt();
                    for v in &mut wf2[co * per_out..(co + 1) * per_out] {
                        *v = (*v as f64 * s) as f32;
                    }
                    bias[co] = ((b[co].as_f64() - running.mean[co].as_f64()) * s
                        + beta[co].as_f64()) as f32;
                }
                if kernel == ConvKernel::Winograd {
                    winograd::conv_forward(yf, xf, &wf2, Some(&bias), xs, conv, true);
                } else {
                    direct::conv_forward(yf, xf, &wf2, Some(&bias), xs, conv, true);
                }
                return true;
            }
        }
        let _ = (y, x, w, b, gamma, beta, running, xs, cfg);
        false
    }

    fn conv2d_backward(
        &self, dx: Option<&mut Vec<T>>, dw: &mut Vec<T>, db: &mut Vec<T>, dy: &Vec<T>, x: &Vec<T>,
        w: &Vec<T>, xs: Nhwc, conv: &Conv2d,
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

    fn linear_forward(
        &self, y: &mut Vec<T>, x: &Vec<T>, w: &Vec<T>, b: &Vec<T>, n: usize, fin: usize,
        fout: usize,
    ) {
        for row in y.chunks_mut(fout) {
            row.copy_from_slice(b);
        }
        // y[i, o] += Σ_j x[i, j] · w[o, j]
        matmul(y, fout, (x, fin, 1), (w, 1, fin), n, fout, fin, true);
    }

    fn linear_backward(
        &self, dx: Option<&mut Vec<T>>, dw: &mut Vec<T>, db: &mut Vec<T>, dy: &Vec<T>, x: &Vec<T>,
        w: &Vec<T>, n: usize, fin: usize, fout: usize,
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
}
