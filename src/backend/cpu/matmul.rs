//! Matrix products on the `gemm` crate: plain, and split along a long inner dimension into
//! fixed pieces summed in a fixed order.

use super::*;

/// `c (=|+=) a · b` for row-major views given as (slice, row stride, column stride):
/// a is m×k, b is k×n, c is m×n with row stride `c_rs` and unit column stride.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Elem>(
    c: &mut [T], c_rs: usize, a: (&[T], usize, usize), b: (&[T], usize, usize), m: usize, n: usize,
    k: usize, accumulate: bool,
) {
    gemm_on(c, c_rs, a, b, (m, n, k), accumulate, gemm::Parallelism::Rayon(0));
}

/// [`matmul`] with the threads to use: the rayon pool, or only the calling thread.
pub(crate) fn gemm_on<T: Elem>(
    c: &mut [T], c_rs: usize, a: (&[T], usize, usize), b: (&[T], usize, usize),
    (m, n, k): (usize, usize, usize), accumulate: bool, parallelism: gemm::Parallelism,
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

/// Pieces of the reduction dimension [`matmul_long_k`] cuts: fixed, so the result does not
/// depend on the number of threads.
pub(super) const K_PIECES: usize = 8;

/// [`matmul`] for a product whose reduction dimension `k` dwarfs `m` and `n` (a weight
/// gradient: `[Cout, k·k·Cin]` summed over every pixel of the batch). The GEMM would split
/// only the small output among the threads; here `k` is cut into `K_PIECES` (8) fixed pieces
/// computed in parallel, then summed in piece order. `a` is `[m, k]` with unit row stride
/// along `k` given by `a.1`/`a.2` as in [`matmul`], likewise `b`.
#[allow(clippy::too_many_arguments)]
pub fn matmul_long_k<T: Elem>(
    c: &mut [T], c_rs: usize, a: (&[T], usize, usize), b: (&[T], usize, usize), m: usize, n: usize,
    k: usize, accumulate: bool,
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
