//! Direct convolutions for `f32` NHWC on AVX-512: the fast path of the CPU backend.
//!
//! The reference convolution ([`super::im2col`] + GEMM) writes every input window out as a row
//! of a column matrix, then the GEMM packs that matrix again: at the model's shapes this traffic
//! costs as much as the arithmetic. These kernels read the windows where they are instead. In
//! NHWC, with the input zero-padded once, the `k·Cin` values of one window row are contiguous
//! (`j = kx·Cin + ci`), so a convolution is, per output pixel, `k` dot products of length `k·Cin`
//! against the weight laid out `[ky][j][co]`:
//!
//! `y[p, co] = b[co] + Σ_ky Σ_j xpad[base(p) + ky·row + j] · w[ky][j][co]`
//!
//! A register tile holds `R` output pixels × `16·V` output channels; each step of `j` loads `V`
//! weight vectors and broadcasts one input value per pixel. The input gradient of a stride-1
//! convolution is the same kernel over the padded output gradient with the flipped, transposed
//! weight; that of a strided one (block 2) adds each output pixel's gradient times the weight
//! back onto its window, image by image. The weight gradient tiles `R` output channels × `16·V`
//! values of `j` (or, for the first layer's 21-value window rows, `j` × 64 output channels),
//! reducing over the pixels in `PIECES` (8) fixed pieces summed in order, so it never depends
//! on the threads. The same forward kernel runs the GEMMs of [`super::winograd`].
//!
//! Every sum runs in a fixed order, so results are reproducible; they differ from the reference
//! by rounding only, which `tests/direct_conv.rs` bounds at the model's shapes.

use crate::backend::{Conv2d, Nhwc};
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::borrow::Cow;

/// f32 lanes of an AVX-512 register.
const L: usize = 16;

/// Fixed pieces of the pixel range for the weight gradient (as in `matmul_long_k`).
const PIECES: usize = 8;

thread_local! {
    /// Buffers lent by [`with_scratch`], per thread.
    static SCRATCH: std::cell::RefCell<Vec<Vec<f32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a scratch buffer of `len` values whose contents are unspecified (left by an
/// earlier user), for buffers a kernel overwrites whole: zeroing a fresh one each call costs
/// more than some of the kernels using it. Buffers are kept per thread and reused; a call
/// nested on the same thread (rayon may run another task while this one waits) gets another.
pub(crate) fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buf = SCRATCH.with(|s| s.borrow_mut().pop()).unwrap_or_default();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    let r = f(&mut buf[..len]);
    SCRATCH.with(|s| s.borrow_mut().push(buf));
    r
}

/// Load/store masks for `V` vectors covering the next `left` values: full vectors, then one
/// holding the remainder, then empty ones.
fn tail_masks<const V: usize>(left: usize) -> [__mmask16; V] {
    std::array::from_fn(|v| {
        let n = left.saturating_sub(v * L).min(L);
        if n == L {
            0xffff
        } else {
            ((1u32 << n) - 1) as __mmask16
        }
    })
}

/// Whether this CPU can run the kernels.
pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
}

/// Whether the kernels cover this convolution: whole vectors of output channels (and, for the
/// input gradient, of input channels).
pub fn supports(conv: &Conv2d) -> bool {
    conv.cout.is_multiple_of(L)
}

/// The input zero-padded by `pad` on each side of H and W (borrowed when `pad` is 0). Written
/// in one pass, borders and rows in order, rather than zero-filled and then copied over.
fn pad_nhwc(x: &[f32], xs: Nhwc, pad: usize) -> Cow<'_, [f32]> {
    if pad == 0 {
        return Cow::Borrowed(x);
    }
    let (hp, wp, c) = (xs.h + 2 * pad, xs.w + 2 * pad, xs.c);
    let img = hp * wp * c;
    let band = vec![0.0f32; pad * wp * c];
    let side = &band[..pad * c];
    let mut out: Vec<f32> = Vec::with_capacity(xs.n * img);
    out.spare_capacity_mut()[..xs.n * img]
        .par_chunks_mut(img)
        .zip(x.par_chunks(xs.h * xs.w * c))
        .for_each(|(dst, src)| {
            let mut at = 0;
            let mut put = |vals: &[f32]| {
                for (d, &v) in dst[at..at + vals.len()].iter_mut().zip(vals) {
                    d.write(v);
                }
                at += vals.len();
            };
            put(&band);
            for row in src.chunks(xs.w * c) {
                put(side);
                put(row);
                put(side);
            }
            put(&band);
            assert_eq!(at, img, "pad_nhwc: every value written once");
        });
    // SAFETY: each image's `img` values were all written above (asserted per image).
    unsafe { out.set_len(xs.n * img) };
    Cow::Owned(out)
}

/// An OIHW weight as `[cout / cb][ky][kx·cin + ci][cb]`: per block of `cb` output channels, the
/// matrix each window row is multiplied with.
fn pack_weight(w: &[f32], cout: usize, cin: usize, k: usize, cb: usize) -> Vec<f32> {
    let kc = k * cin;
    let mut out = vec![0.0f32; w.len()];
    for co in 0..cout {
        let (blk, l) = (co / cb, co % cb);
        for ci in 0..cin {
            for ky in 0..k {
                for kx in 0..k {
                    let j = kx * cin + ci;
                    out[((blk * k + ky) * kc + j) * cb + l] =
                        w[((co * cin + ci) * k + ky) * k + kx];
                }
            }
        }
    }
    out
}

/// The weight of the convolution that maps an output gradient back to its input, for stride 1:
/// `w'[ci][co][ky][kx] = w[co][ci][k−1−ky][k−1−kx]`, OIHW with O = cin and I = cout.
pub(crate) fn flip_transpose(w: &[f32], cout: usize, cin: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; w.len()];
    for co in 0..cout {
        for ci in 0..cin {
            for ky in 0..k {
                for kx in 0..k {
                    out[((ci * cout + co) * k + ky) * k + kx] =
                        w[((co * cin + ci) * k + (k - 1 - ky)) * k + (k - 1 - kx)];
                }
            }
        }
    }
    out
}

/// Offset into the padded input of each output pixel's window corner.
fn window_offsets(
    n: usize, ho: usize, wo: usize, hp: usize, wp: usize, c: usize, s: usize,
) -> Vec<usize> {
    let mut offs = Vec::with_capacity(n * ho * wo);
    for img in 0..n {
        for oy in 0..ho {
            for ox in 0..wo {
                offs.push(((img * hp + oy * s) * wp + ox * s) * c);
            }
        }
    }
    offs
}

/// `y = conv(x, w) + b` for an NHWC batch; `w` OIHW, `b` optional; then ReLU (as PyTorch: NaN
/// passes) on the registers before they are stored when `relu`. Panics if not [`supports`];
/// the caller checks [`available`].
pub fn conv_forward(
    y: &mut [f32], x: &[f32], w: &[f32], b: Option<&[f32]>, xs: Nhwc, conv: &Conv2d, relu: bool,
) {
    assert!(supports(conv) && xs.c == conv.cin);
    assert_eq!(y.len(), conv.out_shape(xs).len(), "direct conv: y length");
    assert_eq!(x.len(), xs.len(), "direct conv: x length");
    let (xp, offs, row) = padded_windows(x, xs, conv);
    let geom = (conv.cout, conv.cin, conv.k);
    run_forward(y, &xp, &offs, row, w, b, geom, relu);
}

/// The input zero-padded by the convolution's padding, the offset of each output pixel's
/// window in it, and its row length: what the forward and the weight gradient slide over.
fn padded_windows<'a>(
    x: &'a [f32], xs: Nhwc, conv: &Conv2d,
) -> (Cow<'a, [f32]>, Vec<usize>, usize) {
    let ys = conv.out_shape(xs);
    let xp = pad_nhwc(x, xs, conv.pad);
    let (hp, wp) = (xs.h + 2 * conv.pad, xs.w + 2 * conv.pad);
    let offs = window_offsets(xs.n, ys.h, ys.w, hp, wp, xs.c, conv.stride);
    (xp, offs, wp * xs.c)
}

/// `dx = ∂L/∂x` of a stride-1 convolution from `dy`, overwriting `dx`.
pub fn conv_backward_data(dx: &mut [f32], dy: &[f32], w: &[f32], xs: Nhwc, conv: &Conv2d) {
    assert!(conv.stride == 1 && conv.cin.is_multiple_of(L) && xs.c == conv.cin);
    assert!(conv.pad < conv.k, "direct conv: padding wider than the kernel");
    let ys = conv.out_shape(xs);
    assert_eq!(dy.len(), ys.len(), "direct conv: dy length");
    assert_eq!(dx.len(), xs.len(), "direct conv: dx length");
    // A full correlation of dy (padded by k−1−pad) with the flipped kernel lands on x's grid.
    let pad = conv.k - 1 - conv.pad;
    let dyp = pad_nhwc(dy, ys, pad);
    let (hp, wp) = (ys.h + 2 * pad, ys.w + 2 * pad);
    let offs = window_offsets(xs.n, xs.h, xs.w, hp, wp, conv.cout, 1);
    let wt = flip_transpose(w, conv.cout, conv.cin, conv.k);
    let geom = (conv.cin, conv.cout, conv.k);
    run_forward(dx, &dyp, &offs, wp * conv.cout, &wt, None, geom, false);
}

/// Output channels per register tile and pixels per tile for `cout` channels.
fn forward_tile(cout: usize) -> (usize, usize) {
    if cout.is_multiple_of(4 * L) {
        (4, 6)
    } else if cout.is_multiple_of(3 * L) {
        (3, 8)
    } else if cout.is_multiple_of(2 * L) {
        (2, 12)
    } else {
        (1, 16)
    }
}

#[allow(clippy::too_many_arguments)]
fn run_forward(
    y: &mut [f32], xp: &[f32], offs: &[usize], row: usize, w: &[f32], b: Option<&[f32]>,
    (cout, cin, k): (usize, usize, usize), relu: bool,
) {
    let cb = forward_block(cout);
    let wpk = pack_weight(w, cout, cin, k, cb);
    let packed = Packed { w: &wpk, j_stride: cb, blk_stride: k * k * cin * cb };
    run_forward_packed(y, xp, offs, row, packed, b, (cout, cin, k), relu);
}

/// A forward weight in blocks of [`forward_block`] output channels: the `cb` values of block
/// `blk`, window row `ky`, position `j` start at `blk·blk_stride + (ky·k·cin + j)·j_stride`.
/// [`pack_weight`] makes them contiguous (`j_stride = cb`); the Winograd weights interleave
/// their 36 planes (`j_stride = 36·cb`).
#[derive(Clone, Copy)]
pub(crate) struct Packed<'a> {
    pub w: &'a [f32],
    pub j_stride: usize,
    pub blk_stride: usize,
}

/// Output channels per block of a packed forward weight (see `pack_weight`).
pub fn forward_block(cout: usize) -> usize {
    forward_tile(cout).0 * L
}

/// [`run_forward`] with the weight already packed ([`Packed`]).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run_forward_packed(
    y: &mut [f32], xp: &[f32], offs: &[usize], row: usize, wpk: Packed, b: Option<&[f32]>,
    (cout, cin, k): (usize, usize, usize), relu: bool,
) {
    let (v, r) = forward_tile(cout);
    let cb = v * L;
    let kc = k * cin;
    let last = (cout / cb - 1) * wpk.blk_stride + (k * kc - 1) * wpk.j_stride + cb;
    assert!(last <= wpk.w.len(), "direct conv: packed weight too short");
    assert_eq!(y.len(), offs.len() * cout, "direct conv: output length");
    // Every read stays inside xp: the last window of each pixel ends inside the padded image.
    if let Some(&last) = offs.iter().max() {
        assert!(last + (k - 1) * row + kc <= xp.len(), "direct conv: window outside input");
    }
    let job = Tile {
        xp,
        row,
        k,
        kc,
        wpk: wpk.w,
        w_j: wpk.j_stride,
        w_blk: wpk.blk_stride,
        b,
        cout,
        cb,
        relu,
    };
    y.par_chunks_mut(r * cout).zip(offs.par_chunks(r)).for_each(|(yt, ot)| {
        // SAFETY: avx512f was checked by the caller (`available`); offsets are in bounds
        // (asserted above) and yt holds ot.len() rows of cout.
        unsafe {
            match (v, r) {
                (4, 6) => job.forward::<6, 4>(yt, ot),
                (3, 8) => job.forward::<8, 3>(yt, ot),
                (2, 12) => job.forward::<12, 2>(yt, ot),
                _ => job.forward::<16, 1>(yt, ot),
            }
        }
    });
}

/// What every forward tile of one convolution shares.
struct Tile<'a> {
    xp: &'a [f32],
    row: usize,
    k: usize,
    kc: usize,
    wpk: &'a [f32],
    w_j: usize,
    w_blk: usize,
    b: Option<&'a [f32]>,
    cout: usize,
    cb: usize,
    relu: bool,
}

impl Tile<'_> {
    /// All output channels of up to `R` pixels (`ot`: their window offsets).
    #[target_feature(enable = "avx512f")]
    unsafe fn forward<const R: usize, const V: usize>(&self, yt: &mut [f32], ot: &[usize]) {
        let valid = ot.len();
        // A short last tile repeats its last pixel; only the valid rows are stored.
        let offs: [usize; R] = std::array::from_fn(|i| ot[i.min(valid - 1)]);
        let x = self.xp.as_ptr();
        for blk in 0..self.cout / self.cb {
            let w = self.wpk.as_ptr().add(blk * self.w_blk);
            let mut acc = [[_mm512_setzero_ps(); V]; R];
            if let Some(b) = self.b {
                for v in 0..V {
                    let bv = _mm512_loadu_ps(b.as_ptr().add(blk * self.cb + v * L));
                    for a in acc.iter_mut() {
                        a[v] = bv;
                    }
                }
            }
            for ky in 0..self.k {
                let xs: [*const f32; R] = std::array::from_fn(|i| x.add(offs[i] + ky * self.row));
                let wk = w.add(ky * self.kc * self.w_j);
                for j in 0..self.kc {
                    let wj = wk.add(j * self.w_j);
                    let wv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(wj.add(v * L)));
                    for i in 0..R {
                        let bx = _mm512_set1_ps(*xs[i].add(j));
                        for v in 0..V {
                            acc[i][v] = _mm512_fmadd_ps(bx, wv[v], acc[i][v]);
                        }
                    }
                }
            }
            if self.relu {
                // max(0, a) returns a when a is NaN (the second operand), as PyTorch's ReLU.
                let zero = _mm512_setzero_ps();
                for a in acc.iter_mut() {
                    for av in a.iter_mut() {
                        *av = _mm512_max_ps(zero, *av);
                    }
                }
            }
            let out = yt.as_mut_ptr().add(blk * self.cb);
            for (i, a) in acc.iter().enumerate().take(valid) {
                for (v, &av) in a.iter().enumerate() {
                    _mm512_storeu_ps(out.add(i * self.cout + v * L), av);
                }
            }
        }
    }
}

/// `dw += ∂L/∂w` (OIHW) of a convolution from its input `x` and output gradient `dy`.
pub fn conv_backward_weight(dw: &mut [f32], dy: &[f32], x: &[f32], xs: Nhwc, conv: &Conv2d) {
    assert!(supports(conv) && xs.c == conv.cin);
    let ys = conv.out_shape(xs);
    assert_eq!(dy.len(), ys.len(), "direct conv: dy length");
    assert_eq!(dw.len(), conv.weight_len(), "direct conv: dw length");
    let (xp, offs, row) = padded_windows(x, xs, conv);
    let (k, cin, cout) = (conv.k, conv.cin, conv.cout);
    let kc = k * cin;
    if let Some(&last) = offs.iter().max() {
        assert!(last + (k - 1) * row + kc <= xp.len(), "direct conv: window outside input");
    }
    let p = offs.len();
    let piece = p.div_ceil(PIECES);
    // Per piece of pixels, dwp[co][ky][j] (OHWI), summed over the piece's pixels in order.
    let parts: Vec<Vec<f32>> = (0..PIECES)
        .into_par_iter()
        .map(|i| {
            let (p0, p1) = ((i * piece).min(p), ((i + 1) * piece).min(p));
            let mut part = vec![0.0f32; cout * k * kc];
            if p1 > p0 {
                let job = WeightTile {
                    xp: &xp,
                    offs: &offs[p0..p1],
                    dy: &dy[p0 * cout..p1 * cout],
                    cout,
                    k,
                    kc,
                    row,
                };
                // SAFETY: avx512f checked by the caller; reads stay in bounds (asserted above).
                unsafe { job.run(&mut part) };
            }
            part
        })
        .collect();
    // The pieces summed in order, then added onto dw.
    let mut total = vec![0.0f32; cout * k * kc];
    for part in &parts {
        for (t, &v) in total.iter_mut().zip(part) {
            *t += v;
        }
    }
    super::add_ohwi_to_oihw(dw, &total, conv);
}

/// One piece of pixels of a weight gradient.
struct WeightTile<'a> {
    xp: &'a [f32],
    offs: &'a [usize],
    dy: &'a [f32],
    cout: usize,
    k: usize,
    kc: usize,
    row: usize,
}

/// Output channels broadcast per weight-gradient tile.
const WR: usize = 8;

impl WeightTile<'_> {
    #[target_feature(enable = "avx512f")]
    unsafe fn run(&self, part: &mut [f32]) {
        // A window row of the first layer is 7 pixels × 3 channels = 21 values: whole vectors
        // of j would waste most lanes, so there the vectors run over output channels instead.
        if !self.kc.is_multiple_of(L)
            && self.cout.is_multiple_of(4 * L)
            && self.kc.is_multiple_of(7)
        {
            for co0 in (0..self.cout).step_by(4 * L) {
                for ky in 0..self.k {
                    for j0 in (0..self.kc).step_by(7) {
                        self.block_co::<7>(part, co0, ky, j0);
                    }
                }
            }
            return;
        }
        let mut j0 = 0;
        while j0 < self.kc {
            let left = self.kc - j0;
            let step = if left >= 3 * L {
                self.block::<3>(part, j0, left);
                3 * L
            } else if left >= 2 * L {
                self.block::<2>(part, j0, left);
                2 * L
            } else {
                self.block::<1>(part, j0, left);
                L
            };
            j0 += step;
        }
    }

    /// `R` values of `j` from `j0` × 64 output channels from `co0` (4 vectors), for row `ky`.
    #[target_feature(enable = "avx512f")]
    unsafe fn block_co<const R: usize>(&self, part: &mut [f32], co0: usize, ky: usize, j0: usize) {
        const V: usize = 4;
        let x = self.xp.as_ptr();
        let xo = ky * self.row + j0;
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for (pi, &o) in self.offs.iter().enumerate() {
            let d = self.dy.as_ptr().add(pi * self.cout + co0);
            let dv: [__m512; V] = std::array::from_fn(|v| _mm512_loadu_ps(d.add(v * L)));
            let xr = x.add(o + xo);
            for (r, a) in acc.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*xr.add(r));
                for v in 0..V {
                    a[v] = _mm512_fmadd_ps(b, dv[v], a[v]);
                }
            }
        }
        // acc[r][v] lane l is dwp[co0 + 16v + l][ky][j0 + r].
        let kkc = self.k * self.kc;
        let mut lanes = [0.0f32; L];
        for (r, a) in acc.iter().enumerate() {
            for (v, &av) in a.iter().enumerate() {
                _mm512_storeu_ps(lanes.as_mut_ptr(), av);
                for (l, &val) in lanes.iter().enumerate() {
                    part[(co0 + v * L + l) * kkc + ky * self.kc + j0 + r] = val;
                }
            }
        }
    }

    /// `V` vectors of `j` from `j0` (the last one masked to `left` values) × every group of
    /// [`WR`] output channels, for every `ky`.
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const V: usize>(&self, part: &mut [f32], j0: usize, left: usize) {
        let masks = tail_masks::<V>(left);
        let x = self.xp.as_ptr();
        let dy = self.dy.as_ptr();
        for ky in 0..self.k {
            let xo = ky * self.row + j0;
            for c0 in (0..self.cout).step_by(WR) {
                let mut acc = [[_mm512_setzero_ps(); V]; WR];
                for (pi, &o) in self.offs.iter().enumerate() {
                    let xr = x.add(o + xo);
                    let xv: [__m512; V] =
                        std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], xr.add(v * L)));
                    let d = dy.add(pi * self.cout + c0);
                    for (r, a) in acc.iter_mut().enumerate() {
                        let b = _mm512_set1_ps(*d.add(r));
                        for v in 0..V {
                            a[v] = _mm512_fmadd_ps(b, xv[v], a[v]);
                        }
                    }
                }
                for (r, a) in acc.iter().enumerate() {
                    let out = part.as_mut_ptr().add(((c0 + r) * self.k + ky) * self.kc + j0);
                    for v in 0..V {
                        _mm512_mask_storeu_ps(out.add(v * L), masks[v], a[v]);
                    }
                }
            }
        }
    }
}

/// `dx = ∂L/∂x` of a convolution of any stride, overwriting `dx`: each output pixel's gradient
/// times the weight is added back onto its window (the adjoint of the forward), image by image
/// so that the overlapping windows of one image are added by one thread, in pixel order.
pub fn conv_backward_data_scatter(dx: &mut [f32], dy: &[f32], w: &[f32], xs: Nhwc, conv: &Conv2d) {
    assert!(supports(conv) && xs.c == conv.cin);
    let ys = conv.out_shape(xs);
    assert_eq!(dy.len(), ys.len(), "direct conv: dy length");
    assert_eq!(dx.len(), xs.len(), "direct conv: dx length");
    let (k, cin, cout, pad) = (conv.k, conv.cin, conv.cout, conv.pad);
    let (hp, wp) = (xs.h + 2 * pad, xs.w + 2 * pad);
    let kc = k * cin;
    // The weight as [co][ky][j] (OHWI): a dy value scales a contiguous run of j.
    let wt = super::weight_oihw_to_ohwi(w, conv);
    let img_out = ys.h * ys.w;
    let job = Scatter { wt: &wt, k, kc, row: wp * cin };
    let bound = (k - 1) * job.row + kc;
    dx.par_chunks_mut(xs.h * xs.w * cin).zip(dy.par_chunks(img_out * cout)).for_each(
        |(dxi, dyi)| {
            let mut acc = vec![0.0f32; hp * wp * cin];
            let bases: Vec<usize> = (0..img_out)
                .map(|p| ((p / ys.w) * conv.stride * wp + (p % ys.w) * conv.stride) * cin)
                .collect();
            for (pb, gb) in bases.chunks(SR).zip(dyi.chunks(SR * cout)) {
                assert!(pb.iter().all(|&b| b + bound <= acc.len()));
                // SAFETY: avx512f checked by the caller; every window lies inside the padded
                // image (asserted) and gb holds cout values per pixel of pb.
                unsafe { job.add_windows(&mut acc, pb, gb) };
            }
            for y in 0..xs.h {
                let s = ((y + pad) * wp + pad) * cin;
                dxi[y * xs.w * cin..(y + 1) * xs.w * cin].copy_from_slice(&acc[s..s + xs.w * cin]);
            }
        },
    );
}

/// Output pixels per scatter tile.
const SR: usize = 6;

struct Scatter<'a> {
    wt: &'a [f32],
    k: usize,
    kc: usize,
    row: usize,
}

impl Scatter<'_> {
    /// For up to [`SR`] output pixels with window corners `bases` and gradients `g`
    /// (`[pixel][co]`): `img[base + ky·row + j] += Σ_co g[co] · wt[co][ky][j]`, pixel by pixel
    /// in order, since neighbouring windows overlap.
    #[target_feature(enable = "avx512f")]
    unsafe fn add_windows(&self, img: &mut [f32], bases: &[usize], g: &[f32]) {
        const V: usize = 4;
        let valid = bases.len();
        let cout = g.len() / valid;
        let gp: [*const f32; SR] = std::array::from_fn(|i| g.as_ptr().add(i.min(valid - 1) * cout));
        for ky in 0..self.k {
            let mut j0 = 0;
            while j0 < self.kc {
                let left = self.kc - j0;
                let masks = tail_masks::<V>(left);
                let mut acc = [[_mm512_setzero_ps(); V]; SR];
                let w = self.wt.as_ptr().add(ky * self.kc + j0);
                for co in 0..cout {
                    let wr = w.add(co * self.k * self.kc);
                    let wv: [__m512; V] =
                        std::array::from_fn(|v| _mm512_maskz_loadu_ps(masks[v], wr.add(v * L)));
                    for i in 0..SR {
                        let b = _mm512_set1_ps(*gp[i].add(co));
                        for v in 0..V {
                            acc[i][v] = _mm512_fmadd_ps(b, wv[v], acc[i][v]);
                        }
                    }
                }
                for (i, a) in acc.iter().enumerate().take(valid) {
                    let out = img.as_mut_ptr().add(bases[i] + ky * self.row + j0);
                    for v in 0..V {
                        let o = out.add(v * L);
                        let cur = _mm512_maskz_loadu_ps(masks[v], o);
                        _mm512_mask_storeu_ps(o, masks[v], _mm512_add_ps(cur, a[v]));
                    }
                }
                j0 += V * L;
            }
        }
    }
}
