//! Winograd F(4×4, 3×3) for the 3×3, stride-1, padding-1 convolutions (Lavin & Gray, 2016).
//!
//! Each 4×4 block of outputs comes from a 6×6 block of input: `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A`.
//! Over all tiles and channels the elementwise product becomes 36 independent GEMMs
//! `M_ξ = V_ξ · U_ξᵀ` ([tiles, Cin] × [Cin, Cout]), run with the direct kernel, so a 3×3
//! convolution costs 36 multiply-adds per 16 outputs instead of 144: 4× fewer. The
//! transforms add a few percent (the 7×7 maps of block 3 overhang their 2×2 tiles of 4×4, so
//! there the gain is nearer 2×). The input gradient of the same convolution is one too (the
//! flipped, transposed kernel over the output gradient), and the weight gradient is the adjoint
//! (`Gᵀ [Σ_tiles (A ∂Y Aᵀ) ⊙ (Bᵀ d B)] G`). The rounding differs from a direct sum by a few
//! ulps of the largest terms (1e-5 – 3e-5 of the largest output); `tests/direct_conv.rs`
//! bounds it at the model's shapes against an f64 reference.

use super::direct;
use crate::backend::{Conv2d, Nhwc};
use rayon::prelude::*;

use std::arch::x86_64::*;
use std::mem::MaybeUninit;

/// Output tile side, input tile side.
const M: usize = 4;
const T: usize = 6;
/// Elements per tile in the transformed domain.
const XI: usize = T * T;
/// f32 lanes of an AVX-512 register.
const L: usize = 16;

// The transforms themselves are written out: G in `g6v`, Bᵀ in `bt`, Aᵀ in `at` (points 0,
// ±1, ±2, ∞), and their adjoints Gᵀ in `gt3v`, A in `a6`.

/// Whether a convolution is one these kernels compute: 3×3, stride 1, padding 1, whole
/// vectors of channels (16 input channels already pay for the transforms: at the model's
/// shapes `benches/conv_kernels.rs` measures it ahead of the direct kernel from there up).
pub fn supports(conv: &Conv2d) -> bool {
    conv.k == 3
        && conv.stride == 1
        && conv.pad == 1
        && conv.cout.is_multiple_of(L)
        && conv.cin.is_multiple_of(L)
        && conv.cin > 0
}

/// `y = conv(x, w) + b` (then ReLU when `relu`) for an NHWC batch; `w` OIHW. Panics unless
/// [`supports`]; the caller checks [`direct::available`].
pub fn conv_forward(
    y: &mut [f32], x: &[f32], w: &[f32], b: Option<&[f32]>, xs: Nhwc, conv: &Conv2d, relu: bool,
) {
    assert!(supports(conv) && xs.c == conv.cin, "winograd: unsupported {conv:?}");
    assert_eq!(x.len(), xs.len(), "winograd: x length");
    assert_eq!(y.len(), conv.out_shape(xs).len(), "winograd: y length");
    let (cin, cout) = (conv.cin, conv.cout);
    let (th, tw) = (xs.h.div_ceil(M), xs.w.div_ceil(M));
    let tiles = xs.n * th * tw;
    if tiles == 0 {
        return;
    }
    let cb = direct::forward_block(cout);
    direct::with_scratch(XI * cout * cin, |u| {
        transform_weight(u, w, cout, cin, cb);
        let u = &*u;
        direct::with_scratch(tiles * XI * cin, |v| {
            transform_input(v, x, xs, th, tw);
            direct::with_scratch(XI * tiles * cout, |m| {
                // M_ξ = V_ξ · U_ξᵀ. V is laid out [tile][ξ][cin], so the rows of V_ξ are 36·cin
                // apart; U is [blk][cin][ξ][cb], so plane ξ starts at ξ·cb with rows 36·cb apart.
                m.par_chunks_mut(tiles * cout).enumerate().for_each(|(xi, m_xi)| {
                    let offs: Vec<usize> = (0..tiles).map(|t| (t * XI + xi) * cin).collect();
                    let packed = direct::Packed {
                        w: &u[xi * cb..],
                        j_stride: XI * cb,
                        blk_stride: cin * XI * cb,
                    };
                    direct::run_forward_packed(
                        m_xi,
                        v,
                        &offs,
                        0,
                        packed,
                        None,
                        (cout, cin, 1),
                        false,
                    );
                });
                transform_output(y, m, b, xs, (th, tw), cout, relu);
            });
        });
    });
}

/// `dx = ∂L/∂x` of such a convolution from `dy` (overwritten): the same transform with the
/// flipped, transposed kernel, which maps `cout` channels back to `cin`.
pub fn conv_backward_data(dx: &mut [f32], dy: &[f32], w: &[f32], xs: Nhwc, conv: &Conv2d) {
    let back = backward_data_conv(conv);
    let wt = direct::flip_transpose(w, conv.cout, conv.cin, conv.k);
    conv_forward(dx, dy, &wt, None, conv.out_shape(xs), &back, false);
}

/// The convolution that computes `conv`'s input gradient (for a 3×3 stride-1 padding-1 one):
/// `cout` channels back to `cin`. [`supports`] of it says whether [`conv_backward_data`] runs.
pub fn backward_data_conv(conv: &Conv2d) -> Conv2d {
    Conv2d { cin: conv.cout, cout: conv.cin, ..*conv }
}

/// `U_ξ = (G g Gᵀ)[ξ]` for every 3×3 kernel `g = w[co][ci]` into `u`, laid out for the direct
/// kernel as `[co / cb][ci][ξ][co % cb]`: each (block, input channel) is one contiguous run of
/// 36·cb.
fn transform_weight(u: &mut [f32], w: &[f32], cout: usize, cin: usize, cb: usize) {
    assert_eq!(u.len(), XI * cout * cin);
    assert!(cb.is_multiple_of(L));
    u.par_chunks_mut(XI * cb).enumerate().for_each(|(bc, run)| {
        let (blk, ci) = (bc / cin, bc % cin);
        for l0 in (0..cb).step_by(L) {
            // The 9 taps of 16 kernels (output channels blk·cb + l0 ..), one vector per tap.
            let g: [[f32; L]; 9] = std::array::from_fn(|kk| {
                std::array::from_fn(|l| w[((blk * cb + l0 + l) * cin + ci) * 9 + kk])
            });
            // SAFETY: avx512f checked by the caller; run holds 36·cb values.
            unsafe { weight_lanes(&g, &mut run[l0..], cb) };
        }
    });
}

/// `G g Gᵀ` for 16 kernels at once (one per lane): `out[ξ·stride ..][..16]`.
#[target_feature(enable = "avx512f")]
unsafe fn weight_lanes(g: &[[f32; L]; 9], out: &mut [f32], stride: usize) {
    assert!(out.len() >= (XI - 1) * stride + L);
    let gv: [__m512; 9] = std::array::from_fn(|kk| _mm512_loadu_ps(g[kk].as_ptr()));
    // Gg (6×3) column by column, then (Gg)Gᵀ (6×6) row by row.
    let cols: [[__m512; T]; 3] = std::array::from_fn(|j| g6v([gv[j], gv[3 + j], gv[6 + j]]));
    for i in 0..T {
        for (j, v) in g6v([cols[0][i], cols[1][i], cols[2][i]]).into_iter().enumerate() {
            _mm512_storeu_ps(out[(i * T + j) * stride..][..L].as_mut_ptr(), v);
        }
    }
}

/// [`g6`] on 16 lanes.
#[inline(always)]
unsafe fn g6v([g0, g1, g2]: [__m512; 3]) -> [__m512; T] {
    let k = |v: f32| _mm512_set1_ps(v);
    let s02 = _mm512_add_ps(g0, g2);
    // g0/24 + g2/6 and g1/12
    let e = _mm512_fmadd_ps(k(1.0 / 24.0), g0, _mm512_mul_ps(k(1.0 / 6.0), g2));
    let o = _mm512_mul_ps(k(1.0 / 12.0), g1);
    [
        _mm512_mul_ps(k(0.25), g0),
        _mm512_mul_ps(k(-1.0 / 6.0), _mm512_add_ps(s02, g1)),
        _mm512_mul_ps(k(-1.0 / 6.0), _mm512_sub_ps(s02, g1)),
        _mm512_add_ps(e, o),
        _mm512_sub_ps(e, o),
        g2,
    ]
}

/// Bᵀ applied to a column of 6: the input transform.
#[inline(always)]
unsafe fn bt(z: [__m512; T]) -> [__m512; T] {
    let k = |v: f32| _mm512_set1_ps(v);
    let s12 = _mm512_add_ps(z[1], z[2]);
    let d12 = _mm512_sub_ps(z[1], z[2]);
    let s34 = _mm512_add_ps(z[3], z[4]);
    let d43 = _mm512_sub_ps(z[4], z[3]);
    let d42 = _mm512_sub_ps(z[4], z[2]);
    let d31 = _mm512_sub_ps(z[3], z[1]);
    [
        // 4 z0 − 5 z2 + z4
        _mm512_fmadd_ps(k(4.0), z[0], _mm512_fmadd_ps(k(-5.0), z[2], z[4])),
        // z3 + z4 − 4 (z1 + z2)
        _mm512_fmadd_ps(k(-4.0), s12, s34),
        // z4 − z3 + 4 (z1 − z2)
        _mm512_fmadd_ps(k(4.0), d12, d43),
        // z4 − z2 + 2 (z3 − z1)
        _mm512_fmadd_ps(k(2.0), d31, d42),
        // z4 − z2 − 2 (z3 − z1)
        _mm512_fmadd_ps(k(-2.0), d31, d42),
        // 4 z1 − 5 z3 + z5
        _mm512_fmadd_ps(k(4.0), z[1], _mm512_fmadd_ps(k(-5.0), z[3], z[5])),
    ]
}

/// Aᵀ applied to a column of 6: the output transform.
#[inline(always)]
unsafe fn at(m: [__m512; T]) -> [__m512; M] {
    let k = |v: f32| _mm512_set1_ps(v);
    let s12 = _mm512_add_ps(m[1], m[2]);
    let d12 = _mm512_sub_ps(m[1], m[2]);
    let s34 = _mm512_add_ps(m[3], m[4]);
    let d34 = _mm512_sub_ps(m[3], m[4]);
    [
        _mm512_add_ps(_mm512_add_ps(m[0], s12), s34),
        _mm512_fmadd_ps(k(2.0), d34, d12),
        _mm512_fmadd_ps(k(4.0), s34, s12),
        _mm512_add_ps(_mm512_fmadd_ps(k(8.0), d34, d12), m[5]),
    ]
}

/// `V = Bᵀ d B` for every 6×6 input tile (zero outside the image) into `v`: [tile][36][c].
fn transform_input(v: &mut [f32], x: &[f32], xs: Nhwc, th: usize, tw: usize) {
    let c = xs.c;
    assert_eq!(v.len(), xs.n * th * tw * XI * c);
    v.par_chunks_mut(XI * c).enumerate().for_each(|(t, vt)| {
        let (n, ty, tx) = (t / (th * tw), (t / tw) % th, t % tw);
        // SAFETY: avx512f checked by the caller; reads are bounds-checked below, and vt
        // holds 36·c values.
        unsafe { input_tile(x, xs, (n, ty, tx), vt) };
    });
}

// Columns of the tile are indexed across rows of `at_ij`: a range loop reads clearest.
#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f")]
unsafe fn input_tile(x: &[f32], xs: Nhwc, (n, ty, tx): (usize, usize, usize), vt: &mut [f32]) {
    let c = xs.c;
    assert_eq!(vt.len(), XI * c);
    // Offset of d[i][j] = x[n, 4ty − 1 + i, 4tx − 1 + j, :], or None outside the image.
    let mut at_ij = [[None; T]; T];
    for (i, row) in at_ij.iter_mut().enumerate() {
        for (j, a) in row.iter_mut().enumerate() {
            let (yy, xx) = ((M * ty + i) as isize - 1, (M * tx + j) as isize - 1);
            if yy >= 0 && xx >= 0 && yy < xs.h as isize && xx < xs.w as isize {
                *a = Some(((n * xs.h + yy as usize) * xs.w + xx as usize) * c);
            }
        }
    }
    for cb in (0..c).step_by(L) {
        // tmp = Bᵀ d, column by column. Left uninitialised until written (zeroing it costs a
        // memset), and built in plain loops: closures would not inline the intrinsics.
        let mut tmp = MaybeUninit::<[[__m512; T]; T]>::uninit();
        let tp = tmp.as_mut_ptr() as *mut __m512;
        for j in 0..T {
            let mut col = [_mm512_setzero_ps(); T];
            for (i, v) in col.iter_mut().enumerate() {
                if let Some(o) = at_ij[i][j] {
                    *v = _mm512_loadu_ps(x[o + cb..o + cb + L].as_ptr());
                }
            }
            for (i, r) in bt(col).into_iter().enumerate() {
                tp.add(i * T + j).write(r);
            }
        }
        // SAFETY: all 36 entries were written above.
        let tmp = tmp.assume_init();
        // V = tmp B, row by row.
        for (i, row) in tmp.into_iter().enumerate() {
            for (j, r) in bt(row).into_iter().enumerate() {
                _mm512_storeu_ps(vt[(i * T + j) * c + cb..][..L].as_mut_ptr(), r);
            }
        }
    }
}

/// `y = Aᵀ M A + b` (then ReLU) for every tile, keeping the outputs inside the map.
fn transform_output(
    y: &mut [f32], m: &[f32], b: Option<&[f32]>, xs: Nhwc, (th, tw): (usize, usize), c: usize,
    relu: bool,
) {
    let tiles = xs.n * th * tw;
    y.par_chunks_mut(xs.h * xs.w * c).enumerate().for_each(|(n, img)| {
        for ty in 0..th {
            for tx in 0..tw {
                let t = (n * th + ty) * tw + tx;
                // SAFETY: avx512f checked by the caller; every index is bounds-checked.
                unsafe { output_tile(img, m, b, (tiles, t), xs, (ty, tx), c, relu) };
            }
        }
    });
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn output_tile(
    img: &mut [f32], m: &[f32], b: Option<&[f32]>, (tiles, t): (usize, usize), xs: Nhwc,
    (ty, tx): (usize, usize), c: usize, relu: bool,
) {
    let zero = _mm512_setzero_ps();
    for cb in (0..c).step_by(L) {
        // tmp = Aᵀ M (4×6), column by column; Y = tmp A (4×4), row by row.
        let mut tmp = MaybeUninit::<[[__m512; T]; M]>::uninit();
        let tp = tmp.as_mut_ptr() as *mut __m512;
        for j in 0..T {
            let mut col = [zero; T];
            for (i, v) in col.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(m[((i * T + j) * tiles + t) * c + cb..][..L].as_ptr());
            }
            for (i, r) in at(col).into_iter().enumerate() {
                tp.add(i * T + j).write(r);
            }
        }
        // SAFETY: all 24 entries were written above.
        let tmp = tmp.assume_init();
        let bias = match b {
            Some(b) => _mm512_loadu_ps(b[cb..cb + L].as_ptr()),
            None => zero,
        };
        for (i, row) in tmp.into_iter().enumerate() {
            let yy = M * ty + i;
            if yy >= xs.h {
                break;
            }
            for (j, mut r) in at(row).into_iter().enumerate() {
                let xx = M * tx + j;
                if xx >= xs.w {
                    break;
                }
                r = _mm512_add_ps(r, bias);
                if relu {
                    // max(0, r) returns r when r is NaN, as PyTorch's ReLU.
                    r = _mm512_max_ps(zero, r);
                }
                _mm512_storeu_ps(img[(yy * xs.w + xx) * c + cb..][..L].as_mut_ptr(), r);
            }
        }
    }
}

/// `dw += ∂L/∂w` (OIHW) of such a convolution from its input `x` and output gradient `dy`.
///
/// With `M_ξ = U_ξ ⊙ V_ξ` and `Y = Aᵀ M A`, the gradient of the transformed kernel is
/// `∂L/∂U_ξ = Σ_tiles (A ∂Y Aᵀ)_ξ · V_ξ`: 36 GEMMs reducing over the tiles, [cout, tiles] ×
/// [tiles, cin]; then `∂L/∂g = Gᵀ (∂L/∂U) G`. Each GEMM runs on one thread, so the sums never
/// depend on the thread count.
pub fn conv_backward_weight(dw: &mut [f32], dy: &[f32], x: &[f32], xs: Nhwc, conv: &Conv2d) {
    assert!(supports(conv) && xs.c == conv.cin, "winograd: unsupported {conv:?}");
    assert_eq!(x.len(), xs.len(), "winograd: x length");
    assert_eq!(dy.len(), conv.out_shape(xs).len(), "winograd: dy length");
    assert_eq!(dw.len(), conv.weight_len(), "winograd: dw length");
    let (cin, cout) = (conv.cin, conv.cout);
    let (th, tw) = (xs.h.div_ceil(M), xs.w.div_ceil(M));
    let tiles = xs.n * th * tw;
    if tiles == 0 {
        return;
    }
    direct::with_scratch(tiles * XI * cin, |v| {
        transform_input(v, x, xs, th, tw);
        direct::with_scratch(tiles * XI * cout, |d| {
            let ys = Nhwc { c: cout, ..xs };
            transform_grad(d, dy, ys, th, tw);
            let (v, d) = (&*v, &*d);
            direct::with_scratch(XI * cout * cin, |du| {
                // du_ξ[co][ci] = Σ_t d[t][ξ][co] · v[t][ξ][ci]
                du.par_chunks_mut(cout * cin).enumerate().for_each(|(xi, du_xi)| {
                    super::gemm_on(
                        du_xi,
                        cin,
                        (&d[xi * cout..], 1, XI * cout),
                        (&v[xi * cin..], XI * cin, 1),
                        (cout, cin, tiles),
                        false,
                        gemm::Parallelism::None,
                    );
                });
                let du = &*du;
                dw.par_chunks_mut(cin * 9).enumerate().for_each(|(co, dwc)| {
                    for ci0 in (0..cin).step_by(L) {
                        let mut g = [[0.0f32; L]; 9];
                        // SAFETY: avx512f checked by the caller; du holds 36 planes of
                        // [cout, cin] and cin is a multiple of 16.
                        unsafe { weight_grad_lanes(du, (co, ci0), (cout, cin), &mut g) };
                        for (l, dwk) in dwc[ci0 * 9..(ci0 + L) * 9].chunks_mut(9).enumerate() {
                            for (kk, d) in dwk.iter_mut().enumerate() {
                                *d += g[kk][l];
                            }
                        }
                    }
                });
            });
        });
    });
}

/// `Gᵀ dU G` for 16 input channels at once (one per lane) of output channel `co`:
/// `g[ky·3 + kx][lane]`.
#[target_feature(enable = "avx512f")]
unsafe fn weight_grad_lanes(
    du: &[f32], (co, ci0): (usize, usize), (cout, cin): (usize, usize), g: &mut [[f32; L]; 9],
) {
    let u: [__m512; XI] =
        std::array::from_fn(|xi| _mm512_loadu_ps(du[(xi * cout + co) * cin + ci0..][..L].as_ptr()));
    // Gᵀ u G: columns first (6 → 3), then rows.
    let cols: [[__m512; 3]; T] =
        std::array::from_fn(|j| gt3v(std::array::from_fn(|i| u[i * T + j])));
    for k in 0..3 {
        for (l, v) in gt3v(std::array::from_fn(|j| cols[j][k])).into_iter().enumerate() {
            _mm512_storeu_ps(g[k * 3 + l].as_mut_ptr(), v);
        }
    }
}

/// Gᵀ applied to a column of 6 on 16 lanes: the adjoint of [`g6v`].
#[inline(always)]
unsafe fn gt3v(u: [__m512; T]) -> [__m512; 3] {
    let k = |v: f32| _mm512_set1_ps(v);
    let s12 = _mm512_add_ps(u[1], u[2]);
    let d21 = _mm512_sub_ps(u[2], u[1]);
    let s34 = _mm512_add_ps(u[3], u[4]);
    let d34 = _mm512_sub_ps(u[3], u[4]);
    [
        // u0/4 − (u1 + u2)/6 + (u3 + u4)/24
        _mm512_fmadd_ps(
            k(0.25),
            u[0],
            _mm512_fmadd_ps(k(-1.0 / 6.0), s12, _mm512_mul_ps(k(1.0 / 24.0), s34)),
        ),
        // (u2 − u1)/6 + (u3 − u4)/12
        _mm512_fmadd_ps(k(1.0 / 6.0), d21, _mm512_mul_ps(k(1.0 / 12.0), d34)),
        // (u3 + u4 − u1 − u2)/6 + u5
        _mm512_fmadd_ps(k(1.0 / 6.0), _mm512_sub_ps(s34, s12), u[5]),
    ]
}

/// A (= Aᵀ's transpose) applied to a column of 4: the adjoint of [`at`].
#[inline(always)]
unsafe fn a6(y: [__m512; M]) -> [__m512; T] {
    let k = |v: f32| _mm512_set1_ps(v);
    let s02 = _mm512_add_ps(y[0], y[2]);
    let s13 = _mm512_add_ps(y[1], y[3]);
    // y0 + 4 y2 and 2 y1 + 8 y3
    let e = _mm512_fmadd_ps(k(4.0), y[2], y[0]);
    let o = _mm512_mul_ps(k(2.0), _mm512_fmadd_ps(k(4.0), y[3], y[1]));
    [
        y[0],
        _mm512_add_ps(s02, s13),
        _mm512_sub_ps(s02, s13),
        _mm512_add_ps(e, o),
        _mm512_sub_ps(e, o),
        y[3],
    ]
}

/// `D = A ∂Y Aᵀ` for every 4×4 tile of the output gradient (zero outside the map) into `d`:
/// [tile][36][c].
fn transform_grad(d: &mut [f32], dy: &[f32], ys: Nhwc, th: usize, tw: usize) {
    let c = ys.c;
    assert_eq!(d.len(), ys.n * th * tw * XI * c);
    d.par_chunks_mut(XI * c).enumerate().for_each(|(t, dt)| {
        let (n, ty, tx) = (t / (th * tw), (t / tw) % th, t % tw);
        // SAFETY: avx512f checked by the caller; reads are bounds-checked, dt holds 36·c.
        unsafe { grad_tile(dy, ys, (n, ty, tx), dt) };
    });
}

#[allow(clippy::needless_range_loop)]
#[target_feature(enable = "avx512f")]
unsafe fn grad_tile(dy: &[f32], ys: Nhwc, (n, ty, tx): (usize, usize, usize), dt: &mut [f32]) {
    let c = ys.c;
    assert_eq!(dt.len(), XI * c);
    let mut at_ij = [[None; M]; M];
    for (i, row) in at_ij.iter_mut().enumerate() {
        for (j, a) in row.iter_mut().enumerate() {
            let (yy, xx) = (M * ty + i, M * tx + j);
            if yy < ys.h && xx < ys.w {
                *a = Some(((n * ys.h + yy) * ys.w + xx) * c);
            }
        }
    }
    for cb in (0..c).step_by(L) {
        // tmp = A ∂Y (6×4), column by column; D = tmp Aᵀ (6×6), row by row.
        let mut tmp = MaybeUninit::<[[__m512; M]; T]>::uninit();
        let tp = tmp.as_mut_ptr() as *mut __m512;
        for j in 0..M {
            let mut col = [_mm512_setzero_ps(); M];
            for (i, v) in col.iter_mut().enumerate() {
                if let Some(o) = at_ij[i][j] {
                    *v = _mm512_loadu_ps(dy[o + cb..o + cb + L].as_ptr());
                }
            }
            for (i, r) in a6(col).into_iter().enumerate() {
                tp.add(i * M + j).write(r);
            }
        }
        // SAFETY: all 24 entries were written above.
        let tmp = tmp.assume_init();
        for (i, row) in tmp.into_iter().enumerate() {
            for (j, r) in a6(row).into_iter().enumerate() {
                _mm512_storeu_ps(dt[(i * T + j) * c + cb..][..L].as_mut_ptr(), r);
            }
        }
    }
}
