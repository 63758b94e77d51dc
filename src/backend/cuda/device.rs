//! The device seam: everything the CUDA backend asks of a GPU, as one narrow interface with two
//! implementations: the real device (cudarc, the NVIDIA driver, cuDNN and cuBLAS; feature
//! `cudnn`) and the emulated one (`--device emu`: the same `cuda/*.cu` kernels compiled for the
//! host, reference convolutions, CUDA's stream and graph semantics, a race and memory checker).
//!
//! The backend's ops, the step driver and the branch scheduler are written against [`Device`]
//! only. Library calls are plain data ([`DnnCall`], [`Gemm`]): every field cuDNN or cuBLAS
//! would be given is here, so the emulation can honour each of them and a recording of a step
//! says exactly what a GPU is sent.
//!
//! Addresses are `u64` device pointers; streams, events and graphs are small handles owned by
//! the device. Work is asynchronous with CUDA's meaning: it is queued on a stream and the host
//! sees its effects only after a synchronization ([`Device::stream_synchronize`],
//! [`Device::synchronize`], or the blocking [`Device::dtoh`]).

use anyhow::Result;

/// The element type of device data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    Bf16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::Bf16 => 2,
        }
    }
    /// The suffix of the kernels instantiated for this type (`relu_forward_f16`).
    pub fn suffix(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::Bf16 => "bf16",
        }
    }
}

/// A stream: work queued on it runs in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Stream(pub u32);

/// An event: marks a point of a stream's work for another stream (or the host) to wait on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Event(pub u32);

/// An instantiated CUDA graph (captured from streams).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Graph(pub u32);

/// One kernel parameter, as `cuLaunchKernel` receives it: a device address (0 for null), a
/// 32-bit `int` or a `float`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum KernelArg {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

/// The geometry of a kernel launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LaunchDims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// Bytes of dynamic shared memory.
    pub shared_bytes: u32,
}

impl LaunchDims {
    /// A 1-D grid of 1-D blocks.
    pub fn linear(grid: u32, block: u32) -> LaunchDims {
        LaunchDims { grid: [grid, 1, 1], block: [block, 1, 1], shared_bytes: 0 }
    }
}

/// The memory order of a 4-D tensor (a filter's `Nchw` is cuDNN's KCRS, `Nhwc` its KRSC).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    Nchw,
    Nhwc,
}

/// A fully packed 4-D tensor, `dims` = [N, C, H, W] whatever its layout (as cuDNN's
/// `cudnnSetTensor4dDescriptor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TensorDesc {
    pub dtype: DType,
    pub layout: Layout,
    pub dims: [usize; 4],
}

impl TensorDesc {
    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn bytes(&self) -> usize {
        self.len() * self.dtype.size()
    }
    /// The element offset of (n, c, h, w).
    pub fn offset(&self, n: usize, c: usize, h: usize, w: usize) -> usize {
        let [_, cc, hh, ww] = self.dims;
        match self.layout {
            Layout::Nchw => ((n * cc + c) * hh + h) * ww + w,
            Layout::Nhwc => ((n * hh + h) * ww + w) * cc + c,
        }
    }
}

/// A convolution filter, `dims` = [K, C, R, S] (output channels, input channels, rows,
/// columns) whatever its layout (as `cudnnSetFilter4dDescriptor`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FilterDesc {
    pub dtype: DType,
    pub layout: Layout,
    pub dims: [usize; 4],
}

impl FilterDesc {
    /// The same memory seen as a tensor: K, C, R, S index like N, C, H, W in either layout.
    pub fn as_tensor(&self) -> TensorDesc {
        TensorDesc { dtype: self.dtype, layout: self.layout, dims: self.dims }
    }
    pub fn len(&self) -> usize {
        self.as_tensor().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn bytes(&self) -> usize {
        self.as_tensor().bytes()
    }
    /// The element offset of (k, c, r, s).
    pub fn offset(&self, k: usize, c: usize, r: usize, s: usize) -> usize {
        self.as_tensor().offset(k, c, r, s)
    }
}

/// cuDNN's math type: which kind of arithmetic an algorithm may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MathType {
    Default,
    /// Plain FMA arithmetic in the compute type (no TF32 for fp32 data).
    Fma,
    /// Tensor cores on 16-bit data.
    TensorOp,
    /// Tensor cores, converting fp32 data down to 16 bits (never used: fp32 stays fp32).
    TensorOpAllowConversion,
}

/// A 2-D cross-correlation (cuDNN's `CUDNN_CROSS_CORRELATION`, PyTorch's Conv2d).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvDesc {
    /// [rows, columns].
    pub pad: [usize; 2],
    pub stride: [usize; 2],
    pub dilation: [usize; 2],
    /// The accumulation type (fp32 on every path).
    pub compute: DType,
    pub math: MathType,
}

/// One convolution's shapes: input `x` [N, C, H, W], filter `w` [K, C, R, S], output `y`
/// [N, K, P, Q]. In a backward call `x` and `y` describe dx and dy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvProblem {
    pub x: TensorDesc,
    pub w: FilterDesc,
    pub y: TensorDesc,
    pub conv: ConvDesc,
}

/// Which of the three convolution computations.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvDirection {
    /// y = alpha·conv(x, w) + beta·y.
    Forward,
    /// dx = alpha·conv_transpose(dy, w) + beta·dx (`x` holds dx, `y` holds dy).
    BackwardData,
    /// dw = alpha·correlate(x, dy) + beta·dw (`w` holds dw, `y` holds dy).
    BackwardFilter,
}

/// One result of an algorithm search (`cudnnFind*` measured, or `cudnnGet*_v7` ranked).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AlgoPerf {
    /// cuDNN's algorithm number for the direction (`cudnnConvolutionFwdAlgo_t` etc.).
    pub algo: u32,
    /// Whether cuDNN could run it (`CUDNN_STATUS_SUCCESS`).
    pub ok: bool,
    /// Measured milliseconds (negative when ranked by heuristics).
    pub time_ms: f32,
    /// Workspace bytes it needs.
    pub memory: usize,
    pub deterministic: bool,
    /// The math type the result was obtained in (and must be run in).
    pub math: MathType,
}

/// A convolution call (`cudnnConvolutionForward`, `…BackwardData`, `…BackwardFilter`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvCall {
    pub dir: ConvDirection,
    pub problem: ConvProblem,
    pub algo: u32,
    /// x (dx for backward data), w (dw for backward filter), y (dy for both backwards).
    pub x: u64,
    pub w: u64,
    pub y: u64,
    pub workspace: u64,
    pub workspace_bytes: usize,
    /// Blending: out = alpha·result + beta·out; beta = 0 ignores the old contents (even NaN).
    pub alpha: f32,
    pub beta: f32,
}

/// `cudnnAddTensor`: c = alpha·a + beta·c, `a` broadcast over each dimension where it is 1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AddTensor {
    pub a: TensorDesc,
    pub a_ptr: u64,
    pub c: TensorDesc,
    pub c_ptr: u64,
    pub alpha: f32,
    pub beta: f32,
}

/// A pooling mode (NaN propagates in both).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PoolMode {
    /// `CUDNN_POOLING_MAX_DETERMINISTIC`: padding never wins; backward sends each gradient to
    /// the first maximum of its window.
    MaxDeterministic,
    /// `CUDNN_POOLING_AVERAGE_COUNT_INCLUDE_PADDING`.
    AverageCountIncludePadding,
}

/// A 2-D pooling window ([rows, columns] each).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PoolDesc {
    pub mode: PoolMode,
    pub window: [usize; 2],
    pub pad: [usize; 2],
    pub stride: [usize; 2],
}

/// `cudnnPoolingForward`: y = alpha·pool(x) + beta·y.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolForward {
    pub pool: PoolDesc,
    pub x: TensorDesc,
    pub x_ptr: u64,
    pub y: TensorDesc,
    pub y_ptr: u64,
    pub alpha: f32,
    pub beta: f32,
}

/// `cudnnPoolingBackward`: dx = alpha·pool_backward(y, dy, x) + beta·dx; `y` and `dy` share
/// the descriptor `y`, `x` and `dx` the descriptor `x`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PoolBackward {
    pub pool: PoolDesc,
    pub y: TensorDesc,
    pub y_ptr: u64,
    pub dy_ptr: u64,
    pub x: TensorDesc,
    pub x_ptr: u64,
    pub dx_ptr: u64,
    pub alpha: f32,
    pub beta: f32,
}

/// A cuDNN call.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DnnCall {
    Conv(ConvCall),
    AddTensor(AddTensor),
    PoolForward(PoolForward),
    PoolBackward(PoolBackward),
}

impl DnnCall {
    /// cuDNN's name of the function.
    pub fn name(&self) -> &'static str {
        match self {
            DnnCall::Conv(c) => match c.dir {
                ConvDirection::Forward => "cudnnConvolutionForward",
                ConvDirection::BackwardData => "cudnnConvolutionBackwardData",
                ConvDirection::BackwardFilter => "cudnnConvolutionBackwardFilter",
            },
            DnnCall::AddTensor(_) => "cudnnAddTensor",
            DnnCall::PoolForward(_) => "cudnnPoolingForward",
            DnnCall::PoolBackward(_) => "cudnnPoolingBackward",
        }
    }
}

/// Whether a GEMM operand is transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transpose {
    N,
    T,
}

/// `cublasSgemm`: C = alpha·op(A)·op(B) + beta·C, all fp32 and column-major, op(A) m×k,
/// op(B) k×n, C m×n, with leading dimensions `lda`, `ldb`, `ldc`. The handle's math mode is
/// the default (no TF32), so the products are plain fp32; beta = 0 ignores C's contents.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub transa: Transpose,
    pub transb: Transpose,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    pub c: u64,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
}

/// What the backend knows of the device it runs on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// E.g. `NVIDIA H200` or `emulated`.
    pub name: String,
    pub compute_capability: (u32, u32),
    pub multiprocessors: u32,
    pub total_memory: usize,
}

/// A GPU, real or emulated. Every method may be called from any thread; calls on one stream
/// are issued in program order by the backend.
pub trait Device: Send + Sync {
    fn info(&self) -> DeviceInfo;
    /// Free and total device memory, if the device can say.
    fn mem_info(&self) -> Option<(usize, usize)>;

    // ---- streams and events
    fn stream_create(&self) -> Result<Stream>;
    fn event_create(&self) -> Result<Event>;
    /// Marks the current end of `stream`'s work.
    fn event_record(&self, event: Event, stream: Stream) -> Result<()>;
    /// Work queued on `stream` from now on waits for `event`'s recorded point.
    fn stream_wait(&self, stream: Stream, event: Event) -> Result<()>;
    /// Whether the work before `event`'s recorded point has finished.
    fn event_query(&self, event: Event) -> Result<bool>;
    /// Waits for the host until `stream`'s queued work is done.
    fn stream_synchronize(&self, stream: Stream) -> Result<()>;
    /// Waits until all queued work on every stream is done.
    fn synchronize(&self) -> Result<()>;

    // ---- memory (stream-ordered, as cuMemAllocAsync / cuMemFreeAsync)
    /// `bytes` of device memory, usable by work queued on `stream` from now on. Its contents
    /// are undefined until written.
    fn alloc(&self, stream: Stream, bytes: usize) -> Result<u64>;
    /// Frees `ptr` once the work queued on `stream` so far is done.
    fn free(&self, stream: Stream, ptr: u64) -> Result<()>;
    fn memset(&self, stream: Stream, ptr: u64, value: u8, bytes: usize) -> Result<()>;
    /// Copies `src` to device memory; `src` may be reused as soon as this returns.
    fn htod(&self, stream: Stream, dst: u64, src: &[u8]) -> Result<()>;
    /// Copies device memory to `dst`, waiting for `stream`'s earlier work (a blocking copy).
    fn dtoh(&self, stream: Stream, dst: &mut [u8], src: u64) -> Result<()>;
    fn dtod(&self, stream: Stream, dst: u64, src: u64, bytes: usize) -> Result<()>;

    // ---- work
    /// Launches kernel `name` of `cuda/*.cu`; a name, arity or argument type that does not
    /// match the kernel's signature is an error.
    fn launch(
        &self, stream: Stream, name: &str, dims: LaunchDims, args: &[KernelArg],
    ) -> Result<()>;
    /// The algorithms cuDNN offers for one direction of a convolution, measured or ranked.
    fn conv_algorithms(
        &self, stream: Stream, problem: &ConvProblem, dir: ConvDirection, measure: bool,
    ) -> Result<Vec<AlgoPerf>>;
    fn dnn(&self, stream: Stream, call: &DnnCall) -> Result<()>;
    fn gemm(&self, stream: Stream, gemm: &Gemm) -> Result<()>;

    /// The CUDA stream behind `stream`, with the device's context made current on this
    /// thread, for libraries that take one (NCCL); `None` on a device without CUDA streams
    /// (the emulated one).
    fn cuda_stream(&self, stream: Stream) -> Result<Option<usize>>;

    // ---- CUDA graphs
    /// Starts capturing `stream` (and every stream that joins it through events) into a graph.
    fn capture_begin(&self, stream: Stream) -> Result<()>;
    /// Ends the capture and instantiates the graph.
    fn capture_end(&self, stream: Stream) -> Result<Graph>;
    /// Abandons a capture that failed, if one is open on `stream`.
    fn capture_abort(&self, stream: Stream);
    fn graph_launch(&self, graph: Graph, stream: Stream) -> Result<()>;
    fn graph_destroy(&self, graph: Graph);

    // ---- profiling
    fn range_push(&self, name: &str);
    fn range_pop(&self);
    /// Starts (`true`) or stops the profiler's collection.
    fn profiler(&self, on: bool) -> Result<()>;

    /// The emulated device, for what only it can do (record a step profile, count what ran).
    fn as_emu(&self) -> Option<&super::emu::EmuDevice> {
        None
    }
}
