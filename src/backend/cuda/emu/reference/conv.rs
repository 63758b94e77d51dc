//! Convolutions, lowered to matrix products by im2col (and col2im for the data gradient).

use super::*;

/// A convolution's sizes: x [N, C, H, W], w [K, C, R, S], y [N, K, P, Q].
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    r: usize,
    s: usize,
    p: usize,
    q: usize,
    pad: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
}

impl Geometry {
    fn of(p: &ConvProblem) -> Geometry {
        let [n, c, h, w] = p.x.dims;
        let [k, _, r, s] = p.w.dims;
        let [_, _, pp, q] = p.y.dims;
        Geometry {
            n,
            c,
            h,
            w,
            k,
            r,
            s,
            p: pp,
            q,
            pad: p.conv.pad,
            stride: p.conv.stride,
            dilation: p.conv.dilation,
        }
    }

    /// The length of a row of the im2col matrix: one filter's R·S·C taps.
    fn taps(&self) -> usize {
        self.r * self.s * self.c
    }

    /// The input position tap (r, s) of output (p, q) reads, if it is not padding.
    fn input_at(&self, p: usize, q: usize, r: usize, s: usize) -> Option<(usize, usize)> {
        let h = (p * self.stride[0] + r * self.dilation[0]).checked_sub(self.pad[0])?;
        let w = (q * self.stride[1] + s * self.dilation[1]).checked_sub(self.pad[1])?;
        (h < self.h && w < self.w).then_some((h, w))
    }

    /// The batch in runs of images whose im2col matrix holds at most `col_floats` elements.
    fn image_runs(&self, col_floats: usize) -> impl Iterator<Item = Range<usize>> {
        let per = (col_floats / (self.p * self.q * self.taps())).clamp(1, self.n);
        let n = self.n;
        (0..n).step_by(per).map(move |i| i..(i + per).min(n))
    }
}

/// The im2col matrix of `images` of NHWC `x`: one row per output position (n, p, q), holding
/// the R·S·C inputs its window covers in KRSC order (zeros for padding).
pub(super) fn im2col(g: &Geometry, x: &[f32], images: Range<usize>, col: &mut [f32]) {
    let taps = g.taps();
    let first = images.start;
    col[..images.len() * g.p * g.q * taps]
        .par_chunks_mut(taps)
        .with_min_len(64)
        .enumerate()
        .for_each(|(i, row)| {
            let n = first + i / (g.p * g.q);
            let (p, q) = (i / g.q % g.p, i % g.q);
            for r in 0..g.r {
                for s in 0..g.s {
                    let dst = &mut row[(r * g.s + s) * g.c..][..g.c];
                    match g.input_at(p, q, r, s) {
                        Some((h, w)) => {
                            dst.copy_from_slice(&x[((n * g.h + h) * g.w + w) * g.c..][..g.c])
                        }
                        None => dst.fill(0.0),
                    }
                }
            }
        });
}

/// The transpose of [`im2col`]: adds each row's R·S·C values back onto the inputs they came
/// from, `dx` holding the NHWC images of the run `col` was built for.
pub(super) fn col2im(g: &Geometry, col: &[f32], dx: &mut [f32]) {
    let taps = g.taps();
    dx.par_chunks_mut(g.h * g.w * g.c).zip(col.par_chunks(g.p * g.q * taps)).for_each(
        |(image, rows)| {
            for p in 0..g.p {
                for q in 0..g.q {
                    let row = &rows[(p * g.q + q) * taps..][..taps];
                    for r in 0..g.r {
                        for s in 0..g.s {
                            if let Some((h, w)) = g.input_at(p, q, r, s) {
                                let src = &row[(r * g.s + s) * g.c..][..g.c];
                                let dst = &mut image[(h * g.w + w) * g.c..][..g.c];
                                for (d, v) in dst.iter_mut().zip(src) {
                                    *d += v;
                                }
                            }
                        }
                    }
                }
            }
        },
    );
}

/// The accumulator of one convolution direction, f32 in NHWC (KRSC for dw) order: as matrices,
/// x is [N·H·W, C], w [K, R·S·C], y [N·P·Q, K] and the im2col matrix [N·P·Q, R·S·C], so
///   forward:         y  = col · wᵀ
///   backward data:   col(dx) = dy · w, folded back onto dx by col2im
///   backward filter: dw = dyᵀ · col
pub(super) fn convolve(
    g: &Geometry, dir: ConvDirection, x: &[f32], w: &[f32], y: &[f32], col_floats: usize,
) -> Vec<f32> {
    let (taps, pq, k) = (g.taps(), g.p * g.q, g.k);
    let mut col = Vec::new();
    match dir {
        ConvDirection::Forward => {
            let mut out = vec![0.0; g.n * pq * k];
            for run in g.image_runs(col_floats) {
                let rows = run.len() * pq;
                col.resize(rows * taps, 0.0);
                im2col(g, x, run.clone(), &mut col);
                let dst = &mut out[run.start * pq * k..][..rows * k];
                matmul(dst, k, false, mat(&col, taps, 1), mat(w, 1, taps), (rows, k, taps));
            }
            out
        }
        ConvDirection::BackwardData => {
            let image = g.h * g.w * g.c;
            let mut out = vec![0.0; g.n * image];
            for run in g.image_runs(col_floats) {
                let rows = run.len() * pq;
                col.resize(rows * taps, 0.0);
                let dy = &y[run.start * pq * k..][..rows * k];
                matmul(&mut col, taps, false, mat(dy, k, 1), mat(w, taps, 1), (rows, taps, k));
                col2im(g, &col, &mut out[run.start * image..run.end * image]);
            }
            out
        }
        ConvDirection::BackwardFilter => {
            let mut out = vec![0.0; k * taps];
            for (i, run) in g.image_runs(col_floats).enumerate() {
                let rows = run.len() * pq;
                col.resize(rows * taps, 0.0);
                im2col(g, x, run.clone(), &mut col);
                let dy = &y[run.start * pq * k..][..rows * k];
                matmul(&mut out, taps, i > 0, mat(dy, 1, k), mat(&col, taps, 1), (k, taps, rows));
            }
            out
        }
    }
}

/// # Safety
/// As [`run_dnn`], for a validated call.
pub(super) unsafe fn run_conv(c: &ConvCall, col_floats: usize) {
    let p = &c.problem;
    let g = Geometry::of(p);
    let dt = p.x.dtype;
    // Only the operands a direction reads are loaded; the output's old contents are read by
    // `store`, and only when beta != 0.
    let reads = |ptr: u64, dims: [usize; 4], layout: Layout, used: bool| {
        if !used {
            return Vec::new();
        }
        let len = dims.iter().product();
        // SAFETY: the caller's contract covers the operand regions.
        to_nhwc(unsafe { load(ptr, dt, len) }, dims, layout)
    };
    let dir = c.dir;
    let x = reads(c.x, p.x.dims, p.x.layout, dir != ConvDirection::BackwardData);
    let w = reads(c.w, p.w.dims, p.w.layout, dir != ConvDirection::BackwardFilter);
    let y = reads(c.y, p.y.dims, p.y.layout, dir != ConvDirection::Forward);
    if c.workspace_bytes > 0 {
        // What an algorithm leaves in its workspace is garbage: NaN in every float type, so
        // that a buffer wrongly shared with the workspace shows up in the results.
        let used = workspace_bytes(p, dir, c.algo).unwrap_or(0).min(c.workspace_bytes);
        // SAFETY: the workspace region is `workspace_bytes` long.
        unsafe { std::ptr::write_bytes(c.workspace as *mut u8, 0xff, used) };
    }
    let result = convolve(&g, dir, &x, &w, &y, col_floats);
    let (ptr, dims, layout) = match dir {
        ConvDirection::Forward => (c.y, p.y.dims, p.y.layout),
        ConvDirection::BackwardData => (c.x, p.x.dims, p.x.layout),
        ConvDirection::BackwardFilter => (c.w, p.w.dims, p.w.layout),
    };
    let result = from_nhwc(result, dims, layout);
    // SAFETY: the output region, which validation keeps apart from every input.
    unsafe { store(ptr, dt, &result, c.alpha, c.beta) };
}
