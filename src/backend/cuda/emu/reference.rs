//! The emulated device's cuDNN and cuBLAS: what each [`DnnCall`] and [`Gemm`] computes, on host
//! memory, with the checks the real libraries make before they run.
//!
//! The arithmetic is that of the real calls' contract, not of any one GPU kernel: 16-bit inputs
//! are widened to f32, products are accumulated in f32 (the compute type), the blend
//! `alpha·acc + beta·old` is done in f32 and rounded once (to nearest even) to the output type;
//! `beta == 0` never reads the output, so whatever it held (NaN included) cannot leak in.
//!
//! Convolutions are lowered to one matrix product each (im2col, or its transpose col2im) and run
//! on the `gemm` crate: a training step issues a couple of hundred of them, and direct loops
//! would take minutes where this takes well under a second. The direct loops live on as the
//! f64 oracle of the tests.
//!
//! The algorithms the emulation "offers" are bookkeeping: every algorithm number computes the
//! same result, but each has the workspace, determinism flag and math type its cuDNN namesake
//! reports, so the backend's algorithm choice and workspace handling run as on a GPU.

use std::ops::Range;

use anyhow::{anyhow, Result};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

use crate::backend::cuda::device::*;

/// How a call uses a region of device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
}

/// A span of device memory one call touches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Region {
    pub ptr: u64,
    pub bytes: usize,
    pub access: Access,
    /// The operand's name in cuDNN's or cuBLAS's documentation: "x", "dy", "workspace", "C"...
    pub what: &'static str,
}

// cuDNN's enum values for the algorithms offered (cudnnConvolution{Fwd,BwdData,BwdFilter}Algo_t).
pub const FWD_IMPLICIT_GEMM: u32 = 0;
pub const FWD_IMPLICIT_PRECOMP_GEMM: u32 = 1;
pub const BWD_DATA_ALGO_0: u32 = 0;
pub const BWD_DATA_ALGO_1: u32 = 1;
pub const BWD_FILTER_ALGO_0: u32 = 0;
pub const BWD_FILTER_ALGO_1: u32 = 1;

/// The most f32 elements of one im2col matrix: bounds the host memory a convolution borrows
/// (64 MiB) whatever the batch, by lowering a few images at a time.
const COL_FLOATS: usize = 16 << 20;

// ---------------------------------------------------------------------------------------------
// Regions

fn output_access(beta: f32) -> Access {
    // beta != 0 reads the old output, so a checker must see it initialised.
    if beta == 0.0 {
        Access::Write
    } else {
        Access::ReadWrite
    }
}

fn region(ptr: u64, bytes: usize, access: Access, what: &'static str) -> Region {
    Region {
        ptr,
        bytes,
        access,
        what,
    }
}

/// The memory a call touches: every operand's full extent (an output is `Write` when
/// `beta == 0`, `ReadWrite` otherwise), and the workspace, written, over `workspace_bytes`.
/// The emulated device checks these against its allocations before running the call.
pub fn dnn_regions(call: &DnnCall) -> Vec<Region> {
    use Access::Read;
    match call {
        DnnCall::Conv(c) => {
            let p = &c.problem;
            let out = output_access(c.beta);
            let mut regions = match c.dir {
                ConvDirection::Forward => vec![
                    region(c.x, p.x.bytes(), Read, "x"),
                    region(c.w, p.w.bytes(), Read, "w"),
                    region(c.y, p.y.bytes(), out, "y"),
                ],
                ConvDirection::BackwardData => vec![
                    region(c.w, p.w.bytes(), Read, "w"),
                    region(c.y, p.y.bytes(), Read, "dy"),
                    region(c.x, p.x.bytes(), out, "dx"),
                ],
                ConvDirection::BackwardFilter => vec![
                    region(c.x, p.x.bytes(), Read, "x"),
                    region(c.y, p.y.bytes(), Read, "dy"),
                    region(c.w, p.w.bytes(), out, "dw"),
                ],
            };
            if c.workspace_bytes > 0 {
                regions.push(region(
                    c.workspace,
                    c.workspace_bytes,
                    Access::Write,
                    "workspace",
                ));
            }
            regions
        }
        DnnCall::AddTensor(a) => vec![
            region(a.a_ptr, a.a.bytes(), Read, "A"),
            region(a.c_ptr, a.c.bytes(), output_access(a.beta), "C"),
        ],
        DnnCall::PoolForward(f) => vec![
            region(f.x_ptr, f.x.bytes(), Read, "x"),
            region(f.y_ptr, f.y.bytes(), output_access(f.beta), "y"),
        ],
        DnnCall::PoolBackward(b) => vec![
            region(b.y_ptr, b.y.bytes(), Read, "y"),
            region(b.dy_ptr, b.y.bytes(), Read, "dy"),
            region(b.x_ptr, b.x.bytes(), Read, "x"),
            region(b.dx_ptr, b.x.bytes(), output_access(b.beta), "dx"),
        ],
    }
}

/// The bytes of a column-major `rows × cols` matrix with leading dimension `ld`, up to its last
/// element (cuBLAS never touches the padding after the last column).
fn matrix_bytes(rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        return 0;
    }
    (cols - 1)
        .saturating_mul(ld)
        .saturating_add(rows)
        .saturating_mul(4)
}

/// The stored (rows, cols) of A and B: op(A) is m×k, so A is m×k untransposed or k×m.
fn gemm_storage(g: &Gemm) -> ((usize, usize), (usize, usize)) {
    let a = match g.transa {
        Transpose::N => (g.m, g.k),
        Transpose::T => (g.k, g.m),
    };
    let b = match g.transb {
        Transpose::N => (g.k, g.n),
        Transpose::T => (g.n, g.k),
    };
    (a, b)
}

pub fn gemm_regions(g: &Gemm) -> Vec<Region> {
    let ((ar, ac), (br, bc)) = gemm_storage(g);
    vec![
        region(g.a, matrix_bytes(ar, ac, g.lda), Access::Read, "A"),
        region(g.b, matrix_bytes(br, bc, g.ldb), Access::Read, "B"),
        region(
            g.c,
            matrix_bytes(g.m, g.n, g.ldc),
            output_access(g.beta),
            "C",
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Validation

const BAD_PARAM: &str = "CUDNN_STATUS_BAD_PARAM";
const NOT_SUPPORTED: &str = "CUDNN_STATUS_NOT_SUPPORTED";
const INVALID_VALUE: &str = "CUBLAS_STATUS_INVALID_VALUE";

/// The error of a rejected call: the function, the status the library would return, and what
/// is wrong, naming the field.
fn rejected(call: &str, status: &str, why: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{call}: {status}: {why}")
}

/// Null and misaligned pointers fault on a GPU (or make cuDNN fail); overlapping an output with
/// another operand is undefined in both libraries. Refusing them here names the operand instead
/// of producing a silently different result.
fn check_regions(call: &str, status: &str, regions: &[Region], align: &[usize]) -> Result<()> {
    for (r, &align) in regions.iter().zip(align) {
        if r.ptr == 0 {
            return Err(rejected(
                call,
                status,
                format!("{} is a null pointer", r.what),
            ));
        }
        if r.ptr % align as u64 != 0 {
            return Err(rejected(
                call,
                status,
                format!("{} at {:#x} is not aligned to {align} bytes", r.what, r.ptr),
            ));
        }
        if r.ptr.checked_add(r.bytes as u64).is_none() {
            return Err(rejected(
                call,
                status,
                format!(
                    "{} at {:#x} + {} bytes wraps the address space",
                    r.what, r.ptr, r.bytes
                ),
            ));
        }
    }
    for (i, a) in regions.iter().enumerate() {
        for b in &regions[i + 1..] {
            let writes = a.access != Access::Read || b.access != Access::Read;
            let overlap = a.ptr < b.ptr + b.bytes as u64 && b.ptr < a.ptr + a.bytes as u64;
            if writes && overlap && a.bytes > 0 && b.bytes > 0 {
                return Err(rejected(
                    call,
                    status,
                    format!(
                        "{} [{:#x}, +{}) overlaps {} [{:#x}, +{}): undefined behaviour",
                        a.what, a.ptr, a.bytes, b.what, b.ptr, b.bytes
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn check_dims(call: &str, what: &str, dims: &[usize; 4]) -> Result<()> {
    if dims.contains(&0) {
        return Err(rejected(
            call,
            BAD_PARAM,
            format!("{what} dims {dims:?} have a zero size"),
        ));
    }
    // cuDNN indexes 4-D tensors with 32-bit integers; the bound also keeps every byte count
    // computed from the dims (the regions, the workspace) from overflowing.
    let elements = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d));
    if elements.is_none_or(|n| n > i32::MAX as usize) {
        return Err(rejected(
            call,
            NOT_SUPPORTED,
            format!("{what} dims {dims:?} hold more than 2^31 - 1 elements"),
        ));
    }
    Ok(())
}

/// The output length of one axis: `None` when the (dilated) window does not fit the padded
/// input even once.
fn out_len(len: usize, pad: usize, window: usize, stride: usize, dilation: usize) -> Option<usize> {
    let span = dilation
        .checked_mul(window.checked_sub(1)?)?
        .checked_add(1)?;
    let padded = len.checked_add(pad.checked_mul(2)?)?;
    Some(padded.checked_sub(span)? / stride + 1)
}

/// The checks that concern a convolution's shapes and types, whatever the call.
fn check_problem(call: &str, p: &ConvProblem) -> Result<()> {
    check_dims(call, "x", &p.x.dims)?;
    check_dims(call, "w", &p.w.dims)?;
    check_dims(call, "y", &p.y.dims)?;
    let cv = &p.conv;
    for (name, v) in [("stride", cv.stride), ("dilation", cv.dilation)] {
        if v.contains(&0) {
            return Err(rejected(
                call,
                BAD_PARAM,
                format!("conv {name} {v:?} has a zero"),
            ));
        }
    }
    if cv.compute != DType::F32 {
        return Err(rejected(
            call,
            NOT_SUPPORTED,
            format!(
                "conv compute type {:?}: this emulation accumulates in F32 only",
                cv.compute
            ),
        ));
    }
    if p.x.dtype != p.w.dtype || p.x.dtype != p.y.dtype {
        return Err(rejected(
            call,
            BAD_PARAM,
            format!(
                "data types differ: x {:?}, w {:?}, y {:?}",
                p.x.dtype, p.w.dtype, p.y.dtype
            ),
        ));
    }
    if p.x.dtype == DType::F32
        && matches!(
            cv.math,
            MathType::TensorOp | MathType::TensorOpAllowConversion
        )
    {
        return Err(rejected(
            call,
            NOT_SUPPORTED,
            format!(
                "conv math {:?} on F32 data would be TF32 or a 16-bit conversion; the fp32 path runs Fma only",
                cv.math
            ),
        ));
    }
    let [n, c, h, w] = p.x.dims;
    let [k, wc, r, s] = p.w.dims;
    if c != wc {
        return Err(rejected(
            call,
            BAD_PARAM,
            format!(
                "x has C = {c} channels (dims {:?}) but w has C = {wc} (dims {:?})",
                p.x.dims, p.w.dims
            ),
        ));
    }
    let rows = out_len(h, cv.pad[0], r, cv.stride[0], cv.dilation[0]);
    let cols = out_len(w, cv.pad[1], s, cv.stride[1], cv.dilation[1]);
    let (Some(pp), Some(q)) = (rows, cols) else {
        return Err(rejected(
            call,
            BAD_PARAM,
            format!(
                "w's {r}x{s} window (dilation {:?}) does not fit x's {h}x{w} input padded by {:?}",
                cv.dilation, cv.pad
            ),
        ));
    };
    let expected = [n, k, pp, q];
    if p.y.dims != expected {
        return Err(rejected(
            call,
            BAD_PARAM,
            format!(
                "y dims {:?} are not those the convolution of x {:?} with w {:?} (pad {:?}, stride {:?}, dilation {:?}) gives: {expected:?}",
                p.y.dims, p.x.dims, p.w.dims, cv.pad, cv.stride, cv.dilation
            ),
        ));
    }
    Ok(())
}

fn check_conv(call: &str, c: &ConvCall) -> Result<()> {
    check_problem(call, &c.problem)?;
    let Some(needed) = workspace_bytes(&c.problem, c.dir, c.algo) else {
        let offered: Vec<u32> = offers(c.dir).iter().map(|o| o.algo).collect();
        return Err(rejected(
            call,
            NOT_SUPPORTED,
            format!(
                "algo {} is not offered by this emulation for {:?} (it offers {offered:?})",
                c.algo, c.dir
            ),
        ));
    };
    if c.workspace_bytes < needed {
        return Err(rejected(
            call,
            BAD_PARAM,
            format!(
                "workspace_bytes {} is less than the {needed} algo {} needs",
                c.workspace_bytes, c.algo
            ),
        ));
    }
    let size = c.problem.x.dtype.size();
    // The order of dnn_regions: three operands, then the workspace when there is one.
    let align = [size, size, size, 16];
    check_regions(call, BAD_PARAM, &dnn_regions(&DnnCall::Conv(*c)), &align)
}

fn check_pool(call: &str, pool: &PoolDesc, x: &TensorDesc, y: &TensorDesc) -> Result<()> {
    check_dims(call, "x", &x.dims)?;
    check_dims(call, "y", &y.dims)?;
    for (name, v) in [("window", pool.window), ("stride", pool.stride)] {
        if v.contains(&0) {
            return Err(rejected(
                call,
                BAD_PARAM,
                format!("pool {name} {v:?} has a zero"),
            ));
        }
    }
    if pool.pad[0] >= pool.window[0] || pool.pad[1] >= pool.window[1] {
        // Such a window can lie wholly in the padding, where a maximum is undefined.
        return Err(rejected(
            call,
            BAD_PARAM,
            format!(
                "pool pad {:?} is not smaller than its window {:?}",
                pool.pad, pool.window
            ),
        ));
    }
    if x.dtype != y.dtype {
        return Err(rejected(
            call,
            BAD_PARAM,
            format!("data types differ: x {:?}, y {:?}", x.dtype, y.dtype),
        ));
    }
    let [n, c, h, w] = x.dims;
    let rows = out_len(h, pool.pad[0], pool.window[0], pool.stride[0], 1);
    let cols = out_len(w, pool.pad[1], pool.window[1], pool.stride[1], 1);
    let (Some(p), Some(q)) = (rows, cols) else {
        return Err(rejected(
            call,
            BAD_PARAM,
            format!(
                "pool window {:?} does not fit x's {h}x{w} input padded by {:?}",
                pool.window, pool.pad
            ),
        ));
    };
    let expected = [n, c, p, q];
    if y.dims != expected {
        return Err(rejected(
            call,
            BAD_PARAM,
            format!(
                "y dims {:?} are not those pooling x {:?} (window {:?}, pad {:?}, stride {:?}) gives: {expected:?}",
                y.dims, x.dims, pool.window, pool.pad, pool.stride
            ),
        ));
    }
    Ok(())
}

fn check_add(call: &str, a: &AddTensor) -> Result<()> {
    check_dims(call, "A", &a.a.dims)?;
    check_dims(call, "C", &a.c.dims)?;
    if a.a.dtype != a.c.dtype {
        return Err(rejected(
            call,
            BAD_PARAM,
            format!("data types differ: A {:?}, C {:?}", a.a.dtype, a.c.dtype),
        ));
    }
    if a.a
        .dims
        .iter()
        .zip(&a.c.dims)
        .any(|(&ad, &cd)| ad != cd && ad != 1)
    {
        return Err(rejected(
            call,
            BAD_PARAM,
            format!(
                "A dims {:?} do not broadcast to C dims {:?} (each must equal C's or be 1)",
                a.a.dims, a.c.dims
            ),
        ));
    }
    let size = a.c.dtype.size();
    check_regions(
        call,
        BAD_PARAM,
        &dnn_regions(&DnnCall::AddTensor(*a)),
        &[size, size],
    )
}

/// Rejects what cuDNN would reject, with the function, cuDNN's status name and the field at
/// fault in the message; and what the emulation cannot honour (a compute type other than F32,
/// TF32 math, an algorithm it does not offer).
pub fn validate_dnn(call: &DnnCall) -> Result<()> {
    let name = call.name();
    match call {
        DnnCall::Conv(c) => check_conv(name, c),
        DnnCall::AddTensor(a) => check_add(name, a),
        DnnCall::PoolForward(f) => {
            check_pool(name, &f.pool, &f.x, &f.y)?;
            let size = f.x.dtype.size();
            check_regions(name, BAD_PARAM, &dnn_regions(call), &[size; 2])
        }
        DnnCall::PoolBackward(b) => {
            check_pool(name, &b.pool, &b.x, &b.y)?;
            let size = b.x.dtype.size();
            check_regions(name, BAD_PARAM, &dnn_regions(call), &[size; 4])
        }
    }
}

/// cuBLAS's argument rules for `cublasSgemm` (sizes, leading dimensions), plus null, misaligned
/// or overlapping operands, which a GPU would fault on or compute garbage from.
pub fn validate_gemm(g: &Gemm) -> Result<()> {
    const CALL: &str = "cublasSgemm";
    for (name, v) in [("m", g.m), ("n", g.n), ("k", g.k)] {
        if v == 0 {
            return Err(rejected(
                CALL,
                INVALID_VALUE,
                format!("{name} = 0: the backend never multiplies empty matrices"),
            ));
        }
    }
    let ((ar, _), (br, _)) = gemm_storage(g);
    for (name, ld, rows, why) in [
        ("lda", g.lda, ar, format!("transa = {:?}", g.transa)),
        ("ldb", g.ldb, br, format!("transb = {:?}", g.transb)),
        ("ldc", g.ldc, g.m, "m".to_string()),
    ] {
        if ld < rows.max(1) {
            return Err(rejected(
                CALL,
                INVALID_VALUE,
                format!("{name} = {ld} is less than the {rows} rows its matrix stores ({why})"),
            ));
        }
    }
    check_regions(CALL, INVALID_VALUE, &gemm_regions(g), &[4; 3])
}

// ---------------------------------------------------------------------------------------------
// Algorithms

/// One algorithm the emulation offers for a direction.
struct Offer {
    algo: u32,
    deterministic: bool,
    /// Fake milliseconds per GFLOP: only the order matters (the one with a workspace first).
    ms_per_gflop: f64,
}

fn offers(dir: ConvDirection) -> [Offer; 2] {
    let offer = |algo, deterministic, ms_per_gflop| Offer {
        algo,
        deterministic,
        ms_per_gflop,
    };
    // The first of each pair needs a workspace, so that ranking it first has the backend
    // allocate and pass one; the backward ALGO_0s accumulate with atomics on a GPU, hence
    // nondeterministic, which --deterministic has to skip.
    match dir {
        ConvDirection::Forward => [
            offer(FWD_IMPLICIT_PRECOMP_GEMM, true, 0.02),
            offer(FWD_IMPLICIT_GEMM, true, 0.03),
        ],
        ConvDirection::BackwardData => [
            offer(BWD_DATA_ALGO_1, true, 0.025),
            offer(BWD_DATA_ALGO_0, false, 0.035),
        ],
        ConvDirection::BackwardFilter => [
            offer(BWD_FILTER_ALGO_1, true, 0.03),
            offer(BWD_FILTER_ALGO_0, false, 0.04),
        ],
    }
}

/// The workspace `algo` needs for `problem` in direction `dir`, or `None` when the emulation
/// does not offer `algo` there. The sizes are modelled on what the algorithms keep (precomputed
/// input offsets, a partial filter gradient to reduce deterministically), rounded up to 256.
pub fn workspace_bytes(problem: &ConvProblem, dir: ConvDirection, algo: u32) -> Option<usize> {
    let [_, c, h, w] = problem.x.dims;
    let [k, _, r, s] = problem.w.dims;
    let [_, _, p, q] = problem.y.dims;
    let words = |n: usize| n.saturating_mul(4).checked_next_multiple_of(256);
    match (dir, algo) {
        (ConvDirection::Forward, FWD_IMPLICIT_GEMM) => Some(0),
        (ConvDirection::Forward, FWD_IMPLICIT_PRECOMP_GEMM) => words(
            c.saturating_mul(r)
                .saturating_mul(s)
                .saturating_add(p.saturating_mul(q)),
        ),
        (ConvDirection::BackwardData, BWD_DATA_ALGO_0) => Some(0),
        (ConvDirection::BackwardData, BWD_DATA_ALGO_1) => words(
            k.saturating_mul(r)
                .saturating_mul(s)
                .saturating_add(h.saturating_mul(w)),
        ),
        (ConvDirection::BackwardFilter, BWD_FILTER_ALGO_0) => Some(0),
        (ConvDirection::BackwardFilter, BWD_FILTER_ALGO_1) => {
            words(k.saturating_mul(c).saturating_mul(r).saturating_mul(s))
        }
        _ => None,
    }
}

/// The algorithms offered for one direction, fastest first, as `cudnnFind*` (`measure`: fake
/// but deterministic times) or `cudnnGet*_v7` (times of -1) report them. An invalid problem
/// gets every result not `ok`, as cuDNN fails each algorithm on it.
pub fn conv_algorithms(problem: &ConvProblem, dir: ConvDirection, measure: bool) -> Vec<AlgoPerf> {
    let ok = check_problem("conv_algorithms", problem).is_ok();
    let [n, c, _, _] = problem.x.dims;
    let [k, _, r, s] = problem.w.dims;
    let [_, _, p, q] = problem.y.dims;
    let gflop = 2.0
        * [n, c, k, r, s, p, q]
            .iter()
            .map(|&v| v as f64)
            .product::<f64>()
        / 1e9;
    let math = match problem.x.dtype {
        DType::F32 => MathType::Fma,
        DType::F16 | DType::Bf16 => MathType::TensorOp,
    };
    offers(dir)
        .iter()
        .map(|o| AlgoPerf {
            algo: o.algo,
            ok,
            time_ms: if measure {
                (0.005 + gflop * o.ms_per_gflop) as f32
            } else {
                -1.0
            },
            memory: workspace_bytes(problem, dir, o.algo).unwrap_or(usize::MAX),
            deterministic: o.deterministic,
            math,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Host memory

/// Copies `len` values of `T` out of host memory at `ptr`, whatever its alignment. Device data
/// is little-endian, as the hosts this emulation runs on are.
///
/// # Safety
/// `ptr` is valid for reading `len · size_of::<T>()` bytes, and they are valid `T`s.
unsafe fn copy_out<T: Copy + Default>(ptr: u64, len: usize) -> Vec<T> {
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
unsafe fn copy_in<T: Copy>(ptr: u64, values: &[T]) {
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
unsafe fn load(ptr: u64, dtype: DType, len: usize) -> Vec<f32> {
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
unsafe fn store(ptr: u64, dtype: DType, result: &[f32], alpha: f32, beta: f32) {
    let blended: Vec<f32> = if beta == 0.0 {
        result.iter().map(|&v| alpha * v).collect()
    } else {
        // SAFETY: the caller's contract.
        let old = unsafe { load(ptr, dtype, result.len()) };
        result
            .iter()
            .zip(&old)
            .map(|(&v, &o)| alpha * v + beta * o)
            .collect()
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
fn to_nhwc(data: Vec<f32>, dims: [usize; 4], layout: Layout) -> Vec<f32> {
    if layout == Layout::Nhwc {
        return data;
    }
    let [_, c, h, w] = dims;
    let mut out = vec![0.0; data.len()];
    out.par_chunks_mut(c * h * w)
        .zip(data.par_chunks(c * h * w))
        .for_each(|(dst, src)| {
            for ch in 0..c {
                for (i, &v) in src[ch * h * w..][..h * w].iter().enumerate() {
                    dst[i * c + ch] = v;
                }
            }
        });
    out
}

/// The inverse of [`to_nhwc`].
fn from_nhwc(data: Vec<f32>, dims: [usize; 4], layout: Layout) -> Vec<f32> {
    if layout == Layout::Nhwc {
        return data;
    }
    let [_, c, h, w] = dims;
    let mut out = vec![0.0; data.len()];
    out.par_chunks_mut(c * h * w)
        .zip(data.par_chunks(c * h * w))
        .for_each(|(dst, src)| {
            for ch in 0..c {
                for (i, v) in dst[ch * h * w..][..h * w].iter_mut().enumerate() {
                    *v = src[i * c + ch];
                }
            }
        });
    out
}

// ---------------------------------------------------------------------------------------------
// Matrix products

/// A matrix operand: its elements and the distance between consecutive rows and columns.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    row_stride: usize,
    col_stride: usize,
}

fn mat(data: &[f32], row_stride: usize, col_stride: usize) -> Mat<'_> {
    Mat {
        data,
        row_stride,
        col_stride,
    }
}

/// `dst = a·b` (m×k times k×n), or `dst += a·b` when `accumulate`; `dst` is row-major with
/// row stride `ld`. Products and sums in f32.
fn matmul(
    dst: &mut [f32],
    ld: usize,
    accumulate: bool,
    a: Mat,
    b: Mat,
    (m, n, k): (usize, usize, usize),
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
    assert!(
        last(m, k, a.row_stride, a.col_stride) < a.data.len(),
        "matmul: a too small"
    );
    assert!(
        last(k, n, b.row_stride, b.col_stride) < b.data.len(),
        "matmul: b too small"
    );
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
        (
            load(g.a, DType::F32, regions[0].bytes / 4),
            load(g.b, DType::F32, regions[1].bytes / 4),
        )
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
    matmul(
        &mut product,
        g.m,
        false,
        mat(&b, b_cs, b_rs),
        mat(&a, a_cs, a_rs),
        (g.n, g.m, g.k),
    );
    for (j, column) in product.chunks_exact(g.m).enumerate() {
        // SAFETY: column j of C lies within C's region; A and B were copied out already and
        // validate_gemm ruled out overlaps.
        unsafe {
            store(
                g.c + (j * g.ldc * 4) as u64,
                DType::F32,
                column,
                g.alpha,
                g.beta,
            )
        };
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Convolutions

/// A convolution's sizes: x [N, C, H, W], w [K, C, R, S], y [N, K, P, Q].
#[derive(Clone, Copy)]
struct Geometry {
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
fn im2col(g: &Geometry, x: &[f32], images: Range<usize>, col: &mut [f32]) {
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
fn col2im(g: &Geometry, col: &[f32], dx: &mut [f32]) {
    let taps = g.taps();
    dx.par_chunks_mut(g.h * g.w * g.c)
        .zip(col.par_chunks(g.p * g.q * taps))
        .for_each(|(image, rows)| {
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
        });
}

/// The accumulator of one convolution direction, f32 in NHWC (KRSC for dw) order: as matrices,
/// x is [N·H·W, C], w [K, R·S·C], y [N·P·Q, K] and the im2col matrix [N·P·Q, R·S·C], so
///   forward:         y  = col · wᵀ
///   backward data:   col(dx) = dy · w, folded back onto dx by col2im
///   backward filter: dw = dyᵀ · col
fn convolve(
    g: &Geometry,
    dir: ConvDirection,
    x: &[f32],
    w: &[f32],
    y: &[f32],
    col_floats: usize,
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
                matmul(
                    dst,
                    k,
                    false,
                    mat(&col, taps, 1),
                    mat(w, 1, taps),
                    (rows, k, taps),
                );
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
                matmul(
                    &mut col,
                    taps,
                    false,
                    mat(dy, k, 1),
                    mat(w, taps, 1),
                    (rows, taps, k),
                );
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
                matmul(
                    &mut out,
                    taps,
                    i > 0,
                    mat(dy, 1, k),
                    mat(&col, taps, 1),
                    (k, taps, rows),
                );
            }
            out
        }
    }
}

/// # Safety
/// As [`run_dnn`], for a validated call.
unsafe fn run_conv(c: &ConvCall, col_floats: usize) {
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
    let x = reads(
        c.x,
        p.x.dims,
        p.x.layout,
        dir != ConvDirection::BackwardData,
    );
    let w = reads(
        c.w,
        p.w.dims,
        p.w.layout,
        dir != ConvDirection::BackwardFilter,
    );
    let y = reads(c.y, p.y.dims, p.y.layout, dir != ConvDirection::Forward);
    if c.workspace_bytes > 0 {
        // What an algorithm leaves in its workspace is garbage: NaN in every float type, so
        // that a buffer wrongly shared with the workspace shows up in the results.
        let used = workspace_bytes(p, dir, c.algo)
            .unwrap_or(0)
            .min(c.workspace_bytes);
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

// ---------------------------------------------------------------------------------------------
// Pooling and AddTensor

/// The input positions of window (p, q), in row-major order, padding left out.
fn window(
    pool: &PoolDesc,
    h: usize,
    w: usize,
    p: usize,
    q: usize,
) -> impl Iterator<Item = (usize, usize)> {
    let PoolDesc {
        window: [wr, wc],
        pad: [pr, pc],
        stride: [sr, sc],
        ..
    } = *pool;
    let rows = (p * sr..p * sr + wr).filter_map(move |i| i.checked_sub(pr).filter(|&i| i < h));
    rows.flat_map(move |i| {
        (q * sc..q * sc + wc)
            .filter_map(move |j| j.checked_sub(pc).filter(|&j| j < w))
            .map(move |j| (i, j))
    })
}

/// The first maximum of a window as an index into `x`: the first NaN if there is one (a NaN
/// window's maximum is NaN), else the first element no later element exceeds.
fn first_max(x: &[f32], mut indices: impl Iterator<Item = usize>) -> Option<usize> {
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
fn each_output(y: &TensorDesc, mut f: impl FnMut(usize, usize, usize, usize, usize)) {
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
unsafe fn pool_forward(f: &PoolForward) {
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
unsafe fn pool_backward(b: &PoolBackward) {
    let [_, _, h, w] = b.x.dims;
    // The maximum is found again in x rather than matched against y: the same element when y
    // is the forward's output, and a defined one when it is not.
    // SAFETY: the caller's contract covers x and dy.
    let (x, dy) = unsafe {
        (
            load(b.x_ptr, b.x.dtype, b.x.len()),
            load(b.dy_ptr, b.y.dtype, b.y.len()),
        )
    };
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
unsafe fn add_tensor(t: &AddTensor) {
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

/// Executes `call` on host memory: its `u64` addresses are host addresses (the emulated device
/// hands out host memory). Validated again first: an invalid call would read out of bounds.
///
/// # Safety
/// Every region of [`dnn_regions`]`(call)` is valid host memory, not accessed by anything else
/// during the call.
pub unsafe fn run_dnn(call: &DnnCall) -> Result<()> {
    validate_dnn(call)?;
    // SAFETY: the caller's contract, for a validated call.
    unsafe {
        match call {
            DnnCall::Conv(c) => run_conv(c, COL_FLOATS),
            DnnCall::AddTensor(t) => add_tensor(t),
            DnnCall::PoolForward(f) => pool_forward(f),
            DnnCall::PoolBackward(b) => pool_backward(b),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Every call against a direct f64 loop over the definition.
    //!
    //! Tolerances. The oracle sums exact products of the same (widened) inputs in f64, so the
    //! only error is the emulation's f32 arithmetic. A sum of `t` products accumulated in f32
    //! is off by at most t·u·Σ|terms| (u = 2⁻²⁴ ≈ 6e-8), and in practice by about √t·u·Σ|terms|;
    //! the check allows 1e-5·√t·Σ|terms| (about 170 units of roundoff per √t, generous, yet a
    //! wrong tap or index is off by a whole term). `alpha` and `beta·old` scale the magnitudes
    //! and add one f32 rounding, inside the same bound. A 16-bit output is that f32 value
    //! rounded once more: within its unit roundoff (2⁻¹¹ for f16, 2⁻⁸ for bf16) of the value,
    //! plus half f16's subnormal spacing.

    use super::*;
    use std::time::Instant;

    /// Host memory standing in for a device allocation: 16-byte aligned like the emulated
    /// device's.
    struct Buf(Vec<u128>);

    impl Buf {
        fn zeroed(bytes: usize) -> Buf {
            Buf(vec![0; bytes.div_ceil(16).max(1)])
        }
        /// `values` rounded to `dtype`.
        fn of(dtype: DType, values: &[f32]) -> Buf {
            let mut b = Buf::zeroed(values.len() * dtype.size());
            // SAFETY: the buffer holds values.len() elements of dtype.
            unsafe { store(b.ptr(), dtype, values, 1.0, 0.0) };
            b
        }
        fn ptr(&mut self) -> u64 {
            self.0.as_mut_ptr() as u64
        }
        fn bytes(&self) -> &[u8] {
            // SAFETY: a u128 slice viewed as its bytes.
            unsafe { std::slice::from_raw_parts(self.0.as_ptr() as *const u8, self.0.len() * 16) }
        }
        fn read(&self, dtype: DType, len: usize) -> Vec<f64> {
            assert!(len * dtype.size() <= self.bytes().len());
            // SAFETY: checked just above.
            unsafe { load(self.0.as_ptr() as u64, dtype, len) }
                .into_iter()
                .map(f64::from)
                .collect()
        }
    }

    /// splitmix64: reproducible inputs without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        /// Uniform in [-1, 1).
        fn uniform(&mut self) -> f32 {
            (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        }
        fn values(&mut self, len: usize) -> Vec<f32> {
            (0..len).map(|_| self.uniform()).collect()
        }
    }

    /// The exact result of an output element, the sum of the magnitudes of its terms and their
    /// count, from which its tolerance follows.
    #[derive(Clone, Default)]
    struct Exact {
        value: Vec<f64>,
        magnitude: Vec<f64>,
        terms: Vec<usize>,
    }

    impl Exact {
        fn new(len: usize) -> Exact {
            Exact {
                value: vec![0.0; len],
                magnitude: vec![0.0; len],
                terms: vec![0; len],
            }
        }
        fn add(&mut self, i: usize, term: f64) {
            self.value[i] += term;
            self.magnitude[i] += term.abs();
            self.terms[i] += 1;
        }
    }

    /// Checks `got` = alpha·exact + beta·old within the tolerances of the module comment.
    fn check(what: &str, dtype: DType, got: &[f64], old: &[f64], e: &Exact, alpha: f32, beta: f32) {
        let (alpha, beta) = (f64::from(alpha), f64::from(beta));
        let (unit, tiny) = match dtype {
            DType::F32 => (0.0, 1e-38),
            DType::F16 => (2f64.powi(-11), 2f64.powi(-25)),
            DType::Bf16 => (2f64.powi(-8), 1e-38),
        };
        assert_eq!(got.len(), e.value.len(), "{what}: length");
        for i in 0..got.len() {
            let blended = if beta == 0.0 { 0.0 } else { beta * old[i] };
            let expected = alpha * e.value[i] + blended;
            if expected.is_nan() {
                assert!(
                    got[i].is_nan(),
                    "{what}[{i}]: {} where NaN is expected",
                    got[i]
                );
                continue;
            }
            let scale = alpha.abs() * e.magnitude[i] + blended.abs();
            let tol32 = 1e-5 * (e.terms[i].max(1) as f64).sqrt() * scale;
            let tol = tol32 + unit * (expected.abs() + tol32) + tiny;
            assert!(
                (got[i] - expected).abs() <= tol,
                "{what}[{i}]: got {}, expected {expected} (tolerance {tol:e}, {} terms)",
                got[i],
                e.terms[i]
            );
        }
    }

    // ---- convolutions

    /// The definition: every (n, k, p, q, c, r, s) whose tap is not padding contributes
    /// x·w to y, dy·w to dx and x·dy to dw.
    fn conv_oracle(dir: ConvDirection, pr: &ConvProblem, x: &[f64], w: &[f64], y: &[f64]) -> Exact {
        let [n, c, h, wd] = pr.x.dims;
        let [k, _, r, s] = pr.w.dims;
        let [_, _, p, q] = pr.y.dims;
        let cv = &pr.conv;
        let mut e = Exact::new(match dir {
            ConvDirection::Forward => pr.y.len(),
            ConvDirection::BackwardData => pr.x.len(),
            ConvDirection::BackwardFilter => pr.w.len(),
        });
        for ni in 0..n {
            for ki in 0..k {
                for pi in 0..p {
                    for qi in 0..q {
                        for ci in 0..c {
                            for ri in 0..r {
                                for si in 0..s {
                                    let hi = (pi * cv.stride[0] + ri * cv.dilation[0]) as isize
                                        - cv.pad[0] as isize;
                                    let wi = (qi * cv.stride[1] + si * cv.dilation[1]) as isize
                                        - cv.pad[1] as isize;
                                    if hi < 0 || wi < 0 || hi >= h as isize || wi >= wd as isize {
                                        continue;
                                    }
                                    let xi = pr.x.offset(ni, ci, hi as usize, wi as usize);
                                    let wk = pr.w.offset(ki, ci, ri, si);
                                    let yi = pr.y.offset(ni, ki, pi, qi);
                                    match dir {
                                        ConvDirection::Forward => e.add(yi, x[xi] * w[wk]),
                                        ConvDirection::BackwardData => e.add(xi, y[yi] * w[wk]),
                                        ConvDirection::BackwardFilter => e.add(wk, x[xi] * y[yi]),
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        e
    }

    #[derive(Clone, Copy)]
    struct Case {
        x: [usize; 4],
        w: [usize; 4],
        pad: [usize; 2],
        stride: [usize; 2],
        dilation: [usize; 2],
        dtype: DType,
        layouts: [Layout; 3],
        alpha: f32,
        beta: f32,
    }

    fn problem(case: &Case) -> ConvProblem {
        let [n, _, h, w] = case.x;
        let [k, _, r, s] = case.w;
        let p = out_len(h, case.pad[0], r, case.stride[0], case.dilation[0]).expect("case fits");
        let q = out_len(w, case.pad[1], s, case.stride[1], case.dilation[1]).expect("case fits");
        ConvProblem {
            x: TensorDesc {
                dtype: case.dtype,
                layout: case.layouts[0],
                dims: case.x,
            },
            w: FilterDesc {
                dtype: case.dtype,
                layout: case.layouts[1],
                dims: case.w,
            },
            y: TensorDesc {
                dtype: case.dtype,
                layout: case.layouts[2],
                dims: [n, k, p, q],
            },
            conv: ConvDesc {
                pad: case.pad,
                stride: case.stride,
                dilation: case.dilation,
                compute: DType::F32,
                math: if case.dtype == DType::F32 {
                    MathType::Fma
                } else {
                    MathType::TensorOp
                },
            },
        }
    }

    /// Runs `dir` of `case` with `algo` (on `col_floats`-element im2col runs; `None`: through
    /// run_dnn) and checks it against the oracle.
    fn conv_check(
        case: &Case,
        dir: ConvDirection,
        algo: u32,
        col_floats: Option<usize>,
        seed: u64,
    ) {
        let pr = problem(case);
        let dt = case.dtype;
        let mut rng = Rng(seed);
        let inputs = |rng: &mut Rng, len: usize, is_output: bool| {
            if is_output && case.beta == 0.0 {
                vec![f32::NAN; len]
            } else {
                rng.values(len)
            }
        };
        let mut x = Buf::of(
            dt,
            &inputs(&mut rng, pr.x.len(), dir == ConvDirection::BackwardData),
        );
        let mut w = Buf::of(
            dt,
            &inputs(&mut rng, pr.w.len(), dir == ConvDirection::BackwardFilter),
        );
        let mut y = Buf::of(
            dt,
            &inputs(&mut rng, pr.y.len(), dir == ConvDirection::Forward),
        );
        let ws_bytes = workspace_bytes(&pr, dir, algo).expect("an offered algorithm");
        let mut ws = Buf::zeroed(ws_bytes);
        let before = [
            x.read(dt, pr.x.len()),
            w.read(dt, pr.w.len()),
            y.read(dt, pr.y.len()),
        ];
        let call = ConvCall {
            dir,
            problem: pr,
            algo,
            x: x.ptr(),
            w: w.ptr(),
            y: y.ptr(),
            workspace: if ws_bytes > 0 { ws.ptr() } else { 0 },
            workspace_bytes: ws_bytes,
            alpha: case.alpha,
            beta: case.beta,
        };
        validate_dnn(&DnnCall::Conv(call)).expect("a valid call");
        // SAFETY: the buffers cover the call's regions.
        unsafe {
            match col_floats {
                None => run_dnn(&DnnCall::Conv(call)).expect("runs"),
                Some(limit) => run_conv(&call, limit),
            }
        }
        let exact = conv_oracle(dir, &pr, &before[0], &before[1], &before[2]);
        let (out, old, len) = match dir {
            ConvDirection::Forward => (&y, &before[2], pr.y.len()),
            ConvDirection::BackwardData => (&x, &before[0], pr.x.len()),
            ConvDirection::BackwardFilter => (&w, &before[1], pr.w.len()),
        };
        let what = format!("{dir:?} algo {algo} of {case:?}");
        check(
            &what,
            dt,
            &out.read(dt, len),
            old,
            &exact,
            case.alpha,
            case.beta,
        );
        // The inputs are left as they were.
        for (i, (buf, len)) in [(&x, pr.x.len()), (&w, pr.w.len()), (&y, pr.y.len())]
            .into_iter()
            .enumerate()
        {
            let is_output = matches!(
                (i, dir),
                (0, ConvDirection::BackwardData)
                    | (1, ConvDirection::BackwardFilter)
                    | (2, ConvDirection::Forward)
            );
            if !is_output {
                let now = buf.read(dt, len);
                assert!(
                    now.iter()
                        .zip(&before[i])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{what}: input {i} changed"
                );
            }
        }
    }

    impl std::fmt::Debug for Case {
        fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(
                f,
                "x {:?} w {:?} pad {:?} stride {:?} dilation {:?} {:?} {:?} alpha {} beta {}",
                self.x,
                self.w,
                self.pad,
                self.stride,
                self.dilation,
                self.dtype,
                self.layouts,
                self.alpha,
                self.beta
            )
        }
    }

    fn cases() -> Vec<Case> {
        use DType::*;
        use Layout::*;
        let base = Case {
            x: [2, 3, 7, 7],
            w: [4, 3, 3, 3],
            pad: [1, 1],
            stride: [1, 1],
            dilation: [1, 1],
            dtype: F32,
            layouts: [Nchw, Nchw, Nchw],
            alpha: 1.0,
            beta: 0.0,
        };
        vec![
            base,
            Case {
                layouts: [Nhwc, Nhwc, Nhwc],
                alpha: 0.5,
                beta: 1.0,
                ..base
            },
            // Strided, dilated, a non-square kernel with asymmetric padding, a non-square input.
            Case {
                x: [2, 5, 9, 6],
                w: [6, 5, 3, 2],
                pad: [2, 1],
                stride: [2, 1],
                dilation: [2, 1],
                layouts: [Nhwc, Nchw, Nhwc],
                alpha: -1.5,
                beta: 0.25,
                ..base
            },
            // The 1×3 and 3×1 kernels of the factorised Inception branches, 16-bit.
            Case {
                x: [2, 8, 6, 5],
                w: [5, 8, 1, 3],
                pad: [0, 1],
                dtype: F16,
                layouts: [Nhwc, Nhwc, Nhwc],
                ..base
            },
            Case {
                x: [3, 4, 5, 6],
                w: [7, 4, 3, 1],
                pad: [1, 0],
                stride: [1, 2],
                dtype: Bf16,
                layouts: [Nchw, Nhwc, Nhwc],
                alpha: 2.0,
                beta: 1.0,
                ..base
            },
            // 1×1 stride 2 (some inputs feed no output), 5×5 pad 2 accumulating in f16.
            Case {
                x: [2, 6, 7, 8],
                w: [3, 6, 1, 1],
                pad: [0, 0],
                stride: [2, 2],
                ..base
            },
            Case {
                x: [1, 4, 8, 8],
                w: [4, 4, 5, 5],
                pad: [2, 2],
                dtype: F16,
                layouts: [Nhwc, Nhwc, Nchw],
                beta: 1.0,
                ..base
            },
            // The stem: 3 → many channels, stride 2.
            Case {
                x: [2, 3, 12, 12],
                w: [16, 3, 3, 3],
                stride: [2, 2],
                dtype: Bf16,
                layouts: [Nhwc, Nhwc, Nhwc],
                ..base
            },
        ]
    }

    #[test]
    fn convolutions_match_the_definition() {
        let dirs = [
            ConvDirection::Forward,
            ConvDirection::BackwardData,
            ConvDirection::BackwardFilter,
        ];
        for (i, case) in cases().iter().enumerate() {
            for dir in dirs {
                for perf in conv_algorithms(&problem(case), dir, false) {
                    conv_check(case, dir, perf.algo, None, 1 + i as u64);
                }
                // One image per im2col run: the runs must tile the batch, and backward filter
                // must accumulate across them.
                conv_check(case, dir, offers(dir)[0].algo, Some(1), 100 + i as u64);
            }
        }
    }

    #[test]
    fn the_workspace_is_scribbled_on_and_inputs_kept() {
        // run_dnn fills the workspace the algorithm needs with NaN, as garbage on a GPU.
        let case = cases()[0];
        let pr = problem(&case);
        let dir = ConvDirection::Forward;
        let algo = offers(dir)[0].algo;
        let need = workspace_bytes(&pr, dir, algo).expect("offered");
        assert!(need > 0);
        let mut rng = Rng(7);
        let mut x = Buf::of(DType::F32, &rng.values(pr.x.len()));
        let mut w = Buf::of(DType::F32, &rng.values(pr.w.len()));
        let mut y = Buf::zeroed(pr.y.bytes());
        let mut ws = Buf::zeroed(need);
        let call = ConvCall {
            dir,
            problem: pr,
            algo,
            x: x.ptr(),
            w: w.ptr(),
            y: y.ptr(),
            workspace: ws.ptr(),
            workspace_bytes: need,
            alpha: 1.0,
            beta: 0.0,
        };
        // SAFETY: the buffers cover the call's regions.
        unsafe { run_dnn(&DnnCall::Conv(call)).expect("runs") };
        assert!(ws.bytes()[..need].iter().all(|&b| b == 0xff));
    }

    // ---- pooling

    /// The definition, with its own window loop: padding never wins a maximum, NaN is the
    /// maximum of any window holding one, and backward routes to the first maximum (the first
    /// NaN) in row-major order.
    fn pool_oracle(
        pool: &PoolDesc,
        xd: &TensorDesc,
        x: &[f64],
        yd: &TensorDesc,
        dy: &[f64],
    ) -> (Exact, Exact) {
        let [n, c, h, w] = xd.dims;
        let [_, _, p, q] = yd.dims;
        let area = (pool.window[0] * pool.window[1]) as f64;
        let (mut fwd, mut bwd) = (Exact::new(yd.len()), Exact::new(xd.len()));
        for ni in 0..n {
            for ci in 0..c {
                for pi in 0..p {
                    for qi in 0..q {
                        let yi = yd.offset(ni, ci, pi, qi);
                        let mut taps = Vec::new();
                        for i in 0..pool.window[0] {
                            for j in 0..pool.window[1] {
                                let hi = (pi * pool.stride[0] + i) as isize - pool.pad[0] as isize;
                                let wi = (qi * pool.stride[1] + j) as isize - pool.pad[1] as isize;
                                if hi >= 0 && wi >= 0 && hi < h as isize && wi < w as isize {
                                    taps.push(xd.offset(ni, ci, hi as usize, wi as usize));
                                }
                            }
                        }
                        match pool.mode {
                            PoolMode::MaxDeterministic => {
                                let at = match taps.iter().find(|&&t| x[t].is_nan()) {
                                    Some(&t) => t,
                                    None => taps.iter().copied().fold(taps[0], |m, t| {
                                        if x[t] > x[m] {
                                            t
                                        } else {
                                            m
                                        }
                                    }),
                                };
                                fwd.add(yi, x[at]);
                                bwd.add(at, dy[yi]);
                            }
                            PoolMode::AverageCountIncludePadding => {
                                for &t in &taps {
                                    fwd.add(yi, x[t] / area);
                                    bwd.add(t, dy[yi] / area);
                                }
                            }
                        }
                    }
                }
            }
        }
        (fwd, bwd)
    }

    struct PoolCase {
        pool: PoolDesc,
        x: TensorDesc,
        y: TensorDesc,
        alpha: f32,
        beta: f32,
    }

    fn pool_case(
        mode: PoolMode,
        window: usize,
        pad: usize,
        stride: usize,
        x: [usize; 4],
        dtype: DType,
        layout: Layout,
    ) -> PoolCase {
        let [n, c, h, w] = x;
        let p = out_len(h, pad, window, stride, 1).expect("fits");
        let q = out_len(w, pad, window, stride, 1).expect("fits");
        PoolCase {
            pool: PoolDesc {
                mode,
                window: [window; 2],
                pad: [pad; 2],
                stride: [stride; 2],
            },
            x: TensorDesc {
                dtype,
                layout,
                dims: x,
            },
            y: TensorDesc {
                dtype,
                layout,
                dims: [n, c, p, q],
            },
            alpha: 1.0,
            beta: 0.0,
        }
    }

    /// Runs forward then backward of `pc` on `xv` (random dy; NaN-filled outputs when beta is
    /// 0) and checks both; returns (y, dx).
    fn pool_check(pc: &PoolCase, xv: &[f32], seed: u64) -> (Vec<f64>, Vec<f64>) {
        let dt = pc.x.dtype;
        let mut rng = Rng(seed);
        let outputs = |rng: &mut Rng, len| {
            if pc.beta == 0.0 {
                vec![f32::NAN; len]
            } else {
                rng.values(len)
            }
        };
        let mut x = Buf::of(dt, xv);
        let mut y = Buf::of(dt, &outputs(&mut rng, pc.y.len()));
        let mut dy = Buf::of(dt, &rng.values(pc.y.len()));
        let mut dx = Buf::of(dt, &outputs(&mut rng, pc.x.len()));
        let (x0, y0, dy0, dx0) = (
            x.read(dt, pc.x.len()),
            y.read(dt, pc.y.len()),
            dy.read(dt, pc.y.len()),
            dx.read(dt, pc.x.len()),
        );
        let fwd = DnnCall::PoolForward(PoolForward {
            pool: pc.pool,
            x: pc.x,
            x_ptr: x.ptr(),
            y: pc.y,
            y_ptr: y.ptr(),
            alpha: pc.alpha,
            beta: pc.beta,
        });
        // SAFETY: the buffers cover the call's regions.
        unsafe { run_dnn(&fwd).expect("runs") };
        let bwd = DnnCall::PoolBackward(PoolBackward {
            pool: pc.pool,
            y: pc.y,
            y_ptr: y.ptr(),
            dy_ptr: dy.ptr(),
            x: pc.x,
            x_ptr: x.ptr(),
            dx_ptr: dx.ptr(),
            alpha: pc.alpha,
            beta: pc.beta,
        });
        // SAFETY: as above.
        unsafe { run_dnn(&bwd).expect("runs") };
        let (ef, eb) = pool_oracle(&pc.pool, &pc.x, &x0, &pc.y, &dy0);
        let (yv, dxv) = (y.read(dt, pc.y.len()), dx.read(dt, pc.x.len()));
        let what = format!(
            "{:?} {:?} {:?} alpha {} beta {}",
            pc.pool, pc.x.dims, pc.x.layout, pc.alpha, pc.beta
        );
        check(
            &format!("pool forward {what}"),
            dt,
            &yv,
            &y0,
            &ef,
            pc.alpha,
            pc.beta,
        );
        check(
            &format!("pool backward {what}"),
            dt,
            &dxv,
            &dx0,
            &eb,
            pc.alpha,
            pc.beta,
        );
        (yv, dxv)
    }

    #[test]
    fn pooling_matches_the_definition() {
        use PoolMode::*;
        let mut seed = 0;
        for dtype in [DType::F32, DType::F16, DType::Bf16] {
            for layout in [Layout::Nchw, Layout::Nhwc] {
                for (mode, window, pad, stride) in [
                    // Overlapping windows with padding: the Inception pool branch and the
                    // stride-2 reductions.
                    (MaxDeterministic, 3, 1, 1),
                    (MaxDeterministic, 3, 1, 2),
                    (MaxDeterministic, 2, 0, 2),
                    (AverageCountIncludePadding, 2, 0, 2),
                    (AverageCountIncludePadding, 3, 1, 1),
                ] {
                    for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0)] {
                        seed += 1;
                        let mut pc =
                            pool_case(mode, window, pad, stride, [2, 3, 7, 6], dtype, layout);
                        (pc.alpha, pc.beta) = (alpha, beta);
                        // Few distinct values, so that windows hold ties.
                        let mut rng = Rng(seed);
                        let xv: Vec<f32> = (0..pc.x.len())
                            .map(|_| (rng.uniform() * 4.0).round())
                            .collect();
                        pool_check(&pc, &xv, seed);
                    }
                }
            }
        }
    }

    #[test]
    fn max_pool_backward_routes_to_the_first_maximum() {
        // 2×2 windows, stride 1, over [[1, 5, 5], [0, 5, 2]]: both windows' maximum 5 first
        // occurs at (0, 1), which gets both gradients.
        let pc = pool_case(
            PoolMode::MaxDeterministic,
            2,
            0,
            1,
            [1, 1, 2, 3],
            DType::F32,
            Layout::Nchw,
        );
        let (y, dx) = pool_check(&pc, &[1.0, 5.0, 5.0, 0.0, 5.0, 2.0], 3);
        assert_eq!(y, [5.0, 5.0]);
        assert_eq!(dx.iter().filter(|&&g| g != 0.0).count(), 1);
        assert!(dx[1] != 0.0);
    }

    #[test]
    fn max_pool_propagates_nan() {
        let pc = pool_case(
            PoolMode::MaxDeterministic,
            3,
            1,
            2,
            [1, 2, 6, 6],
            DType::F32,
            Layout::Nhwc,
        );
        let mut xv = Rng(5).values(pc.x.len());
        xv[pc.x.offset(0, 1, 3, 3)] = f32::NAN;
        let (y, dx) = pool_check(&pc, &xv, 9);
        // Window p covers rows 2p-1 ..= 2p+1: (3, 3) lies in those of (p, q) ∈ {1, 2}², channel 1.
        for p in 0..3 {
            for q in 0..3 {
                for c in 0..2 {
                    let nan = c == 1 && p >= 1 && q >= 1;
                    assert_eq!(y[pc.y.offset(0, c, p, q)].is_nan(), nan, "y at {c} {p} {q}");
                }
            }
        }
        assert!(dx.iter().all(|g| g.is_finite()));
        let avg = pool_case(
            PoolMode::AverageCountIncludePadding,
            3,
            1,
            2,
            [1, 2, 6, 6],
            DType::F32,
            Layout::Nhwc,
        );
        let (y, _) = pool_check(&avg, &xv, 10);
        assert_eq!(y.iter().filter(|v| v.is_nan()).count(), 4);
    }

    // ---- AddTensor

    #[test]
    fn add_tensor_broadcasts() {
        let cases = [
            // The backend's bias: fp32 [1, C, 1, 1] NCHW onto an fp32 NHWC activation.
            (
                [1, 5, 1, 1],
                Layout::Nchw,
                Layout::Nhwc,
                DType::F32,
                1.0,
                1.0,
            ),
            (
                [1, 5, 1, 1],
                Layout::Nchw,
                Layout::Nhwc,
                DType::F32,
                1.0,
                0.0,
            ),
            (
                [2, 1, 4, 1],
                Layout::Nhwc,
                Layout::Nchw,
                DType::F16,
                -0.5,
                2.0,
            ),
            (
                [2, 5, 4, 3],
                Layout::Nhwc,
                Layout::Nchw,
                DType::Bf16,
                1.5,
                0.0,
            ),
        ];
        for (i, (a_dims, a_layout, c_layout, dt, alpha, beta)) in cases.into_iter().enumerate() {
            let ad = TensorDesc {
                dtype: dt,
                layout: a_layout,
                dims: a_dims,
            };
            let cd = TensorDesc {
                dtype: dt,
                layout: c_layout,
                dims: [2, 5, 4, 3],
            };
            let mut rng = Rng(20 + i as u64);
            let mut a = Buf::of(dt, &rng.values(ad.len()));
            let c_init = if beta == 0.0 {
                vec![f32::NAN; cd.len()]
            } else {
                rng.values(cd.len())
            };
            let mut c = Buf::of(dt, &c_init);
            let (a0, c0) = (a.read(dt, ad.len()), c.read(dt, cd.len()));
            let call = DnnCall::AddTensor(AddTensor {
                a: ad,
                a_ptr: a.ptr(),
                c: cd,
                c_ptr: c.ptr(),
                alpha,
                beta,
            });
            // SAFETY: the buffers cover the call's regions.
            unsafe { run_dnn(&call).expect("runs") };
            let mut e = Exact::new(cd.len());
            let pick = |i: usize, axis: usize| if a_dims[axis] == 1 { 0 } else { i };
            for n in 0..2 {
                for ch in 0..5 {
                    for h in 0..4 {
                        for w in 0..3 {
                            e.add(
                                cd.offset(n, ch, h, w),
                                a0[ad.offset(pick(n, 0), pick(ch, 1), pick(h, 2), pick(w, 3))],
                            );
                        }
                    }
                }
            }
            check(
                &format!("add tensor case {i}"),
                dt,
                &c.read(dt, cd.len()),
                &c0,
                &e,
                alpha,
                beta,
            );
        }
    }

    // ---- GEMM

    #[test]
    fn gemm_is_column_major_sgemm() {
        use Transpose::*;
        let (m, n, k) = (5, 4, 7);
        for (i, (transa, transb)) in [(N, N), (N, T), (T, N), (T, T)].into_iter().enumerate() {
            for (alpha, beta) in [(1.0f32, 0.0f32), (0.7, 0.5)] {
                let (a_rows, a_cols) = if transa == N { (m, k) } else { (k, m) };
                let (b_rows, b_cols) = if transb == N { (k, n) } else { (n, k) };
                // Leading dimensions beyond the rows: the gaps must be neither read nor written.
                let (lda, ldb, ldc) = (a_rows + 3, b_rows + 1, m + 2);
                let mut rng = Rng(40 + i as u64);
                let a_init = rng.values(lda * a_cols);
                let b_init = rng.values(ldb * b_cols);
                let mut c_init = rng.values(ldc * n);
                for (j, v) in c_init.iter_mut().enumerate() {
                    if beta == 0.0 || j % ldc >= m {
                        *v = f32::NAN;
                    }
                }
                let (mut a, mut b, mut c) = (
                    Buf::of(DType::F32, &a_init),
                    Buf::of(DType::F32, &b_init),
                    Buf::of(DType::F32, &c_init),
                );
                let g = Gemm {
                    transa,
                    transb,
                    m,
                    n,
                    k,
                    a: a.ptr(),
                    lda,
                    b: b.ptr(),
                    ldb,
                    c: c.ptr(),
                    ldc,
                    alpha,
                    beta,
                };
                validate_gemm(&g).expect("valid");
                // SAFETY: the buffers cover the call's regions.
                unsafe { run_gemm(&g).expect("runs") };
                let opa = |r: usize, l: usize| {
                    f64::from(if transa == N {
                        a_init[r + l * lda]
                    } else {
                        a_init[l + r * lda]
                    })
                };
                let opb = |l: usize, col: usize| {
                    f64::from(if transb == N {
                        b_init[l + col * ldb]
                    } else {
                        b_init[col + l * ldb]
                    })
                };
                let mut e = Exact::new(m * n);
                let mut old = vec![0.0; m * n];
                let mut got = vec![0.0; m * n];
                let out = c.read(DType::F32, ldc * n);
                for col in 0..n {
                    for row in 0..m {
                        for l in 0..k {
                            e.add(row + col * m, opa(row, l) * opb(l, col));
                        }
                        old[row + col * m] = f64::from(c_init[row + col * ldc]);
                        got[row + col * m] = out[row + col * ldc];
                    }
                    for row in m..ldc {
                        assert!(
                            out[row + col * ldc].is_nan(),
                            "C's padding at ({row}, {col}) was written"
                        );
                    }
                }
                check(
                    &format!("gemm {transa:?}{transb:?} alpha {alpha} beta {beta}"),
                    DType::F32,
                    &got,
                    &old,
                    &e,
                    alpha,
                    beta,
                );
            }
        }
    }

    // ---- validation

    fn expect_err(result: Result<()>, words: &[&str]) {
        let message = match result {
            Ok(()) => panic!("accepted; expected an error mentioning {words:?}"),
            Err(e) => e.to_string(),
        };
        for w in words {
            assert!(message.contains(w), "{message:?} does not mention {w:?}");
        }
    }

    /// A valid call over made-up, well-separated addresses (validation reads no memory).
    fn valid_conv(dir: ConvDirection) -> ConvCall {
        let pr = problem(&cases()[0]);
        let algo = offers(dir)[0].algo;
        let ws = workspace_bytes(&pr, dir, algo).expect("offered");
        ConvCall {
            dir,
            problem: pr,
            algo,
            x: 0x10_0000,
            w: 0x20_0000,
            y: 0x30_0000,
            workspace: 0x40_0000,
            workspace_bytes: ws,
            alpha: 1.0,
            beta: 0.0,
        }
    }

    #[test]
    fn validation_rejects_what_cudnn_would() {
        let conv = |f: &dyn Fn(&mut ConvCall)| {
            let mut c = valid_conv(ConvDirection::Forward);
            f(&mut c);
            validate_dnn(&DnnCall::Conv(c))
        };
        for dir in [
            ConvDirection::Forward,
            ConvDirection::BackwardData,
            ConvDirection::BackwardFilter,
        ] {
            validate_dnn(&DnnCall::Conv(valid_conv(dir))).expect("valid");
        }
        conv(&|_| {}).expect("valid");
        expect_err(
            conv(&|c| c.problem.y.dims[2] = 6),
            &[
                "cudnnConvolutionForward",
                BAD_PARAM,
                "y dims",
                "[2, 4, 7, 7]",
            ],
        );
        expect_err(
            conv(&|c| c.problem.w.dims[1] = 4),
            &[BAD_PARAM, "C = 3", "C = 4"],
        );
        expect_err(
            conv(&|c| c.problem.w.dtype = DType::F16),
            &[BAD_PARAM, "data types", "w F16"],
        );
        expect_err(
            conv(&|c| c.problem.conv.compute = DType::F16),
            &[NOT_SUPPORTED, "compute type F16"],
        );
        expect_err(
            conv(&|c| c.problem.conv.stride = [1, 0]),
            &[BAD_PARAM, "stride"],
        );
        expect_err(
            conv(&|c| c.problem.conv.dilation = [0, 1]),
            &[BAD_PARAM, "dilation"],
        );
        expect_err(
            conv(&|c| c.problem.x.dims[0] = 0),
            &[BAD_PARAM, "x dims", "zero"],
        );
        expect_err(
            conv(&|c| c.problem.x.dims[0] = 1 << 40),
            &[NOT_SUPPORTED, "x dims", "2^31"],
        );
        expect_err(
            conv(&|c| c.problem.conv.math = MathType::TensorOp),
            &[NOT_SUPPORTED, "TensorOp", "F32"],
        );
        expect_err(
            conv(&|c| {
                c.problem.w.dims = [4, 3, 11, 3];
                c.problem.conv.pad = [0, 1];
            }),
            &[BAD_PARAM, "11x3 window"],
        );
        expect_err(conv(&|c| c.x = 0), &[BAD_PARAM, "x is a null pointer"]);
        expect_err(conv(&|c| c.w += 2), &[BAD_PARAM, "w at", "aligned to 4"]);
        expect_err(conv(&|c| c.algo = 7), &[NOT_SUPPORTED, "algo 7", "[1, 0]"]);
        expect_err(
            conv(&|c| c.workspace_bytes -= 1),
            &[BAD_PARAM, "workspace_bytes"],
        );
        expect_err(
            conv(&|c| c.workspace += 8),
            &[BAD_PARAM, "workspace at", "aligned to 16"],
        );
        expect_err(
            conv(&|c| c.workspace = 0),
            &[BAD_PARAM, "workspace is a null pointer"],
        );
        expect_err(
            conv(&|c| c.y = c.x + 64),
            &[BAD_PARAM, "overlaps", "x", "y"],
        );
        expect_err(
            conv(&|c| c.workspace = c.w),
            &[BAD_PARAM, "overlaps", "workspace"],
        );
        // Inputs may share memory; a 16-bit convolution may run in FMA math.
        conv(&|c| c.w = c.x).expect("inputs may overlap");
        conv(&|c| {
            c.problem.x.dtype = DType::F16;
            c.problem.w.dtype = DType::F16;
            c.problem.y.dtype = DType::F16;
        })
        .expect("f16 with Fma math");

        let pc = pool_case(
            PoolMode::MaxDeterministic,
            3,
            1,
            2,
            [2, 3, 7, 6],
            DType::F32,
            Layout::Nhwc,
        );
        let pool = |f: &dyn Fn(&mut PoolForward)| {
            let mut call = PoolForward {
                pool: pc.pool,
                x: pc.x,
                x_ptr: 0x10_0000,
                y: pc.y,
                y_ptr: 0x20_0000,
                alpha: 1.0,
                beta: 0.0,
            };
            f(&mut call);
            validate_dnn(&DnnCall::PoolForward(call))
        };
        pool(&|_| {}).expect("valid");
        expect_err(
            pool(&|p| p.y.dims[3] = 4),
            &["cudnnPoolingForward", BAD_PARAM, "y dims", "[2, 3, 4, 3]"],
        );
        expect_err(pool(&|p| p.y.dims[1] = 4), &[BAD_PARAM, "y dims"]);
        expect_err(pool(&|p| p.pool.window = [0, 3]), &[BAD_PARAM, "window"]);
        expect_err(pool(&|p| p.pool.stride = [2, 0]), &[BAD_PARAM, "stride"]);
        expect_err(pool(&|p| p.pool.pad = [3, 1]), &[BAD_PARAM, "pad"]);
        expect_err(
            pool(&|p| p.y.dtype = DType::F16),
            &[BAD_PARAM, "data types"],
        );
        expect_err(pool(&|p| p.y_ptr = 0), &[BAD_PARAM, "y is a null pointer"]);
        let backward = PoolBackward {
            pool: pc.pool,
            y: pc.y,
            y_ptr: 0x10_0000,
            dy_ptr: 0x20_0000,
            x: pc.x,
            x_ptr: 0x30_0000,
            dx_ptr: 0x40_0000,
            alpha: 1.0,
            beta: 0.0,
        };
        validate_dnn(&DnnCall::PoolBackward(backward)).expect("valid");
        expect_err(
            validate_dnn(&DnnCall::PoolBackward(PoolBackward {
                dx_ptr: 0x20_0000,
                ..backward
            })),
            &["cudnnPoolingBackward", "overlaps", "dx"],
        );

        let add = AddTensor {
            a: TensorDesc {
                dtype: DType::F32,
                layout: Layout::Nchw,
                dims: [1, 5, 1, 1],
            },
            a_ptr: 0x10_0000,
            c: TensorDesc {
                dtype: DType::F32,
                layout: Layout::Nhwc,
                dims: [2, 5, 4, 4],
            },
            c_ptr: 0x20_0000,
            alpha: 1.0,
            beta: 1.0,
        };
        validate_dnn(&DnnCall::AddTensor(add)).expect("valid");
        let mut bad = add;
        bad.a.dims = [1, 4, 1, 1];
        expect_err(
            validate_dnn(&DnnCall::AddTensor(bad)),
            &["cudnnAddTensor", BAD_PARAM, "do not broadcast"],
        );
        let mut bad = add;
        bad.a.dtype = DType::F16;
        expect_err(
            validate_dnn(&DnnCall::AddTensor(bad)),
            &["cudnnAddTensor", BAD_PARAM, "A F16"],
        );
    }

    #[test]
    fn gemm_validation_follows_cublas() {
        use Transpose::*;
        let g = Gemm {
            transa: N,
            transb: T,
            m: 5,
            n: 4,
            k: 7,
            a: 0x10_0000,
            lda: 5,
            b: 0x20_0000,
            ldb: 4,
            c: 0x30_0000,
            ldc: 5,
            alpha: 1.0,
            beta: 0.0,
        };
        validate_gemm(&g).expect("valid");
        validate_gemm(&Gemm {
            transa: T,
            transb: N,
            lda: 7,
            ldb: 7,
            ..g
        })
        .expect("valid");
        expect_err(
            validate_gemm(&Gemm { k: 0, ..g }),
            &["cublasSgemm", INVALID_VALUE, "k = 0"],
        );
        expect_err(
            validate_gemm(&Gemm { lda: 4, ..g }),
            &[INVALID_VALUE, "lda = 4"],
        );
        expect_err(
            validate_gemm(&Gemm { transa: T, ..g }),
            &[INVALID_VALUE, "lda = 5", "7 rows"],
        );
        expect_err(
            validate_gemm(&Gemm { ldb: 3, ..g }),
            &[INVALID_VALUE, "ldb = 3"],
        );
        expect_err(
            validate_gemm(&Gemm { transb: N, ..g }),
            &[INVALID_VALUE, "ldb = 4", "7 rows"],
        );
        expect_err(
            validate_gemm(&Gemm { ldc: 4, ..g }),
            &[INVALID_VALUE, "ldc = 4"],
        );
        expect_err(
            validate_gemm(&Gemm { b: 0, ..g }),
            &[INVALID_VALUE, "B is a null pointer"],
        );
        expect_err(
            validate_gemm(&Gemm { c: 0x10_0010, ..g }),
            &[INVALID_VALUE, "overlaps"],
        );
        expect_err(
            validate_gemm(&Gemm { c: 0x30_0002, ..g }),
            &[INVALID_VALUE, "aligned"],
        );
    }

    #[test]
    fn algorithms_and_workspaces_agree() {
        for case in cases() {
            let pr = problem(&case);
            for dir in [
                ConvDirection::Forward,
                ConvDirection::BackwardData,
                ConvDirection::BackwardFilter,
            ] {
                let ranked = conv_algorithms(&pr, dir, false);
                let measured = conv_algorithms(&pr, dir, true);
                assert!(ranked.len() >= 2);
                let algos: Vec<u32> = ranked.iter().map(|p| p.algo).collect();
                assert_eq!(algos, measured.iter().map(|p| p.algo).collect::<Vec<_>>());
                let mut distinct = algos.clone();
                distinct.sort();
                distinct.dedup();
                assert_eq!(distinct.len(), algos.len(), "{dir:?}: distinct numbers");
                assert!(ranked[0].memory > 0, "{dir:?}: the first needs a workspace");
                assert!(ranked.iter().all(|p| p.ok && p.time_ms == -1.0));
                assert!(measured
                    .windows(2)
                    .all(|w| 0.0 < w[0].time_ms && w[0].time_ms < w[1].time_ms));
                let math = if case.dtype == DType::F32 {
                    MathType::Fma
                } else {
                    MathType::TensorOp
                };
                for p in &measured {
                    assert_eq!(workspace_bytes(&pr, dir, p.algo), Some(p.memory));
                    assert_eq!(p.math, math);
                    // cuDNN's backward ALGO_0s are the nondeterministic ones.
                    assert_eq!(
                        p.deterministic,
                        dir == ConvDirection::Forward || p.algo != 0
                    );
                }
                assert_eq!(workspace_bytes(&pr, dir, 6), None);
                assert_eq!(
                    conv_algorithms(&pr, dir, true),
                    measured,
                    "deterministic times"
                );
            }
            let mut bad = pr;
            bad.y.dims[1] += 1;
            assert!(conv_algorithms(&bad, ConvDirection::Forward, true)
                .iter()
                .all(|p| !p.ok));
        }
    }

    // ---- speed

    #[test]
    fn time_a_training_sized_convolution() {
        // N=16, 16×16×64 → 64 channels, 3×3 pad 1: printed, not asserted.
        for dtype in [DType::F32, DType::F16] {
            let case = Case {
                x: [16, 64, 16, 16],
                w: [64, 64, 3, 3],
                pad: [1, 1],
                stride: [1, 1],
                dilation: [1, 1],
                dtype,
                layouts: [Layout::Nhwc; 3],
                alpha: 1.0,
                beta: 0.0,
            };
            let pr = problem(&case);
            let mut rng = Rng(77);
            let mut x = Buf::of(dtype, &rng.values(pr.x.len()));
            let mut w = Buf::of(dtype, &rng.values(pr.w.len()));
            let mut y = Buf::of(dtype, &rng.values(pr.y.len()));
            let mut times = Vec::new();
            for dir in [
                ConvDirection::Forward,
                ConvDirection::BackwardData,
                ConvDirection::BackwardFilter,
            ] {
                let algo = conv_algorithms(&pr, dir, false)[0].algo;
                let ws_bytes = workspace_bytes(&pr, dir, algo).expect("offered");
                let mut ws = Buf::zeroed(ws_bytes);
                let call = DnnCall::Conv(ConvCall {
                    dir,
                    problem: pr,
                    algo,
                    x: x.ptr(),
                    w: w.ptr(),
                    y: y.ptr(),
                    workspace: ws.ptr(),
                    workspace_bytes: ws_bytes,
                    alpha: 1.0,
                    beta: 0.0,
                });
                let mut best = f64::INFINITY;
                for _ in 0..5 {
                    let start = Instant::now();
                    // SAFETY: the buffers cover the call's regions.
                    unsafe { run_dnn(&call).expect("runs") };
                    best = best.min(start.elapsed().as_secs_f64() * 1e3);
                }
                times.push(best);
            }
            println!(
                "{dtype:?} N=16 16x16x64 -> 64, 3x3 pad 1: forward {:.2} ms, backward data {:.2} ms, backward filter {:.2} ms, total {:.2} ms ({} threads)",
                times[0],
                times[1],
                times[2],
                times.iter().sum::<f64>(),
                rayon::current_num_threads()
            );
        }
    }
}
