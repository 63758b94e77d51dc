//! cuDNN through its C API (cudarc's `sys`): one handle on the backend's stream, descriptors
//! that free themselves, convolution forward / backward-data / backward-filter in NHWC, pooling,
//! bias add and bias gradient. Algorithms are chosen once per shape and cached.

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
    /// An fp32 NHWC activation of shape `s`.
    pub fn nhwc(s: Nhwc) -> Result<Tensor> {
        Tensor::new(
            sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC,
            [s.n, s.c, s.h, s.w],
        )
    }
    /// A per-channel vector `[1, C, 1, 1]` (bias).
    pub fn channels(c: usize) -> Result<Tensor> {
        Tensor::new(sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW, [1, c, 1, 1])
    }
    fn new(format: sys::cudnnTensorFormat_t, [n, c, h, w]: [usize; 4]) -> Result<Tensor> {
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
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
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

/// A filter descriptor for PyTorch's OIHW weights.
pub struct Filter(pub sys::cudnnFilterDescriptor_t);

impl Filter {
    pub fn oihw(conv: &Conv2d) -> Result<Filter> {
        let mut d = std::ptr::null_mut();
        // SAFETY: as for Tensor::new.
        unsafe {
            check(
                sys::cudnnCreateFilterDescriptor(&mut d),
                "create filter descriptor",
            )?;
            let f = Filter(d);
            check(
                sys::cudnnSetFilter4dDescriptor(
                    d,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                    sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
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

/// A convolution descriptor: cross-correlation, fp32 compute, no TF32 (`FMA_MATH`), so the
/// result is comparable with the CPU reference at fp32 tolerances.
pub struct Convolution(pub sys::cudnnConvolutionDescriptor_t);

impl Convolution {
    pub fn new(conv: &Conv2d) -> Result<Convolution> {
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
                sys::cudnnSetConvolutionMathType(d, sys::cudnnMathType_t::CUDNN_FMA_MATH),
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

/// Algorithms chosen for one convolution shape.
#[derive(Clone, Copy)]
struct Algos {
    fwd: sys::cudnnConvolutionFwdAlgo_t,
    bwd_data: sys::cudnnConvolutionBwdDataAlgo_t,
    bwd_filter: sys::cudnnConvolutionBwdFilterAlgo_t,
    workspace: usize,
}

/// The cuDNN handle with its algorithm cache. Not thread-safe: the backend keeps it behind a
/// mutex.
pub struct Dnn {
    pub handle: sys::cudnnHandle_t,
    algos: HashMap<(Nhwc, Conv2d), Algos>,
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

const ONE: f32 = 1.0;
const ZERO: f32 = 0.0;

fn one() -> *const c_void {
    (&ONE as *const f32).cast()
}
fn zero() -> *const c_void {
    (&ZERO as *const f32).cast()
}

impl Dnn {
    /// A handle whose work goes to `stream`.
    pub fn new(stream: sys::cudaStream_t) -> Result<Dnn> {
        let mut handle = std::ptr::null_mut();
        // SAFETY: creates a handle and binds it to a live stream of the current context.
        unsafe {
            check(sys::cudnnCreate(&mut handle), "create handle")?;
            let d = Dnn {
                handle,
                algos: HashMap::new(),
            };
            check(sys::cudnnSetStream(handle, stream), "set stream")?;
            Ok(d)
        }
    }

    /// cuDNN's version as MAJOR.MINOR.PATCH.
    pub fn version() -> String {
        // SAFETY: a pure query.
        let v = unsafe { sys::cudnnGetVersion() };
        format!("{}.{}.{}", v / 10000, v % 10000 / 100, v % 100)
    }

    /// The algorithms (and the workspace they need) for convolving `xs` with `conv`: the
    /// fastest that cuDNN's heuristics rank first, chosen once per shape.
    pub fn algos(
        &mut self,
        xs: Nhwc,
        conv: &Conv2d,
    ) -> Result<(
        sys::cudnnConvolutionFwdAlgo_t,
        sys::cudnnConvolutionBwdDataAlgo_t,
        sys::cudnnConvolutionBwdFilterAlgo_t,
        usize,
    )> {
        if let Some(a) = self.algos.get(&(xs, *conv)) {
            return Ok((a.fwd, a.bwd_data, a.bwd_filter, a.workspace));
        }
        let (xd, yd) = (Tensor::nhwc(xs)?, Tensor::nhwc(conv.out_shape(xs))?);
        let (wd, cd) = (Filter::oihw(conv)?, Convolution::new(conv)?);
        let h = self.handle;
        // SAFETY: descriptors are live for the whole block; result arrays are sized as passed.
        let a = unsafe {
            let mut n = 0;
            let mut fwd: [sys::cudnnConvolutionFwdAlgoPerf_t; 8] = std::mem::zeroed();
            check(
                sys::cudnnGetConvolutionForwardAlgorithm_v7(
                    h,
                    xd.0,
                    wd.0,
                    cd.0,
                    yd.0,
                    8,
                    &mut n,
                    fwd.as_mut_ptr(),
                ),
                "choose forward algorithm",
            )?;
            let fwd = fwd[..n as usize]
                .iter()
                .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                .map(|p| p.algo)
                .ok_or_else(|| {
                    anyhow::anyhow!("cuDNN has no forward algorithm for {xs:?} {conv:?}")
                })?;
            let mut bd: [sys::cudnnConvolutionBwdDataAlgoPerf_t; 8] = std::mem::zeroed();
            check(
                sys::cudnnGetConvolutionBackwardDataAlgorithm_v7(
                    h,
                    wd.0,
                    yd.0,
                    cd.0,
                    xd.0,
                    8,
                    &mut n,
                    bd.as_mut_ptr(),
                ),
                "choose backward-data algorithm",
            )?;
            let bwd_data = bd[..n as usize]
                .iter()
                .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                .map(|p| p.algo)
                .ok_or_else(|| {
                    anyhow::anyhow!("cuDNN has no backward-data algorithm for {xs:?} {conv:?}")
                })?;
            let mut bf: [sys::cudnnConvolutionBwdFilterAlgoPerf_t; 8] = std::mem::zeroed();
            check(
                sys::cudnnGetConvolutionBackwardFilterAlgorithm_v7(
                    h,
                    xd.0,
                    yd.0,
                    cd.0,
                    wd.0,
                    8,
                    &mut n,
                    bf.as_mut_ptr(),
                ),
                "choose backward-filter algorithm",
            )?;
            let bwd_filter = bf[..n as usize]
                .iter()
                .find(|p| p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS)
                .map(|p| p.algo)
                .ok_or_else(|| {
                    anyhow::anyhow!("cuDNN has no backward-filter algorithm for {xs:?} {conv:?}")
                })?;
            let (mut s1, mut s2, mut s3) = (0usize, 0usize, 0usize);
            check(
                sys::cudnnGetConvolutionForwardWorkspaceSize(
                    h, xd.0, wd.0, cd.0, yd.0, fwd, &mut s1,
                ),
                "forward workspace size",
            )?;
            check(
                sys::cudnnGetConvolutionBackwardDataWorkspaceSize(
                    h, wd.0, yd.0, cd.0, xd.0, bwd_data, &mut s2,
                ),
                "backward-data workspace size",
            )?;
            check(
                sys::cudnnGetConvolutionBackwardFilterWorkspaceSize(
                    h, xd.0, yd.0, cd.0, wd.0, bwd_filter, &mut s3,
                ),
                "backward-filter workspace size",
            )?;
            Algos {
                fwd,
                bwd_data,
                bwd_filter,
                workspace: s1.max(s2).max(s3),
            }
        };
        self.algos.insert((xs, *conv), a);
        Ok((a.fwd, a.bwd_data, a.bwd_filter, a.workspace))
    }

    /// y = conv(x, w) (overwrites y).
    ///
    /// # Safety
    /// The pointers are live device buffers of the shapes given, on the handle's stream, and
    /// the workspace holds at least [`Dnn::algos`]'s size.
    pub unsafe fn conv_forward(
        &mut self,
        p: &ConvPtrs,
        ws: usize,
        xs: Nhwc,
        conv: &Conv2d,
    ) -> Result<()> {
        let (algo, _, _, _) = self.algos(xs, conv)?;
        let (xd, yd) = (Tensor::nhwc(xs)?, Tensor::nhwc(conv.out_shape(xs))?);
        let (wd, cd) = (Filter::oihw(conv)?, Convolution::new(conv)?);
        check(
            sys::cudnnConvolutionForward(
                self.handle,
                one(),
                xd.0,
                p.x,
                wd.0,
                p.w,
                cd.0,
                algo,
                p.workspace,
                ws,
                zero(),
                yd.0,
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
    ) -> Result<()> {
        let (_, algo, _, _) = self.algos(xs, conv)?;
        let (xd, yd) = (Tensor::nhwc(xs)?, Tensor::nhwc(conv.out_shape(xs))?);
        let (wd, cd) = (Filter::oihw(conv)?, Convolution::new(conv)?);
        check(
            sys::cudnnConvolutionBackwardData(
                self.handle,
                one(),
                wd.0,
                p.w,
                yd.0,
                p.y,
                cd.0,
                algo,
                p.workspace,
                ws,
                zero(),
                xd.0,
                p.x,
            ),
            "convolution backward data",
        )
    }

    /// dw += ∂L/∂w; `p.y` holds dy and `p.w` dw.
    ///
    /// # Safety
    /// As [`Dnn::conv_forward`].
    pub unsafe fn conv_backward_filter(
        &mut self,
        p: &ConvPtrs,
        ws: usize,
        xs: Nhwc,
        conv: &Conv2d,
    ) -> Result<()> {
        let (_, _, algo, _) = self.algos(xs, conv)?;
        let (xd, yd) = (Tensor::nhwc(xs)?, Tensor::nhwc(conv.out_shape(xs))?);
        let (wd, cd) = (Filter::oihw(conv)?, Convolution::new(conv)?);
        check(
            sys::cudnnConvolutionBackwardFilter(
                self.handle,
                one(),
                xd.0,
                p.x,
                yd.0,
                p.y,
                cd.0,
                algo,
                p.workspace,
                ws,
                one(),
                wd.0,
                p.w,
            ),
            "convolution backward filter",
        )
    }

    /// y[p, c] += b[c] over an NHWC tensor.
    ///
    /// # Safety
    /// `b` holds `ys.c` floats and `y` `ys.len()`, on the handle's stream.
    pub unsafe fn add_bias(&mut self, y: *mut c_void, b: *const c_void, ys: Nhwc) -> Result<()> {
        let (bd, yd) = (Tensor::channels(ys.c)?, Tensor::nhwc(ys)?);
        check(
            sys::cudnnAddTensor(self.handle, one(), bd.0, b, one(), yd.0, y),
            "add bias",
        )
    }

    /// db[c] += Σ_pixels dy[p, c].
    ///
    /// # Safety
    /// As [`Dnn::add_bias`].
    pub unsafe fn bias_grad(&mut self, db: *mut c_void, dy: *const c_void, ys: Nhwc) -> Result<()> {
        let (bd, yd) = (Tensor::channels(ys.c)?, Tensor::nhwc(ys)?);
        check(
            sys::cudnnConvolutionBackwardBias(self.handle, one(), yd.0, dy, one(), bd.0, db),
            "bias gradient",
        )
    }

    /// Pooling forward (overwrites y).
    ///
    /// # Safety
    /// Live buffers of the shapes given, on the handle's stream.
    pub unsafe fn pool_forward(
        &mut self,
        pd: &Pooling,
        y: *mut c_void,
        x: *const c_void,
        xs: Nhwc,
        ys: Nhwc,
    ) -> Result<()> {
        let (xd, yd) = (Tensor::nhwc(xs)?, Tensor::nhwc(ys)?);
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
    ) -> Result<()> {
        let (xd, yd) = (Tensor::nhwc(xs)?, Tensor::nhwc(ys)?);
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
