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
    Region { ptr, bytes, access, what }
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
                regions.push(region(c.workspace, c.workspace_bytes, Access::Write, "workspace"));
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
    (cols - 1).saturating_mul(ld).saturating_add(rows).saturating_mul(4)
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
        region(g.c, matrix_bytes(g.m, g.n, g.ldc), output_access(g.beta), "C"),
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
            return Err(rejected(call, status, format!("{} is a null pointer", r.what)));
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
                format!("{} at {:#x} + {} bytes wraps the address space", r.what, r.ptr, r.bytes),
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
        return Err(rejected(call, BAD_PARAM, format!("{what} dims {dims:?} have a zero size")));
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
    let span = dilation.checked_mul(window.checked_sub(1)?)?.checked_add(1)?;
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
            return Err(rejected(call, BAD_PARAM, format!("conv {name} {v:?} has a zero")));
        }
    }
    if cv.compute != DType::F32 {
        return Err(rejected(
            call,
            NOT_SUPPORTED,
            format!("conv compute type {:?}: this emulation accumulates in F32 only", cv.compute),
        ));
    }
    if p.x.dtype != p.w.dtype || p.x.dtype != p.y.dtype {
        return Err(rejected(
            call,
            BAD_PARAM,
            format!("data types differ: x {:?}, w {:?}, y {:?}", p.x.dtype, p.w.dtype, p.y.dtype),
        ));
    }
    if p.x.dtype == DType::F32
        && matches!(cv.math, MathType::TensorOp | MathType::TensorOpAllowConversion)
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
            return Err(rejected(call, BAD_PARAM, format!("pool {name} {v:?} has a zero")));
        }
    }
    if pool.pad[0] >= pool.window[0] || pool.pad[1] >= pool.window[1] {
        // Such a window can lie wholly in the padding, where a maximum is undefined.
        return Err(rejected(
            call,
            BAD_PARAM,
            format!("pool pad {:?} is not smaller than its window {:?}", pool.pad, pool.window),
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
    if a.a.dims.iter().zip(&a.c.dims).any(|(&ad, &cd)| ad != cd && ad != 1) {
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
    check_regions(call, BAD_PARAM, &dnn_regions(&DnnCall::AddTensor(*a)), &[size, size])
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
    let offer = |algo, deterministic, ms_per_gflop| Offer { algo, deterministic, ms_per_gflop };
    // The first of each pair needs a workspace, so that ranking it first has the backend
    // allocate and pass one; the backward ALGO_0s accumulate with atomics on a GPU, hence
    // nondeterministic, which --deterministic has to skip.
    match dir {
        ConvDirection::Forward => {
            [offer(FWD_IMPLICIT_PRECOMP_GEMM, true, 0.02), offer(FWD_IMPLICIT_GEMM, true, 0.03)]
        }
        ConvDirection::BackwardData => {
            [offer(BWD_DATA_ALGO_1, true, 0.025), offer(BWD_DATA_ALGO_0, false, 0.035)]
        }
        ConvDirection::BackwardFilter => {
            [offer(BWD_FILTER_ALGO_1, true, 0.03), offer(BWD_FILTER_ALGO_0, false, 0.04)]
        }
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
        (ConvDirection::Forward, FWD_IMPLICIT_PRECOMP_GEMM) => {
            words(c.saturating_mul(r).saturating_mul(s).saturating_add(p.saturating_mul(q)))
        }
        (ConvDirection::BackwardData, BWD_DATA_ALGO_0) => Some(0),
        (ConvDirection::BackwardData, BWD_DATA_ALGO_1) => {
            words(k.saturating_mul(r).saturating_mul(s).saturating_add(h.saturating_mul(w)))
        }
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
    let gflop = 2.0 * [n, c, k, r, s, p, q].iter().map(|&v| v as f64).product::<f64>() / 1e9;
    let math = match problem.x.dtype {
        DType::F32 => MathType::Fma,
        DType::F16 | DType::Bf16 => MathType::TensorOp,
    };
    offers(dir)
        .iter()
        .map(|o| AlgoPerf {
            algo: o.algo,
            ok,
            time_ms: if measure { (0.005 + gflop * o.ms_per_gflop) as f32 } else { -1.0 },
            memory: workspace_bytes(problem, dir, o.algo).unwrap_or(usize::MAX),
            deterministic: o.deterministic,
            math,
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Running a call

mod conv;
mod host;
mod matmul;
mod pool;
#[cfg(test)]
mod tests;

use conv::*;
use host::*;
pub use matmul::run_gemm;
use matmul::*;
use pool::*;

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
