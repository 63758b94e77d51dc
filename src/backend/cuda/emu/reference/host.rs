//! Host memory standing in for device memory: loads and stores of every data type (with
//! alpha/beta blending and rounding), and the layout changes to and from NHWC.

use super::*;

/// Copies `len` values of `T` out of host memory at `ptr`, whatever its alignment. Device data
/// is little-endian, as the hosts this emulation runs on are.
///
/// # Safety
/// `ptr` is valid for reading `len · size_of::<T>()` bytes, and they are valid `T`s.
pub(super) unsafe fn copy_out<T: Copy + Default>(ptr: u64, len: usize) -> Vec<T> {
    let mut out = vec![T::default(); len];
    // SAFETY: the caller's contract; `out` is a fresh allocation of the same size.
    unsafe {
        std::ptr::copy_nonoverlapping(
            ptr as *const u8,
            out.as_mut_ptr() as *mut u8,
            len * size_of::<T>(),
        )
    };
    out
}

/// The inverse of [`copy_out`].
///
/// # Safety
/// `ptr` is valid for writing `values.len() · size_of::<T>()` bytes, which nothing else
/// references.
pub(super) unsafe fn copy_in<T: Copy>(ptr: u64, values: &[T]) {
    // SAFETY: the caller's contract.
    unsafe {
        std::ptr::copy_nonoverlapping(
            values.as_ptr() as *const u8,
            ptr as *mut u8,
            size_of_val(values),
        )
    };
}

/// Reads `len` elements of `dtype` at `ptr`, widened to f32.
///
/// # Safety
/// `ptr` is a host address valid for reading `len · dtype.size()` bytes.
pub(super) unsafe fn load(ptr: u64, dtype: DType, len: usize) -> Vec<f32> {
    // SAFETY (all three): the caller's contract; every bit pattern is a valid value.
    // The slice conversions of `half` use the CPU's conversion instructions where it has them.
    match dtype {
        DType::F32 => unsafe { copy_out::<f32>(ptr, len) },
        DType::F16 => {
            let mut out = vec![0.0; len];
            unsafe { copy_out::<f16>(ptr, len) }.convert_to_f32_slice(&mut out);
            out
        }
        DType::Bf16 => {
            let mut out = vec![0.0; len];
            unsafe { copy_out::<bf16>(ptr, len) }.convert_to_f32_slice(&mut out);
            out
        }
    }
}

/// Writes `alpha·result + beta·old` (in f32, rounded once, to nearest even, to `dtype`) over
/// `result.len()` elements at `ptr`; the old contents are read only when `beta != 0`.
///
/// # Safety
/// `ptr` is a host address valid for reading and writing `result.len() · dtype.size()` bytes,
/// and no other reference to that memory is alive.
pub(super) unsafe fn store(ptr: u64, dtype: DType, result: &[f32], alpha: f32, beta: f32) {
    let blended: Vec<f32> = if beta == 0.0 {
        result.iter().map(|&v| alpha * v).collect()
    } else {
        // SAFETY: the caller's contract.
        let old = unsafe { load(ptr, dtype, result.len()) };
        result.iter().zip(&old).map(|(&v, &o)| alpha * v + beta * o).collect()
    };
    // SAFETY (all three): the caller's contract.
    match dtype {
        DType::F32 => unsafe { copy_in(ptr, &blended) },
        DType::F16 => {
            let mut out = vec![f16::ZERO; blended.len()];
            out.convert_from_f32_slice(&blended);
            unsafe { copy_in(ptr, &out) }
        }
        DType::Bf16 => {
            let mut out = vec![bf16::ZERO; blended.len()];
            out.convert_from_f32_slice(&blended);
            unsafe { copy_in(ptr, &out) }
        }
    }
}

/// [N, C, H, W] data in `layout` order, reordered to NHWC (KRSC for a filter), the order the
/// im2col matrices are built in.
pub(super) fn to_nhwc(data: Vec<f32>, dims: [usize; 4], layout: Layout) -> Vec<f32> {
    reorder(data, dims, layout, true)
}

/// The inverse of [`to_nhwc`].
pub(super) fn from_nhwc(data: Vec<f32>, dims: [usize; 4], layout: Layout) -> Vec<f32> {
    reorder(data, dims, layout, false)
}

/// Each image's (or filter's) `[C, H·W]` plane transposed to `[H·W, C]` (`to_nhwc`) or back.
fn reorder(data: Vec<f32>, [_, c, h, w]: [usize; 4], layout: Layout, to_nhwc: bool) -> Vec<f32> {
    if layout == Layout::Nhwc {
        return data;
    }
    let mut out = vec![0.0; data.len()];
    out.par_chunks_mut(c * h * w).zip(data.par_chunks(c * h * w)).for_each(|(dst, src)| {
        for ch in 0..c {
            for i in 0..h * w {
                let (planar, interleaved) = (ch * h * w + i, i * c + ch);
                if to_nhwc {
                    dst[interleaved] = src[planar];
                } else {
                    dst[planar] = src[interleaved];
                }
            }
        }
    });
    out
}
