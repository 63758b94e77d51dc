//! cuDNN through its C API (cudarc's `sys`): one handle on the backend's stream, descriptors
//! that free themselves, convolution forward / backward-data / backward-filter in NHWC (fp32,
//! fp16 or bf16 data, fp32 accumulation), pooling and bias add (fp32). Algorithms
//! are measured with `cudnnFind*` once per shape and data type and cached; cuDNN's heuristics
//! are the fallback.

use super::DType;
use crate::backend::{Conv2d, MaxPool2d, Nhwc};
use anyhow::{bail, Result};
use cudarc::cudnn::sys;
use std::collections::HashMap;
use std::ffi::c_void;

/// Turns a cuDNN status into an error naming the call.
pub fn check(status: sys::cudnnStatus_t, what: &str) -> Result<()> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        return Ok(());
    }
    // SAFETY: cudnnGetErrorString returns a static NUL-terminated string for any status.
    let msg = unsafe { std::ffi::CStr::from_ptr(sys::cudnnGetErrorString(status)) };
    bail!("cuDNN {what} failed: {}", msg.to_string_lossy())
}

/// A tensor descriptor (freed on drop).
pub struct Tensor(pub sys::cudnnTensorDescriptor_t);

impl Tensor {
    /// An NHWC activation of shape `s` and element type `dt`.
    pub fn nhwc(s: Nhwc, dt: DType) -> Result<Tensor> {
        Tensor::new(
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
            dt,
            [s.n, s.c, s.h, s.w],
        )
    }
    /// An fp32 per-channel vector `[1, C, 1, 1]` (bias).
    pub fn channels(c: usize) -> Result<Tensor> {
        Tensor::new(
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
            DType::F32,
            [1, c, 1, 1],
        )
    }
    fn new(
        format: sys::cudnnTensorFormat_t,
        dt: DType,
        [n, c, h, w]: [usize; 4],
    ) -> Result<Tensor> {
        let mut d = std::ptr::null_mut();
        // SAFETY: plain descriptor creation and setting; `d` is owned by the returned value.
        unsafe {
            check(
                sys::cudnnCreateTensorDescriptor(&mut d),
                "create tensor descriptor",
            )?;
            let t = Tensor(d);
            check(
                sys::cudnnSetTensor4dDescriptor(
                    d,
                    format,
                    dt.cudnn(),
                    n as i32,
                    c as i32,
                    h as i32,
                    w as i32,
                ),
                "set tensor descriptor",
            )?;
            Ok(t)
        }
    }
}

impl Drop for Tensor {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateTensorDescriptor and dropped once.
        unsafe { sys::cudnnDestroyTensorDescriptor(self.0) };
    }
}

/// A filter descriptor.
pub struct Filter(pub sys::cudnnFilterDescriptor_t);

/// The layout of `conv`'s weight as the convolutions of data type `dt` read it: the fp32 path
/// reads the master weight itself, PyTorch's OIHW (`NCHW` for a filter); mixed precision reads
/// the 16-bit working copy, which `weight_oihw_to_ohwi` writes in OHWI (`NHWC` for a filter,
/// cuDNN's KRSC), the layout its tensor-core kernels for NHWC activations want.
pub fn filter_format(dt: DType) -> sys::cudnnTensorFormat_t {
    match dt {
        DType::F32 => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
        DType::F16 | DType::Bf16 => sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
    }
}

impl Filter {
    /// The weight of `conv` in element type `dt`, in the layout of [`filter_format`].
    pub fn new(conv: &Conv2d, dt: DType) -> Result<Filter> {
        let mut d = std::ptr::null_mut();
        // SAFETY: as for Tensor::new.
        unsafe {
            check(
                sys::cudnnCreateFilterDescriptor(&mut d),
                "create filter descriptor",
            )?;
            let f = Filter(d);
            check(
                // The dimensions are K, C, R, S in either format; the format sets the order in
                // memory.
                sys::cudnnSetFilter4dDescriptor(
                    d,
                    dt.cudnn(),
                    filter_format(dt),
                    conv.cout as i32,
                    conv.cin as i32,
                    conv.k as i32,
                    conv.k as i32,
                ),
                "set filter descriptor",
            )?;
            Ok(f)
        }
    }
}

impl Drop for Filter {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateFilterDescriptor and dropped once.
        unsafe { sys::cudnnDestroyFilterDescriptor(self.0) };
    }
}

/// A convolution descriptor: cross-correlation, fp32 accumulation, and the math type of the
/// algorithm that will run (fp32 data only ever gets `FMA_MATH`: no TF32, so the result is
/// comparable with the CPU reference at fp32 tolerances).
pub struct Convolution(pub sys::cudnnConvolutionDescriptor_t);

impl Convolution {
    pub fn new(conv: &Conv2d, math: sys::cudnnMathType_t) -> Result<Convolution> {
        let mut d = std::ptr::null_mut();
        // SAFETY: as for Tensor::new.
        unsafe {
            check(
                sys::cudnnCreateConvolutionDescriptor(&mut d),
                "create convolution descriptor",
            )?;
            let c = Convolution(d);
            let (p, s) = (conv.pad as i32, conv.stride as i32);
            check(
                sys::cudnnSetConvolution2dDescriptor(
                    d,
                    p,
                    p,
                    s,
                    s,
                    1,
                    1,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                ),
                "set convolution descriptor",
            )?;
            check(
                sys::cudnnSetConvolutionMathType(d, math),
                "set convolution math type",
            )?;
            Ok(c)
        }
    }
}

impl Drop for Convolution {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateConvolutionDescriptor and dropped once.
        unsafe { sys::cudnnDestroyConvolutionDescriptor(self.0) };
    }
}

/// A pooling descriptor.
pub struct Pooling(pub sys::cudnnPoolingDescriptor_t);

impl Pooling {
    /// Max pooling; padding never wins (cuDNN pads with −∞ for max pooling), NaN propagates.
    pub fn max(pool: &MaxPool2d) -> Result<Pooling> {
        Pooling::new(
            sys::cudnnPoolingMode_t::CUDNN_POOLING_MAX_DETERMINISTIC,
            pool.k,
            pool.stride,
            pool.pad,
        )
    }
    /// `avg_pool2d(2)`.
    pub fn avg2() -> Result<Pooling> {
        Pooling::new(
            sys::cudnnPoolingMode_t::CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING,
            2,
            2,
            0,
        )
    }
    fn new(mode: sys::cudnnPoolingMode_t, k: usize, s: usize, p: usize) -> Result<Pooling> {
        let mut d = std::ptr::null_mut();
        // SAFETY: as for Tensor::new.
        unsafe {
            check(
                sys::cudnnCreatePoolingDescriptor(&mut d),
                "create pooling descriptor",
            )?;
            let pd = Pooling(d);
            check(
                sys::cudnnSetPooling2dDescriptor(
                    d,
                    mode,
                    sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                    k as i32,
                    k as i32,
                    p as i32,
                    p as i32,
                    s as i32,
                    s as i32,
                ),
                "set pooling descriptor",
            )?;
            Ok(pd)
        }
    }
}

impl Drop for Pooling {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreatePoolingDescriptor and dropped once.
        unsafe { sys::cudnnDestroyPoolingDescriptor(self.0) };
    }
}

/// What the convolutions of one shape run: per direction the algorithm and its math type.
#[derive(Clone, Copy, Debug)]
pub struct Algos {
    pub fwd: (sys::cudnnConvolutionFwdAlgo_t, sys::cudnnMathType_t),
    pub bwd_data: (sys::cudnnConvolutionBwdDataAlgo_t, sys::cudnnMathType_t),
    pub bwd_filter: (sys::cudnnConvolutionBwdFilterAlgo_t, sys::cudnnMathType_t),
    /// Bytes of workspace the largest of the three needs.
    pub workspace: usize,
    /// Whether `cudnnFind*` measured them (false: cuDNN's heuristics ranked them).
    pub measured: bool,
}

/// The math type of the descriptors an algorithm search runs with: plain FMA for fp32, so that
/// `Find` measures and the heuristics rank what the fp32 path may run (and [`choose`] takes only
/// FMA results, whatever cuDNN returns); tensor-op math for 16-bit data, which has cuDNN consider
/// tensor-core algorithms beside the others, each result reporting the math type it ran in.
fn default_math(dt: DType) -> sys::cudnnMathType_t {
    match dt {
        DType::F32 => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        DType::F16 | DType::Bf16 => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

/// The fields of cuDNN's three `*AlgoPerf_t` result structs that the choice looks at.
trait Perf: Copy {
    type Algo: Copy;
    fn algo(&self) -> Self::Algo;
    fn ok(&self) -> bool;
    fn memory(&self) -> usize;
    fn deterministic(&self) -> bool;
    fn math(&self) -> sys::cudnnMathType_t;
}

macro_rules! perf {
    ($perf:ty, $algo:ty) => {
        impl Perf for $perf {
            type Algo = $algo;
            fn algo(&self) -> $algo {
                self.algo
            }
            fn ok(&self) -> bool {
                self.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
            }
            fn memory(&self) -> usize {
                self.memory
            }
            fn deterministic(&self) -> bool {
                self.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC
            }
            fn math(&self) -> sys::cudnnMathType_t {
                self.mathType
            }
        }
    };
}
perf!(
    sys::cudnnConvolutionFwdAlgoPerf_t,
    sys::cudnnConvolutionFwdAlgo_t
);
perf!(
    sys::cudnnConvolutionBwdDataAlgoPerf_t,
    sys::cudnnConvolutionBwdDataAlgo_t
);
perf!(
    sys::cudnnConvolutionBwdFilterAlgoPerf_t,
    sys::cudnnConvolutionBwdFilterAlgo_t
);

/// The most workspace one algorithm may ask for: the fastest algorithm that needs more is
/// passed over for the next one.
const MAX_WORKSPACE: usize = 1 << 30;

/// Whether a result measured (or ranked) in math type `math` may run on data of type `dt`.
/// The fp32 path (`--no-amp`) is strict fp32: only `CUDNN_FMA_MATH`. Tensor-op math on fp32
/// data is TF32 (10-bit mantissa products) on Ampere and later, and `CUDNN_DEFAULT_MATH` may be
/// too, either of which would put the fp32 path out of reach of the CPU reference's tolerances.
/// 16-bit data runs in whatever math type cuDNN measured.
fn math_allowed(dt: DType, math: sys::cudnnMathType_t) -> bool {
    dt != DType::F32 || math == sys::cudnnMathType_t::CUDNN_FMA_MATH
}

/// The first usable result, in cuDNN's order (fastest first for `Find`, best-ranked first for
/// the heuristics): it succeeded, fits the workspace cap, is deterministic when asked, and ran in
/// a math type allowed for `dt`. Returns the algorithm with the math type cuDNN reported for it,
/// which the calls then set on their descriptors: an algorithm's speed and workspace are those of
/// that math type, and some algorithms exist in one math type only, so running a result in
/// another (e.g. a tensor-op result forced to FMA) runs something that was never measured or
/// may not exist. None when no result qualifies.
fn choose<P: Perf>(
    results: &[P],
    dt: DType,
    deterministic: bool,
) -> Option<(P::Algo, sys::cudnnMathType_t)> {
    results
        .iter()
        .find(|p| {
            p.ok()
                && p.memory() <= MAX_WORKSPACE
                && (!deterministic || p.deterministic())
                && math_allowed(dt, p.math())
        })
        .map(|p| (p.algo(), p.math()))
}

/// Why [`choose`] found nothing for the `what` direction of convolving `xs` with `conv` in `dt`:
/// the convolution's shape and every condition a result had to meet.
fn no_usable_algorithm(
    what: &str,
    xs: Nhwc,
    conv: &Conv2d,
    dt: DType,
    deterministic: bool,
) -> String {
    let mut conditions = vec![format!(
        "succeeded within the {} MiB workspace cap",
        MAX_WORKSPACE >> 20
    )];
    if dt == DType::F32 {
        conditions
            .push("ran in plain fp32 math (CUDNN_FMA_MATH; the fp32 path never uses TF32)".into());
    }
    if deterministic {
        conditions.push("is deterministic (--deterministic)".into());
    }
    format!(
        "cuDNN offers no usable {what} algorithm for the {}x{} convolution {} -> {} channels, stride {}, padding {}, on a {}x{}x{}x{} (NHWC) {dt:?} input: none {}",
        conv.k,
        conv.k,
        conv.cin,
        conv.cout,
        conv.stride,
        conv.pad,
        xs.n,
        xs.h,
        xs.w,
        xs.c,
        conditions.join(", ")
    )
}

/// The cuDNN handle with its algorithm cache. Not thread-safe: the backend keeps it behind a
/// mutex.
pub struct Dnn {
    pub handle: sys::cudnnHandle_t,
    algos: HashMap<(Nhwc, Conv2d, DType), Algos>,
    /// Only algorithms cuDNN reports as deterministic (`--deterministic`).
    deterministic: bool,
}

// SAFETY: a cuDNN handle may be used from any thread as long as calls are not concurrent;
// `Dnn` lives behind a Mutex in the backend, which serialises every use.
unsafe impl Send for Dnn {}

impl Drop for Dnn {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreate and dropped once.
        unsafe { sys::cudnnDestroy(self.handle) };
    }
}

/// Raw device pointers of one convolution call.
pub struct ConvPtrs {
    pub x: *mut c_void,
    pub w: *mut c_void,
    pub y: *mut c_void,
    pub workspace: *mut c_void,
}

// cuDNN's scaling factors are floats for fp32, fp16 and bf16 data alike.
const ONE: f32 = 1.0;
const ZERO: f32 = 0.0;

fn one() -> *const c_void {
    (&ONE as *const f32).cast()
}
fn zero() -> *const c_void {
    (&ZERO as *const f32).cast()
}

/// The descriptors of one convolution: input, output, filter, and the convolution itself
/// with math type `math`.
struct ConvDescs {
    x: Tensor,
    y: Tensor,
    w: Filter,
    conv: Convolution,
}

impl ConvDescs {
    fn new(xs: Nhwc, conv: &Conv2d, dt: DType, math: sys::cudnnMathType_t) -> Result<ConvDescs> {
        Ok(ConvDescs {
            x: Tensor::nhwc(xs, dt)?,
            y: Tensor::nhwc(conv.out_shape(xs), dt)?,
            w: Filter::new(conv, dt)?,
            conv: Convolution::new(conv, math)?,
        })
    }
}

impl Dnn {
    /// A handle whose work goes to `stream`; `deterministic` restricts the convolution
    /// algorithms to those cuDNN reports as deterministic.
    pub fn new(stream: sys::cudaStream_t, deterministic: bool) -> Result<Dnn> {
        let mut handle = std::ptr::null_mut();
        // SAFETY: creates a handle and binds it to a live stream of the current context.
        unsafe {
            check(sys::cudnnCreate(&mut handle), "create handle")?;
            let d = Dnn {
                handle,
                algos: HashMap::new(),
                deterministic,
            };
            check(sys::cudnnSetStream(handle, stream), "set stream")?;
            Ok(d)
        }
    }

    /// The algorithms for convolving `xs` with `conv` in `dt`, chosen on first use of the shape
    /// and cached: measured by `cudnnFind*` (which runs every candidate once, on scratch memory
    /// cuDNN allocates itself), or ranked by the heuristics if measuring fails, and always
    /// under `--deterministic`.
    pub fn algos(&mut self, xs: Nhwc, conv: &Conv2d, dt: DType) -> Result<Algos> {
        if let Some(a) = self.algos.get(&(xs, *conv, dt)) {
            return Ok(*a);
        }
        // Timing decides between algorithms of nearly equal speed by noise, so under
        // --deterministic the heuristics choose: the same choice in every run.
        let a = if self.deterministic {
            self.search(xs, conv, dt, false)?
        } else {
            match self.search(xs, conv, dt, true) {
                Ok(a) => a,
                Err(find) => self.search(xs, conv, dt, false).map_err(|heur| {
                    anyhow::anyhow!("{find:#}; with cuDNN's heuristics instead: {heur:#}")
                })?,
            }
        };
        tracing::debug!(
            ?xs,
            ?conv,
            ?dt,
            measured = a.measured,
            ?a,
            "cuDNN convolution algorithms"
        );
        self.algos.insert((xs, *conv, dt), a);
        Ok(a)
    }

    /// One search: `measure` runs `cudnnFind*`, otherwise `cudnnGet*_v7` (heuristics).
    fn search(&self, xs: Nhwc, conv: &Conv2d, dt: DType, measure: bool) -> Result<Algos> {
        let d = ConvDescs::new(xs, conv, dt, default_math(dt))?;
        let h = self.handle;
        let det = self.deterministic;
        let none = |what: &str| anyhow::anyhow!(no_usable_algorithm(what, xs, conv, dt, det));
        const N: usize = 16;
        // One direction: cuDNN's `Find` (measured) or `Get…_v7` (heuristics), which take the
        // same arguments, then the first usable result.
        macro_rules! search_one {
            ($find:path, $get:path, $perf:ty, ($a:expr, $b:expr, $c:expr, $e:expr), $what:literal) => {{
                let mut results: [$perf; N] = std::mem::zeroed();
                let mut n = 0;
                let status = if measure {
                    $find(h, $a, $b, $c, $e, N as i32, &mut n, results.as_mut_ptr())
                } else {
                    $get(h, $a, $b, $c, $e, N as i32, &mut n, results.as_mut_ptr())
                };
                let verb = if measure { "find" } else { "choose" };
                check(status, &format!("{verb} {} algorithm", $what))?;
                choose(&results[..n as usize], dt, det).ok_or_else(|| none($what))?
            }};
        }
        // SAFETY: descriptors live for the whole block; result arrays hold N entries, the
        // count passed; only the first `n` returned are read.
        unsafe {
            let f = search_one!(
                sys::cudnnFindConvolutionForwardAlgorithm,
                sys::cudnnGetConvolutionForwardAlgorithm_v7,
                sys::cudnnConvolutionFwdAlgoPerf_t,
                (d.x.0, d.w.0, d.conv.0, d.y.0),
                "forward"
            );
            let bd = search_one!(
                sys::cudnnFindConvolutionBackwardDataAlgorithm,
                sys::cudnnGetConvolutionBackwardDataAlgorithm_v7,
                sys::cudnnConvolutionBwdDataAlgoPerf_t,
                (d.w.0, d.y.0, d.conv.0, d.x.0),
                "backward-data"
            );
            let bf = search_one!(
                sys::cudnnFindConvolutionBackwardFilterAlgorithm,
                sys::cudnnGetConvolutionBackwardFilterAlgorithm_v7,
                sys::cudnnConvolutionBwdFilterAlgoPerf_t,
                (d.x.0, d.y.0, d.conv.0, d.w.0),
                "backward-filter"
            );
            // The sizes for the math type each algorithm runs with, as the calls will set it.
            let (mut s1, mut s2, mut s3) = (0usize, 0usize, 0usize);
            let df = ConvDescs::new(xs, conv, dt, f.1)?;
            check(
                sys::cudnnGetConvolutionForwardWorkspaceSize(
                    h, df.x.0, df.w.0, df.conv.0, df.y.0, f.0, &mut s1,
                ),
                "forward workspace size",
            )?;
            let dd = ConvDescs::new(xs, conv, dt, bd.1)?;
            check(
                sys::cudnnGetConvolutionBackwardDataWorkspaceSize(
                    h, dd.w.0, dd.y.0, dd.conv.0, dd.x.0, bd.0, &mut s2,
                ),
                "backward-data workspace size",
            )?;
            let dw = ConvDescs::new(xs, conv, dt, bf.1)?;
            check(
                sys::cudnnGetConvolutionBackwardFilterWorkspaceSize(
                    h, dw.x.0, dw.y.0, dw.conv.0, dw.w.0, bf.0, &mut s3,
                ),
                "backward-filter workspace size",
            )?;
            Ok(Algos {
                fwd: f,
                bwd_data: bd,
                bwd_filter: bf,
                workspace: s1.max(s2).max(s3),
                measured: measure,
            })
        }
    }

    /// y = conv(x, w) (overwrites y).
    ///
    /// # Safety
    /// The pointers are live device buffers of the shapes given, in `dt`, on the handle's
    /// stream, and the workspace holds at least [`Dnn::algos`]'s size.
    pub unsafe fn conv_forward(
        &mut self,
        p: &ConvPtrs,
        ws: usize,
        xs: Nhwc,
        conv: &Conv2d,
        dt: DType,
    ) -> Result<()> {
        let (algo, math) = self.algos(xs, conv, dt)?.fwd;
        let d = ConvDescs::new(xs, conv, dt, math)?;
        check(
            sys::cudnnConvolutionForward(
                self.handle,
                one(),
                d.x.0,
                p.x,
                d.w.0,
                p.w,
                d.conv.0,
                algo,
                p.workspace,
                ws,
                zero(),
                d.y.0,
                p.y,
            ),
            "convolution forward",
        )
    }

    /// dx = conv_transpose(dy, w) (overwrites dx); `p.y` holds dy and `p.x` dx.
    ///
    /// # Safety
    /// As [`Dnn::conv_forward`].
    pub unsafe fn conv_backward_data(
        &mut self,
        p: &ConvPtrs,
        ws: usize,
        xs: Nhwc,
        conv: &Conv2d,
        dt: DType,
    ) -> Result<()> {
        let (algo, math) = self.algos(xs, conv, dt)?.bwd_data;
        let d = ConvDescs::new(xs, conv, dt, math)?;
        check(
            sys::cudnnConvolutionBackwardData(
                self.handle,
                one(),
                d.w.0,
                p.w,
                d.y.0,
                p.y,
                d.conv.0,
                algo,
                p.workspace,
                ws,
                zero(),
                d.x.0,
                p.x,
            ),
            "convolution backward data",
        )
    }

    /// dw = ∂L/∂w, added to dw when `accumulate`, else overwriting it; `p.y` holds dy and
    /// `p.w` dw.
    ///
    /// # Safety
    /// As [`Dnn::conv_forward`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn conv_backward_filter(
        &mut self,
        p: &ConvPtrs,
        ws: usize,
        xs: Nhwc,
        conv: &Conv2d,
        dt: DType,
        accumulate: bool,
    ) -> Result<()> {
        let (algo, math) = self.algos(xs, conv, dt)?.bwd_filter;
        let d = ConvDescs::new(xs, conv, dt, math)?;
        check(
            sys::cudnnConvolutionBackwardFilter(
                self.handle,
                one(),
                d.x.0,
                p.x,
                d.y.0,
                p.y,
                d.conv.0,
                algo,
                p.workspace,
                ws,
                if accumulate { one() } else { zero() },
                d.w.0,
                p.w,
            ),
            "convolution backward filter",
        )
    }

    /// y[p, c] += b[c] over an fp32 NHWC tensor.
    ///
    /// # Safety
    /// `b` holds `ys.c` floats and `y` `ys.len()`, on the handle's stream.
    pub unsafe fn add_bias(&mut self, y: *mut c_void, b: *const c_void, ys: Nhwc) -> Result<()> {
        let (bd, yd) = (Tensor::channels(ys.c)?, Tensor::nhwc(ys, DType::F32)?);
        check(
            sys::cudnnAddTensor(self.handle, one(), bd.0, b, one(), yd.0, y),
            "add bias",
        )
    }

    /// Pooling forward (overwrites y).
    ///
    /// # Safety
    /// Live buffers of the shapes given, in `dt`, on the handle's stream.
    pub unsafe fn pool_forward(
        &mut self,
        pd: &Pooling,
        y: *mut c_void,
        x: *const c_void,
        xs: Nhwc,
        ys: Nhwc,
        dt: DType,
    ) -> Result<()> {
        let (xd, yd) = (Tensor::nhwc(xs, dt)?, Tensor::nhwc(ys, dt)?);
        check(
            sys::cudnnPoolingForward(self.handle, pd.0, one(), xd.0, x, zero(), yd.0, y),
            "pooling forward",
        )
    }

    /// Pooling backward (overwrites dx).
    ///
    /// # Safety
    /// As [`Dnn::pool_forward`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn pool_backward(
        &mut self,
        pd: &Pooling,
        dx: *mut c_void,
        dy: *const c_void,
        x: *const c_void,
        y: *const c_void,
        xs: Nhwc,
        ys: Nhwc,
        dt: DType,
    ) -> Result<()> {
        let (xd, yd) = (Tensor::nhwc(xs, dt)?, Tensor::nhwc(ys, dt)?);
        check(
            sys::cudnnPoolingBackward(
                self.handle,
                pd.0,
                one(),
                yd.0,
                y,
                yd.0,
                dy,
                xd.0,
                x,
                zero(),
                xd.0,
                dx,
            ),
            "pooling backward",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::cudnnConvolutionBwdDataAlgo_t as Data;
    use sys::cudnnConvolutionBwdFilterAlgo_t as Filt;
    use sys::cudnnConvolutionFwdAlgo_t as Fwd;
    use sys::cudnnMathType_t::{
        CUDNN_DEFAULT_MATH as DEFAULT, CUDNN_FMA_MATH as FMA, CUDNN_TENSOR_OP_MATH as TENSOR_OP,
        CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION as CONVERT,
    };

    /// A result as cuDNN reports one: usable unless `status` or `memory` or `determinism` say
    /// otherwise.
    #[derive(Clone, Copy)]
    struct R {
        math: sys::cudnnMathType_t,
        ok: bool,
        memory: usize,
        deterministic: bool,
    }

    const fn r(math: sys::cudnnMathType_t) -> R {
        R {
            math,
            ok: true,
            memory: 1 << 20,
            deterministic: true,
        }
    }

    fn status(ok: bool) -> sys::cudnnStatus_t {
        if ok {
            sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
        } else {
            sys::cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED
        }
    }

    fn determinism(d: bool) -> sys::cudnnDeterminism_t {
        if d {
            sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC
        } else {
            sys::cudnnDeterminism_t::CUDNN_NON_DETERMINISTIC
        }
    }

    /// Forward results: algorithm `algos[i]` described by `rs[i]`, fastest first.
    fn fwd(rs: &[(Fwd, R)]) -> Vec<sys::cudnnConvolutionFwdAlgoPerf_t> {
        rs.iter()
            .enumerate()
            .map(|(i, &(algo, r))| sys::cudnnConvolutionFwdAlgoPerf_t {
                algo,
                status: status(r.ok),
                time: 0.1 * (i + 1) as f32,
                memory: r.memory,
                determinism: determinism(r.deterministic),
                mathType: r.math,
                reserved: [0; 3],
            })
            .collect()
    }

    fn bwd_data(rs: &[(Data, R)]) -> Vec<sys::cudnnConvolutionBwdDataAlgoPerf_t> {
        rs.iter()
            .enumerate()
            .map(|(i, &(algo, r))| sys::cudnnConvolutionBwdDataAlgoPerf_t {
                algo,
                status: status(r.ok),
                time: 0.1 * (i + 1) as f32,
                memory: r.memory,
                determinism: determinism(r.deterministic),
                mathType: r.math,
                reserved: [0; 3],
            })
            .collect()
    }

    fn bwd_filter(rs: &[(Filt, R)]) -> Vec<sys::cudnnConvolutionBwdFilterAlgoPerf_t> {
        rs.iter()
            .enumerate()
            .map(|(i, &(algo, r))| sys::cudnnConvolutionBwdFilterAlgoPerf_t {
                algo,
                status: status(r.ok),
                time: 0.1 * (i + 1) as f32,
                memory: r.memory,
                determinism: determinism(r.deterministic),
                mathType: r.math,
                reserved: [0; 3],
            })
            .collect()
    }

    #[test]
    fn strict_fp32_takes_only_fma_results_and_runs_them_in_fma() {
        let results = fwd(&[
            (
                Fwd::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                r(TENSOR_OP),
            ),
            (
                Fwd::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
                r(DEFAULT),
            ),
            (Fwd::CUDNN_CONVOLUTION_FWD_ALGO_GEMM, r(CONVERT)),
            (Fwd::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, r(FMA)),
        ]);
        assert_eq!(
            choose(&results, DType::F32, false),
            Some((Fwd::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, FMA))
        );
    }

    #[test]
    fn strict_fp32_without_an_fma_result_chooses_nothing() {
        // The fastest result was measured with tensor-op math: the algorithm may exist only
        // there, and in fp32 it would run TF32. It must not be run in FMA, nor at all.
        let results = fwd(&[
            (
                Fwd::CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM,
                r(TENSOR_OP),
            ),
            (Fwd::CUDNN_CONVOLUTION_FWD_ALGO_GEMM, r(DEFAULT)),
        ]);
        assert_eq!(choose(&results, DType::F32, false), None);
        let results = bwd_filter(&[(Filt::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, r(TENSOR_OP))]);
        assert_eq!(choose(&results, DType::F32, false), None);
        let results = bwd_data(&[(Data::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, r(CONVERT))]);
        assert_eq!(choose(&results, DType::F32, true), None);
    }

    #[test]
    fn sixteen_bit_runs_each_result_in_the_math_type_cudnn_reported() {
        let failed = R {
            ok: false,
            ..r(TENSOR_OP)
        };
        let results = bwd_data(&[
            (Data::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, failed),
            (Data::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0, r(FMA)),
            (Data::CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD, r(TENSOR_OP)),
        ]);
        assert_eq!(
            choose(&results, DType::F16, false),
            Some((Data::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0, FMA))
        );
        for math in [TENSOR_OP, CONVERT, DEFAULT] {
            let results = bwd_filter(&[(Filt::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, r(math))]);
            assert_eq!(
                choose(&results, DType::Bf16, false),
                Some((Filt::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, math))
            );
        }
    }

    #[test]
    fn failed_oversized_and_nondeterministic_results_are_passed_over() {
        let results = bwd_filter(&[
            (
                Filt::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
                R {
                    ok: false,
                    ..r(FMA)
                },
            ),
            (
                Filt::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING,
                R {
                    memory: MAX_WORKSPACE + 1,
                    ..r(FMA)
                },
            ),
            (
                Filt::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
                R {
                    deterministic: false,
                    ..r(FMA)
                },
            ),
            (Filt::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, r(FMA)),
        ]);
        assert_eq!(
            choose(&results, DType::F32, false),
            Some((Filt::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0, FMA))
        );
        assert_eq!(
            choose(&results, DType::F32, true),
            Some((Filt::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, FMA))
        );
        assert_eq!(
            choose::<sys::cudnnConvolutionFwdAlgoPerf_t>(&[], DType::F16, false),
            None
        );
    }

    #[test]
    fn the_search_descriptors_carry_the_math_type_the_fp32_path_runs() {
        // What Find/Get measure or rank with must be what runs: for fp32 every chosen result
        // is FMA, the descriptors' own math type during the search.
        assert_eq!(default_math(DType::F32), FMA);
        assert_eq!(default_math(DType::F16), TENSOR_OP);
        assert_eq!(default_math(DType::Bf16), TENSOR_OP);
        for math in [DEFAULT, TENSOR_OP, CONVERT, FMA] {
            let results = fwd(&[(Fwd::CUDNN_CONVOLUTION_FWD_ALGO_DIRECT, r(math))]);
            if let Some((_, m)) = choose(&results, DType::F32, false) {
                assert_eq!(m, default_math(DType::F32));
            }
        }
    }

    #[test]
    fn no_usable_algorithm_names_the_convolution_and_the_conditions() {
        let conv = Conv2d {
            cin: 3,
            cout: 64,
            k: 7,
            stride: 2,
            pad: 1,
        };
        let xs = Nhwc::new(128, 32, 32, 3);
        let msg = no_usable_algorithm("forward", xs, &conv, DType::F32, true);
        for part in [
            "forward",
            "7x7 convolution 3 -> 64 channels, stride 2, padding 1",
            "128x32x32x3 (NHWC) F32 input",
            "CUDNN_FMA_MATH",
            "--deterministic",
        ] {
            assert!(msg.contains(part), "{part:?} missing from: {msg}");
        }
        let msg = no_usable_algorithm("backward-data", xs, &conv, DType::F16, false);
        assert!(
            !msg.contains("FMA") && !msg.contains("deterministic"),
            "{msg}"
        );
    }
}
