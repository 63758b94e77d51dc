//! Max pooling (the first maximum of each window wins, NaN propagates) and global average
//! pooling.

use super::*;

/// For each output of a max pooling, the flat index into `x` of the value that wins: the
/// first maximum of the window in scan order (row by row), NaN winning, as in PyTorch. Padding
/// counts as −∞, so a window's winner is always a real input.
pub fn max_pool2d_argmax<T: Elem>(x: &[T], xs: Nhwc, pool: &MaxPool2d) -> Vec<u32> {
    let ys = pool.out_shape(xs);
    let c = xs.c;
    assert!(xs.len() <= u32::MAX as usize, "max_pool2d: input too large for u32 indices");
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
pub(super) fn for_window(
    xs: Nhwc, pool: &MaxPool2d, oy: usize, ox: usize, mut f: impl FnMut(usize, usize),
) {
    let y0 = (oy * pool.stride) as isize - pool.pad as isize;
    let x0 = (ox * pool.stride) as isize - pool.pad as isize;
    for iy in y0.max(0)..(y0 + pool.k as isize).min(xs.h as isize) {
        for ix in x0.max(0)..(x0 + pool.k as isize).min(xs.w as isize) {
            f(iy as usize, ix as usize);
        }
    }
}

impl<T: Elem> PoolOps<T> for Cpu {
    fn max_pool2d_forward(&self, y: &mut Vec<T>, x: &Vec<T>, xs: Nhwc, pool: &MaxPool2d) {
        let ys = pool.out_shape(xs);
        let c = xs.c;
        // One output row per task; each output pixel starts from the first in-bounds window
        // position and keeps a later value only if it is larger (or NaN), as PyTorch does.
        y.par_chunks_mut(ys.w * c).enumerate().for_each(|(row, yrow)| {
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
        &self, dx: &mut Vec<T>, dy: &Vec<T>, x: &Vec<T>, y: &Vec<T>, xs: Nhwc, pool: &MaxPool2d,
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
}
