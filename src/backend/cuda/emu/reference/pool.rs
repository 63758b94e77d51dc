//! Pooling (forward and backward) and AddTensor, by their definitions.

use super::*;

/// The input positions of window (p, q), in row-major order, padding left out.
pub(super) fn window(
    pool: &PoolDesc, h: usize, w: usize, p: usize, q: usize,
) -> impl Iterator<Item = (usize, usize)> {
    let PoolDesc { window: [wr, wc], pad: [pr, pc], stride: [sr, sc], .. } = *pool;
    let rows = (p * sr..p * sr + wr).filter_map(move |i| i.checked_sub(pr).filter(|&i| i < h));
    rows.flat_map(move |i| {
        (q * sc..q * sc + wc)
            .filter_map(move |j| j.checked_sub(pc).filter(|&j| j < w))
            .map(move |j| (i, j))
    })
}

/// The first maximum of a window as an index into `x`: the first NaN if there is one (a NaN
/// window's maximum is NaN), else the first element no later element exceeds.
pub(super) fn first_max(x: &[f32], mut indices: impl Iterator<Item = usize>) -> Option<usize> {
    let mut best = indices.next()?;
    for i in indices {
        if x[best].is_nan() {
            break;
        }
        if x[i].is_nan() || x[i] > x[best] {
            best = i;
        }
    }
    Some(best)
}

/// Visits every output position (n, c, p, q) with its index in `y`.
pub(super) fn each_output(y: &TensorDesc, mut f: impl FnMut(usize, usize, usize, usize, usize)) {
    let [n, c, p, q] = y.dims;
    for ni in 0..n {
        for ci in 0..c {
            for pi in 0..p {
                for qi in 0..q {
                    f(ni, ci, pi, qi, y.offset(ni, ci, pi, qi));
                }
            }
        }
    }
}

/// # Safety
/// As [`run_dnn`], for a validated call.
pub(super) unsafe fn pool_forward(f: &PoolForward) {
    let [_, _, h, w] = f.x.dims;
    // SAFETY: the caller's contract covers x.
    let x = unsafe { load(f.x_ptr, f.x.dtype, f.x.len()) };
    let area = (f.pool.window[0] * f.pool.window[1]) as f32;
    let mut y = vec![0.0; f.y.len()];
    each_output(&f.y, |n, c, p, q, yi| {
        let taps = window(&f.pool, h, w, p, q).map(|(i, j)| f.x.offset(n, c, i, j));
        y[yi] = match f.pool.mode {
            PoolMode::MaxDeterministic => first_max(&x, taps).map_or(f32::NEG_INFINITY, |i| x[i]),
            PoolMode::AverageCountIncludePadding => taps.map(|i| x[i]).sum::<f32>() / area,
        };
    });
    // SAFETY: y's region, apart from x.
    unsafe { store(f.y_ptr, f.y.dtype, &y, f.alpha, f.beta) };
}

/// # Safety
/// As [`run_dnn`], for a validated call.
pub(super) unsafe fn pool_backward(b: &PoolBackward) {
    let [_, _, h, w] = b.x.dims;
    // The maximum is found again in x rather than matched against y: the same element when y
    // is the forward's output, and a defined one when it is not.
    // SAFETY: the caller's contract covers x and dy.
    let (x, dy) =
        unsafe { (load(b.x_ptr, b.x.dtype, b.x.len()), load(b.dy_ptr, b.y.dtype, b.y.len())) };
    let area = (b.pool.window[0] * b.pool.window[1]) as f32;
    let mut dx = vec![0.0; b.x.len()];
    each_output(&b.y, |n, c, p, q, yi| {
        let taps = window(&b.pool, h, w, p, q).map(|(i, j)| b.x.offset(n, c, i, j));
        match b.pool.mode {
            PoolMode::MaxDeterministic => {
                if let Some(i) = first_max(&x, taps) {
                    dx[i] += dy[yi];
                }
            }
            PoolMode::AverageCountIncludePadding => {
                let share = dy[yi] / area;
                for i in taps {
                    dx[i] += share;
                }
            }
        }
    });
    // SAFETY: dx's region, apart from the inputs.
    unsafe { store(b.dx_ptr, b.x.dtype, &dx, b.alpha, b.beta) };
}

/// # Safety
/// As [`run_dnn`], for a validated call.
pub(super) unsafe fn add_tensor(t: &AddTensor) {
    // SAFETY: the caller's contract covers A.
    let a = unsafe { load(t.a_ptr, t.a.dtype, t.a.len()) };
    // A dimension of size 1 is broadcast: its index is always 0.
    let pick = |i: usize, axis: usize| if t.a.dims[axis] == 1 { 0 } else { i };
    let mut sum = vec![0.0; t.c.len()];
    each_output(&t.c, |n, c, h, w, ci| {
        sum[ci] = a[t.a.offset(pick(n, 0), pick(c, 1), pick(h, 2), pick(w, 3))];
    });
    // SAFETY: C's region, apart from A.
    unsafe { store(t.c_ptr, t.c.dtype, &sum, t.alpha, t.beta) };
}
