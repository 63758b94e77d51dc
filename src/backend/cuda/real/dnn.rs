//! cuDNN on the real device: the plain-data descriptors of [`crate::backend::cuda::device`]
//! turned into cuDNN descriptors (freed on drop), the algorithm searches reported as
//! [`AlgoPerf`], and the calls of [`DnnCall`].

use crate::backend::cuda::device::{
    AlgoPerf, ConvCall, ConvDirection, ConvProblem, DType, DnnCall, FilterDesc, Layout, MathType,
    PoolDesc, PoolMode, TensorDesc,
};
use anyhow::{bail, Result};
use cudarc::cudnn::sys;
use std::ffi::c_void;

/// Turns a cuDNN status into an error naming the call and cuDNN's message.
pub fn check(status: sys::cudnnStatus_t, what: &str) -> Result<()> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Ok(());
    }
    // SAFETY: cudnnGetErrorString returns a static NUL-terminated string for any status.
    let msg = unsafe { std::ffi::CStr::from_ptr(sys::cudnnGetErrorString(status)) };
    bail!("{what} failed: {status:?} ({})", msg.to_string_lossy())
}

/// A cuDNN handle bound to one stream. Not safe for concurrent use: the device keeps it behind
/// a mutex.
pub struct Handle(pub sys::cudnnHandle_t);

// SAFETY: a cuDNN handle may move between threads as long as calls on it are not concurrent
// (the owner's Mutex serialises them) and the device's context is current on the calling
// thread (every RealDevice entry point binds it).
unsafe impl Send for Handle {}

impl Handle {
    /// A handle whose work goes to `stream`. The context must be current.
    pub fn new(stream: cudarc::driver::sys::CUstream) -> Result<Handle> {
        let mut h = std::ptr::null_mut();
        // SAFETY: creates a handle (owned by the returned value) and binds it to a live stream
        // of the current context.
        unsafe {
            check(sys::cudnnCreate(&mut h), "cudnnCreate")?;
            let handle = Handle(h);
            check(sys::cudnnSetStream(h, stream as sys::cudaStream_t), "cudnnSetStream")?;
            Ok(handle)
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate and destroyed once.
        unsafe { sys::cudnnDestroy(self.0) };
    }
}

fn data_type(dt: DType) -> sys::cudnnDataType_t {
    use sys::cudnnDataType_t as D;
    match dt {
        DType::F32 => D::CUDNN_DATA_FLOAT,
        DType::F16 => D::CUDNN_DATA_HALF,
        DType::Bf16 => D::CUDNN_DATA_BFLOAT16,
    }
}

fn format(layout: Layout) -> sys::cudnnTensorFormat_t {
    match layout {
        Layout::Nchw => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
        Layout::Nhwc => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
    }
}

fn math_type(m: MathType) -> sys::cudnnMathType_t {
    use sys::cudnnMathType_t as M;
    match m {
        MathType::Default => M::CUDNN_DEFAULT_MATH,
        MathType::Fma => M::CUDNN_FMA_MATH,
        MathType::TensorOp => M::CUDNN_TENSOR_OP_MATH,
        MathType::TensorOpAllowConversion => M::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION,
    }
}

fn from_math_type(m: sys::cudnnMathType_t) -> MathType {
    use sys::cudnnMathType_t as M;
    match m {
        M::CUDNN_DEFAULT_MATH => MathType::Default,
        M::CUDNN_FMA_MATH => MathType::Fma,
        M::CUDNN_TENSOR_OP_MATH => MathType::TensorOp,
        M::CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION => MathType::TensorOpAllowConversion,
    }
}

/// `v` as a C `int`, or an error naming `what`.
fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow::anyhow!("{what} = {v} does not fit cuDNN's int"))
}

fn ints(v: [usize; 4], what: &str) -> Result<[i32; 4]> {
    Ok([int(v[0], what)?, int(v[1], what)?, int(v[2], what)?, int(v[3], what)?])
}

/// A tensor descriptor (freed on drop).
pub struct Tensor(sys::cudnnTensorDescriptor_t);

impl Tensor {
    pub fn new(d: &TensorDesc) -> Result<Tensor> {
        let [n, c, h, w] = ints(d.dims, "a tensor dimension")?;
        let mut p = std::ptr::null_mut();
        // SAFETY: plain descriptor creation and setting; `p` is owned by the returned value.
        unsafe {
            check(sys::cudnnCreateTensorDescriptor(&mut p), "cudnnCreateTensorDescriptor")?;
            let t = Tensor(p);
            check(
                sys::cudnnSetTensor4dDescriptor(
                    p,
                    format(d.layout),
                    data_type(d.dtype),
                    n,
                    c,
                    h,
                    w,
                ),
                &format!("cudnnSetTensor4dDescriptor({d:?})"),
            )?;
            Ok(t)
        }
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateTensorDescriptor and destroyed once.
        unsafe { sys::cudnnDestroyTensorDescriptor(self.0) };
    }
}

/// A filter descriptor: dims K, C, R, S in either layout (the layout sets the memory order).
pub struct Filter(sys::cudnnFilterDescriptor_t);

impl Filter {
    pub fn new(d: &FilterDesc) -> Result<Filter> {
        let [k, c, r, s] = ints(d.dims, "a filter dimension")?;
        let mut p = std::ptr::null_mut();
        // SAFETY: as for Tensor::new.
        unsafe {
            check(sys::cudnnCreateFilterDescriptor(&mut p), "cudnnCreateFilterDescriptor")?;
            let f = Filter(p);
            check(
                sys::cudnnSetFilter4dDescriptor(
                    p,
                    data_type(d.dtype),
                    format(d.layout),
                    k,
                    c,
                    r,
                    s,
                ),
                &format!("cudnnSetFilter4dDescriptor({d:?})"),
            )?;
            Ok(f)
        }
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateFilterDescriptor and destroyed once.
        unsafe { sys::cudnnDestroyFilterDescriptor(self.0) };
    }
}

/// A convolution descriptor: cross-correlation, its compute type and math type.
pub struct Convolution(sys::cudnnConvolutionDescriptor_t);

impl Convolution {
    pub fn new(c: &crate::backend::cuda::device::ConvDesc) -> Result<Convolution> {
        let [ph, pw, sh, sw] = ints(
            [c.pad[0], c.pad[1], c.stride[0], c.stride[1]],
            "a convolution padding or stride",
        )?;
        let (dh, dw) = (int(c.dilation[0], "a dilation")?, int(c.dilation[1], "a dilation")?);
        let mut p = std::ptr::null_mut();
        // SAFETY: as for Tensor::new.
        unsafe {
            check(
                sys::cudnnCreateConvolutionDescriptor(&mut p),
                "cudnnCreateConvolutionDescriptor",
            )?;
            let conv = Convolution(p);
            check(
                sys::cudnnSetConvolution2dDescriptor(
                    p,
                    ph,
                    pw,
                    sh,
                    sw,
                    dh,
                    dw,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    data_type(c.compute),
                ),
                &format!("cudnnSetConvolution2dDescriptor({c:?})"),
            )?;
            check(
                sys::cudnnSetConvolutionMathType(p, math_type(c.math)),
                "cudnnSetConvolutionMathType",
            )?;
            Ok(conv)
        }
    }
}

impl Drop for Convolution {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateConvolutionDescriptor and destroyed once.
        unsafe { sys::cudnnDestroyConvolutionDescriptor(self.0) };
    }
}

/// A pooling descriptor; NaN propagates.
pub struct Pooling(sys::cudnnPoolingDescriptor_t);

impl Pooling {
    pub fn new(d: &PoolDesc) -> Result<Pooling> {
        let mode = match d.mode {
            PoolMode::MaxDeterministic => sys::cudnnPoolingMode_t::CUDNN_POOLING_MAX_DETERMINISTIC,
            PoolMode::AverageCountIncludePadding => {
                sys::cudnnPoolingMode_t::CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING
            }
        };
        let [wh, ww, ph, pw] =
            ints([d.window[0], d.window[1], d.pad[0], d.pad[1]], "a pooling window or padding")?;
        let (sh, sw) =
            (int(d.stride[0], "a pooling stride")?, int(d.stride[1], "a pooling stride")?);
        let mut p = std::ptr::null_mut();
        // SAFETY: as for Tensor::new.
        unsafe {
            check(sys::cudnnCreatePoolingDescriptor(&mut p), "cudnnCreatePoolingDescriptor")?;
            let pool = Pooling(p);
            check(
                sys::cudnnSetPooling2dDescriptor(
                    p,
                    mode,
                    sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                    wh,
                    ww,
                    ph,
                    pw,
                    sh,
                    sw,
                ),
                &format!("cudnnSetPooling2dDescriptor({d:?})"),
            )?;
            Ok(pool)
        }
    }
}

impl Drop for Pooling {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreatePoolingDescriptor and destroyed once.
        unsafe { sys::cudnnDestroyPoolingDescriptor(self.0) };
    }
}

/// The descriptors of one convolution problem.
struct ConvDescs {
    x: Tensor,
    w: Filter,
    y: Tensor,
    conv: Convolution,
}

impl ConvDescs {
    fn new(p: &ConvProblem) -> Result<ConvDescs> {
        Ok(ConvDescs {
            x: Tensor::new(&p.x)?,
            w: Filter::new(&p.w)?,
            y: Tensor::new(&p.y)?,
            conv: Convolution::new(&p.conv)?,
        })
    }
}

fn fwd_algo(a: u32) -> Result<sys::cudnnConvolutionFwdAlgo_t> {
    use sys::cudnnConvolutionFwdAlgo_t as A;
    Ok(match a {
        0 => A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM,
        1 => A::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
        2 => A::CUDNN_CONVOLUTION_FWD_ALGO_GEMM,
        3 => A::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT,
        4 => A::CUDNN_CONVOLUTION_FWD_ALGO_FFT,
        5 => A::CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING,
        6 => A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD,
        7 => A::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
        _ => bail!("cuDNN has no forward convolution algorithm {a}"),
    })
}

fn bwd_data_algo(a: u32) -> Result<sys::cudnnConvolutionBwdDataAlgo_t> {
    use sys::cudnnConvolutionBwdDataAlgo_t as A;
    Ok(match a {
        0 => A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0,
        1 => A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        2 => A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT,
        3 => A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING,
        4 => A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD,
        5 => A::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED,
        _ => bail!("cuDNN has no backward-data convolution algorithm {a}"),
    })
}

fn bwd_filter_algo(a: u32) -> Result<sys::cudnnConvolutionBwdFilterAlgo_t> {
    use sys::cudnnConvolutionBwdFilterAlgo_t as A;
    Ok(match a {
        0 => A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
        1 => A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        2 => A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
        3 => A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
        4 => A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD,
        5 => A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED,
        6 => A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
        _ => bail!("cuDNN has no backward-filter convolution algorithm {a}"),
    })
}

/// The fields of cuDNN's three `*AlgoPerf_t` structs, as an [`AlgoPerf`].
macro_rules! to_perf {
    ($r:expr) => {{
        let r = $r;
        AlgoPerf {
            algo: r.algo as u32,
            ok: r.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS,
            time_ms: r.time,
            memory: r.memory,
            deterministic: r.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC,
            math: from_math_type(r.mathType),
        }
    }};
}

/// The algorithms cuDNN offers for `dir` of `p`: `cudnnFind*` (each run once and timed, on
/// scratch memory cuDNN allocates itself; blocks until done) when `measure`, else
/// `cudnnGet*_v7` (ranked by heuristics, `time_ms` negative). In cuDNN's order.
pub fn algorithms(
    h: &Handle, p: &ConvProblem, dir: ConvDirection, measure: bool,
) -> Result<Vec<AlgoPerf>> {
    let d = ConvDescs::new(p)?;
    const N: usize = 16;
    let mut n = 0i32;
    macro_rules! search {
        ($find:path, $get:path, $perf:ty, ($a:expr, $b:expr, $c:expr, $e:expr), $what:literal) => {{
            // SAFETY: plain-old-data C structs, zero being a valid bit pattern for each field.
            let mut results: [$perf; N] = unsafe { std::mem::zeroed() };
            // SAFETY: the descriptors live for the whole call; the array holds N entries, the
            // count passed; only the first `n` returned are read.
            let (status, name) = unsafe {
                if measure {
                    (
                        $find(h.0, $a, $b, $c, $e, N as i32, &mut n, results.as_mut_ptr()),
                        concat!("cudnnFind", $what, "Algorithm"),
                    )
                } else {
                    (
                        $get(h.0, $a, $b, $c, $e, N as i32, &mut n, results.as_mut_ptr()),
                        concat!("cudnnGet", $what, "Algorithm_v7"),
                    )
                }
            };
            check(status, name)?;
            results[..(n.max(0) as usize).min(N)]
                .iter()
                .map(|r| to_perf!(r))
                .collect()
        }};
    }
    Ok(match dir {
        ConvDirection::Forward => search!(
            sys::cudnnFindConvolutionForwardAlgorithm,
            sys::cudnnGetConvolutionForwardAlgorithm_v7,
            sys::cudnnConvolutionFwdAlgoPerf_t,
            (d.x.0, d.w.0, d.conv.0, d.y.0),
            "ConvolutionForward"
        ),
        ConvDirection::BackwardData => search!(
            sys::cudnnFindConvolutionBackwardDataAlgorithm,
            sys::cudnnGetConvolutionBackwardDataAlgorithm_v7,
            sys::cudnnConvolutionBwdDataAlgoPerf_t,
            (d.w.0, d.y.0, d.conv.0, d.x.0),
            "ConvolutionBackwardData"
        ),
        ConvDirection::BackwardFilter => search!(
            sys::cudnnFindConvolutionBackwardFilterAlgorithm,
            sys::cudnnGetConvolutionBackwardFilterAlgorithm_v7,
            sys::cudnnConvolutionBwdFilterAlgoPerf_t,
            (d.x.0, d.y.0, d.conv.0, d.w.0),
            "ConvolutionBackwardFilter"
        ),
    })
}

fn ptr(p: u64) -> *mut c_void {
    p as *mut c_void
}

/// Queues `call` on the handle's stream.
///
/// # Safety
/// Every address in `call` is live device memory of the size its descriptor gives (the
/// workspace `workspace_bytes`), usable on the handle's stream.
pub unsafe fn run(h: &Handle, call: &DnnCall) -> Result<()> {
    let name = call.name();
    // cuDNN's scaling factors are host floats for fp32, fp16 and bf16 data alike.
    let scale = |v: &f32| (v as *const f32).cast::<c_void>();
    match call {
        DnnCall::Conv(c) => conv(h, c, name),
        DnnCall::AddTensor(a) => {
            let (ad, cd) = (Tensor::new(&a.a)?, Tensor::new(&a.c)?);
            check(
                sys::cudnnAddTensor(
                    h.0,
                    scale(&a.alpha),
                    ad.0,
                    ptr(a.a_ptr),
                    scale(&a.beta),
                    cd.0,
                    ptr(a.c_ptr),
                ),
                name,
            )
        }
        DnnCall::PoolForward(f) => {
            let pd = Pooling::new(&f.pool)?;
            let (xd, yd) = (Tensor::new(&f.x)?, Tensor::new(&f.y)?);
            check(
                sys::cudnnPoolingForward(
                    h.0,
                    pd.0,
                    scale(&f.alpha),
                    xd.0,
                    ptr(f.x_ptr),
                    scale(&f.beta),
                    yd.0,
                    ptr(f.y_ptr),
                ),
                name,
            )
        }
        DnnCall::PoolBackward(b) => {
            let pd = Pooling::new(&b.pool)?;
            let (xd, yd) = (Tensor::new(&b.x)?, Tensor::new(&b.y)?);
            check(
                sys::cudnnPoolingBackward(
                    h.0,
                    pd.0,
                    scale(&b.alpha),
                    yd.0,
                    ptr(b.y_ptr),
                    yd.0,
                    ptr(b.dy_ptr),
                    xd.0,
                    ptr(b.x_ptr),
                    scale(&b.beta),
                    xd.0,
                    ptr(b.dx_ptr),
                ),
                name,
            )
        }
    }
}

/// # Safety
/// As [`run`].
unsafe fn conv(h: &Handle, c: &ConvCall, name: &str) -> Result<()> {
    let d = ConvDescs::new(&c.problem)?;
    let (alpha, beta) =
        ((&c.alpha as *const f32).cast::<c_void>(), (&c.beta as *const f32).cast::<c_void>());
    let (ws, wsb) = (ptr(c.workspace), c.workspace_bytes);
    let status = match c.dir {
        ConvDirection::Forward => sys::cudnnConvolutionForward(
            h.0,
            alpha,
            d.x.0,
            ptr(c.x),
            d.w.0,
            ptr(c.w),
            d.conv.0,
            fwd_algo(c.algo)?,
            ws,
            wsb,
            beta,
            d.y.0,
            ptr(c.y),
        ),
        ConvDirection::BackwardData => sys::cudnnConvolutionBackwardData(
            h.0,
            alpha,
            d.w.0,
            ptr(c.w),
            d.y.0,
            ptr(c.y),
            d.conv.0,
            bwd_data_algo(c.algo)?,
            ws,
            wsb,
            beta,
            d.x.0,
            ptr(c.x),
        ),
        ConvDirection::BackwardFilter => sys::cudnnConvolutionBackwardFilter(
            h.0,
            alpha,
            d.x.0,
            ptr(c.x),
            d.y.0,
            ptr(c.y),
            d.conv.0,
            bwd_filter_algo(c.algo)?,
            ws,
            wsb,
            beta,
            d.w.0,
            ptr(c.w),
        ),
    };
    check(status, &format!("{name} (algorithm {})", c.algo))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_numbers_round_trip_through_cudnn_enums() {
        for a in 0..8 {
            assert_eq!(fwd_algo(a).unwrap() as u32, a);
        }
        for a in 0..6 {
            assert_eq!(bwd_data_algo(a).unwrap() as u32, a);
        }
        for a in 0..7 {
            assert_eq!(bwd_filter_algo(a).unwrap() as u32, a);
        }
        assert!(fwd_algo(8).is_err());
        assert!(bwd_data_algo(6).is_err());
        assert!(bwd_filter_algo(7).is_err());
    }

    #[test]
    fn math_types_round_trip() {
        for m in [
            MathType::Default,
            MathType::Fma,
            MathType::TensorOp,
            MathType::TensorOpAllowConversion,
        ] {
            assert_eq!(from_math_type(math_type(m)), m);
        }
    }
}
