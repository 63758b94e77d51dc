//! The matrix products under every call: cuBLAS's SGEMM, and the one convolutions lower to.

use super::*;

/// A matrix operand: its elements and the distance between consecutive rows and columns.
#[derive(Clone, Copy)]
pub(super) struct Mat<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

pub(super) fn mat(data: &[f32], row_stride: usize, col_stride: usize) -> Mat<'_> {
    Mat { data, row_stride, col_stride }
}

/// `dst = a·b` (m×k times k×n), or `dst += a·b` when `accumulate`; `dst` is row-major with
/// row stride `ld`. Products and sums in f32.
pub(super) fn matmul(
    dst: &mut [f32], ld: usize, accumulate: bool, a: Mat, b: Mat, (m, n, k): (usize, usize, usize),
) {
    if m == 0 || n == 0 || k == 0 {
        if !accumulate {
            for row in 0..m {
                dst[row * ld..][..n].fill(0.0);
            }
        }
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    // Internal invariants (the shapes were validated): a violation is a bug here, not the
    // caller's, and must not become an out-of-bounds access.
    assert!(last(m, n, ld, 1) < dst.len(), "matmul: dst too small");
    assert!(last(m, k, a.row_stride, a.col_stride) < a.data.len(), "matmul: a too small");
    assert!(last(k, n, b.row_stride, b.col_stride) < b.data.len(), "matmul: b too small");
    // SAFETY: the asserts keep every index inside the three slices, and `dst` is borrowed
    // mutably, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// `cublasSgemm`: C = alpha·op(A)·op(B) + beta·C, column-major, element (i, j) of a matrix with
/// leading dimension `ld` at `i + j·ld`. Validated again first: an invalid call would read out
/// of bounds.
///
/// # Safety
/// The addresses are host addresses valid for [`gemm_regions`].
pub unsafe fn run_gemm(g: &Gemm) -> Result<()> {
    validate_gemm(g)?;
    let regions = gemm_regions(g);
    // SAFETY: the caller's contract covers the regions, whose lengths these are.
    let (a, b) = unsafe {
        (load(g.a, DType::F32, regions[0].bytes / 4), load(g.b, DType::F32, regions[1].bytes / 4))
    };
    let op = |t: Transpose, ld: usize| match t {
        Transpose::N => (1, ld),
        Transpose::T => (ld, 1),
    };
    let (a_rs, a_cs) = op(g.transa, g.lda);
    let (b_rs, b_cs) = op(g.transb, g.ldb);
    // The product stored transposed (row j = column j of op(A)·op(B)), so each of C's columns
    // is one contiguous row to blend in.
    let mut product = vec![0.0; g.n * g.m];
    matmul(&mut product, g.m, false, mat(&b, b_cs, b_rs), mat(&a, a_cs, a_rs), (g.n, g.m, g.k));
    for (j, column) in product.chunks_exact(g.m).enumerate() {
        // SAFETY: column j of C lies within C's region; A and B were copied out already and
        // validate_gemm ruled out overlaps.
        unsafe { store(g.c + (j * g.ldc * 4) as u64, DType::F32, column, g.alpha, g.beta) };
    }
    Ok(())
}
