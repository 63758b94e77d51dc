//! `Backend<f32>` for [`Gpu`]: each op is a cuDNN or cuBLAS call or a kernel of `cuda/`, in
//! the element type of its activations (fp32, or fp16/bf16 in mixed precision).

use super::device::{
    AddTensor, ConvCall, ConvDirection, DnnCall, Gemm, KernelArg, LaunchDims, MathType,
    PoolBackward, PoolForward, Transpose,
};
use super::{
    alloc_mem, dnn, DType, DevMem, Gpu, GpuBuf, StepGraph, StepState, LOSS_SCALE_BACKOFF,
    LOSS_SCALE_GROWTH, LOSS_SCALE_INTERVAL,
};
use crate::backend::geometry::{self, Reduction};
use crate::backend::{Backend, BatchNormCfg, Conv2d, MaxPool2d, Nhwc, Sgd, SgdParam};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

type Buf = GpuBuf;

use KernelArg::{Ptr as P, F32 as F, I32 as I};

/// Threads per block of the element-wise kernels.
const BLOCK: u32 = 256;

/// The launch of the one-thread bookkeeping kernels (loss scale, step metrics).
const ONE_THREAD: LaunchDims = LaunchDims {
    grid: [1, 1, 1],
    block: [1, 1, 1],
    shared_bytes: 0,
};

/// A grid-stride launch over `n` elements.
fn elementwise(n: usize) -> LaunchDims {
    LaunchDims::linear((n as u32).div_ceil(BLOCK).clamp(1, 4096), BLOCK)
}

/// `name_f32`, `name_f16` or `name_bf16`.
fn typed(name: &str, dt: DType) -> String {
    format!("{name}_{}", dt.suffix())
}

/// Host values → the little-endian bytes of `dt` (round to nearest even, as the kernels).
fn to_bytes(data: &[f32], dt: DType) -> Vec<u8> {
    match dt {
        DType::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => data
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
        DType::Bf16 => data
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
            .collect(),
    }
}

/// The inverse of [`to_bytes`].
fn from_bytes(bytes: &[u8], dt: DType) -> Vec<f32> {
    match dt {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
        DType::Bf16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32())
            .collect(),
    }
}

thread_local! {
    /// The profiler ranges open on this thread (`Backend::range_push`): the innermost names
    /// the layer being run, which an out-of-memory message names in turn.
    static RANGES: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `bytes` as a person reads it: `12845056 bytes (12.2 MiB)`.
fn size(bytes: usize) -> String {
    let b = bytes as f64;
    let (v, unit) = if bytes >= 1 << 30 {
        (b / (1u64 << 30) as f64, "GiB")
    } else if bytes >= 1 << 20 {
        (b / (1u64 << 20) as f64, "MiB")
    } else if bytes >= 1 << 10 {
        (b / 1024.0, "KiB")
    } else {
        return format!("{bytes} bytes");
    };
    format!("{bytes} bytes ({v:.1} {unit})")
}

/// The error of a failed device allocation: what it was for, its size, and the device's free
/// and total memory at that moment (`None` if the driver could not say).
fn oom_message(what: &str, bytes: usize, mem: Option<(usize, usize)>, err: &str) -> String {
    let device = match mem {
        Some((free, total)) => format!("{} free of {}", size(free), size(total)),
        None => "free memory unknown".into(),
    };
    format!(
        "out of GPU memory allocating {what}: {} requested, {device} on the device; use a smaller --batch-size ({err})",
        size(bytes)
    )
}

/// What a buffer of `len` values of `dt` is, for the error if its allocation fails: `kind`, its
/// size, and the layer being run if a profiler range names one.
fn buffer_label(kind: &str, len: usize, dt: DType) -> String {
    let layer = RANGES.with(|r| r.borrow().last().cloned());
    let at = layer.map_or(String::new(), |l| format!(" in {l}"));
    format!("{kind} of {len} {} values{at}", dt.suffix())
}

impl Gpu {
    /// Whether a failure is recorded and not yet reported by `status`. Until it is, no kernel,
    /// library call or copy runs: a failed allocation leaves a buffer without memory, and the
    /// work queued after it would read or write through it.
    fn failed(&self) -> bool {
        self.error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// The raw device address of a buffer, for cuDNN calls and kernel arguments. The backend
    /// orders its streams itself (events at forks and joins), so cudarc records no event. A
    /// buffer whose allocation failed has none: that is recorded (so the work it was for does
    /// not run) and 0 returned.
    fn ptr(&self, b: &Buf) -> u64 {
        if b.mem.is_none() {
            self.record(
                "using a GPU buffer",
                format!(
                    "its allocation ({} {} values) failed earlier",
                    b.len,
                    b.dtype.suffix()
                ),
            );
            return 0;
        }
        b.mem.as_ref().map_or(0, DevMem::ptr)
    }

    /// Whether a copy may touch `bufs`: each has memory (a missing one is recorded) and no
    /// failure is pending.
    fn usable(&self, bufs: &[&Buf]) -> bool {
        for b in bufs {
            self.ptr(b);
        }
        !self.failed()
    }

    /// A zeroed buffer of `len` elements of `dtype` for `what` (see [`buffer_label`]). If the
    /// device is out of memory, or an earlier failure is not reported yet, the buffer has no
    /// memory and the failure is recorded: nothing runs on it.
    fn alloc(&self, what: &str, len: usize, dtype: DType) -> Buf {
        let bytes = len.max(1) * dtype.size();
        if self.failed() {
            return self.without_memory(len, dtype);
        }
        match self.zeroed(bytes) {
            Ok(mem) => self.wrap(mem, len, dtype),
            Err(e) => {
                self.record_oom(what, bytes, e);
                self.without_memory(len, dtype)
            }
        }
    }

    /// `bytes` of zeroed device memory, stream-ordered on the current stream.
    fn zeroed(&self, bytes: usize) -> anyhow::Result<DevMem> {
        let m = alloc_mem(&self.dev, self.cur(), bytes)?;
        self.dev.memset(self.cur(), m.ptr(), 0, m.bytes())?;
        Ok(m)
    }

    /// `data` copied into fresh device memory on the current stream.
    fn uploaded(&self, data: &[u8]) -> anyhow::Result<DevMem> {
        let m = alloc_mem(&self.dev, self.cur(), data.len())?;
        if !data.is_empty() {
            self.dev.htod(self.cur(), m.ptr(), data)?;
        }
        Ok(m)
    }

    /// Records a failed allocation of `bytes` for `what`, with the device's memory.
    fn record_oom(&self, what: &str, bytes: usize, e: impl std::fmt::Display) {
        let msg = oom_message(what, bytes, self.mem_info(), &e.to_string());
        let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(msg);
    }

    /// A buffer of `len` elements of `dtype` for `what` whose contents are undefined until
    /// written: for outputs that are overwritten whole before anything reads them.
    fn uninit(&self, what: &str, len: usize, dtype: DType) -> Buf {
        let bytes = len.max(1) * dtype.size();
        if self.failed() {
            return self.without_memory(len, dtype);
        }
        match alloc_mem(&self.dev, self.cur(), bytes) {
            Ok(mem) => self.wrap(mem, len, dtype),
            Err(e) => {
                self.record_oom(what, bytes, e);
                self.without_memory(len, dtype)
            }
        }
    }

    /// A zeroed fp32 buffer of `len` values, `kind` naming it if it cannot be allocated.
    fn f32_zeros(&self, kind: &str, len: usize) -> Buf {
        self.alloc(&buffer_label(kind, len, DType::F32), len, DType::F32)
    }

    /// The device's free and total memory, if the driver says.
    fn mem_info(&self) -> Option<(usize, usize)> {
        self.dev.mem_info()
    }

    /// A buffer of `len` elements of `dtype` in `mem`.
    fn wrap(&self, mem: DevMem, len: usize, dtype: DType) -> Buf {
        Buf {
            mem: Some(mem),
            len,
            dtype,
            shadow: Mutex::new(None),
            shadow_fresh: AtomicBool::new(false),
            grave: self.graveyard.clone(),
        }
    }

    /// The stand-in for a buffer that could not be allocated: its shape, no memory.
    fn without_memory(&self, len: usize, dtype: DType) -> Buf {
        Buf {
            mem: None,
            len,
            dtype,
            shadow: Mutex::new(None),
            shadow_fresh: AtomicBool::new(false),
            grave: None,
        }
    }

    /// The 16-bit working copy in `dt` of `conv`'s fp32 OIHW weight `w`, in OHWI (cuDNN's KRSC,
    /// see `dnn::filter_format`), remade if `w` changed since; 0 when a failure is recorded (its
    /// allocation or an earlier one), so the caller's work is skipped.
    fn low(&self, w: &Buf, conv: &Conv2d, dt: DType) -> u64 {
        if self.failed() {
            return 0;
        }
        let mut shadow = w.shadow.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = w.len.max(1) * dt.size();
        if shadow.as_ref().is_none_or(|s| s.bytes() != bytes) {
            match alloc_mem(&self.dev, self.cur(), bytes) {
                Ok(s) => *shadow = Some(s),
                Err(e) => {
                    let what = format!("the {} copy of a weight of {} values", dt.suffix(), w.len);
                    self.record_oom(&what, bytes, e);
                    return 0;
                }
            }
            w.shadow_fresh.store(false, Ordering::Release);
        }
        let Some(s) = shadow.as_ref() else {
            return 0;
        };
        let sp = s.ptr();
        if !w.shadow_fresh.load(Ordering::Acquire) {
            let args = [
                P(sp),
                P(self.ptr(w)),
                I(conv.cout as i32),
                I(conv.cin as i32),
                I((conv.k * conv.k) as i32),
            ];
            // Fresh only once the conversion is queued: a skipped one is redone next time.
            let name = typed("weight_oihw_to_ohwi", dt);
            if self.launch(&name, elementwise(w.len), &args) {
                w.shadow_fresh.store(true, Ordering::Release);
            }
        }
        sp
    }

    /// A cuDNN workspace of at least `bytes`, grown (never shrunk) as shapes need.
    fn workspace(&self, bytes: usize) -> anyhow::Result<(u64, usize)> {
        let mut ws = self
            .lane()
            .workspace
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if bytes == 0 {
            return Ok((0, 0));
        }
        if ws.as_ref().is_none_or(|w| w.bytes() < bytes) {
            match alloc_mem(&self.dev, self.cur(), bytes) {
                Ok(b) => *ws = Some(b),
                Err(e) => {
                    self.record_oom("a cuDNN workspace", bytes, e);
                    anyhow::bail!("no cuDNN workspace");
                }
            }
        }
        let ws = ws.as_ref().expect("allocated above");
        Ok((ws.ptr(), ws.bytes()))
    }

    /// Launches kernel `name` with its parameters in order; false (and nothing queued) when a
    /// failure is recorded, before or by the launch.
    fn launch(&self, name: &str, dims: LaunchDims, args: &[KernelArg]) -> bool {
        if self.failed() {
            return false;
        }
        // Each caller passes the kernel's exact parameter list (pointers to live buffers of
        // the sizes the kernel reads, then scalars), as documented in cuda/; the device checks
        // it against the kernel's signature.
        match self.dev.launch(self.cur(), name, dims, args) {
            Ok(()) => true,
            Err(e) => {
                self.record(&format!("launching {name}"), e);
                false
            }
        }
    }

    /// Queues a cuDNN call, unless a failure is recorded (see [`Gpu::failed`]).
    fn dnn_call(&self, what: &str, call: DnnCall) {
        if self.failed() {
            return;
        }
        if let Err(e) = self.dev.dnn(self.cur(), &call) {
            self.record(what, e);
        }
    }

    /// The algorithms of convolving `xs` with `conv` in `dt`, chosen once per shape.
    fn algos(&self, xs: Nhwc, conv: &Conv2d, dt: DType) -> anyhow::Result<dnn::Algos> {
        let mut cache = self.algos.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = cache.get(&(xs, *conv, dt)) {
            return Ok(*a);
        }
        let a = dnn::algos(
            &*self.dev,
            self.cur(),
            xs,
            conv,
            dt,
            self.opts.deterministic,
        )?;
        tracing::debug!(
            ?xs,
            ?conv,
            ?dt,
            measured = a.measured,
            ?a,
            "cuDNN convolution algorithms"
        );
        cache.insert((xs, *conv, dt), a);
        Ok(a)
    }

    /// One convolution of direction `dir` on `(x, w, y)` (dx, dw or dy in the backward
    /// directions, as [`ConvCall`] says), with `beta` blending into the output.
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &self,
        what: &str,
        dir: ConvDirection,
        (x, w, y): (u64, u64, u64),
        xs: Nhwc,
        conv: &Conv2d,
        dt: DType,
        beta: f32,
    ) {
        if self.failed() {
            return;
        }
        let run = || -> anyhow::Result<()> {
            let a = self.algos(xs, conv, dt)?;
            let (algo, math): (u32, MathType) = match dir {
                ConvDirection::Forward => a.fwd,
                ConvDirection::BackwardData => a.bwd_data,
                ConvDirection::BackwardFilter => a.bwd_filter,
            };
            let (workspace, workspace_bytes) = self.workspace(a.workspace)?;
            let call = ConvCall {
                dir,
                problem: dnn::problem(xs, conv, dt, math),
                algo,
                x,
                w,
                y,
                workspace,
                workspace_bytes,
                alpha: 1.0,
                beta,
            };
            self.dev.dnn(self.cur(), &DnnCall::Conv(call))
        };
        if let Err(e) = run() {
            self.record(what, e);
        }
    }

    /// Column-major fp32 `C = A·B (+ C when beta = 1)` through cuBLAS (no TF32: the handle
    /// keeps cuBLAS's default math mode).
    #[allow(clippy::too_many_arguments)]
    fn sgemm(
        &self,
        what: &str,
        (transa, transb): (Transpose, Transpose),
        (m, n, k): (usize, usize, usize),
        a: u64,
        lda: usize,
        b: u64,
        ldb: usize,
        beta: f32,
        c: u64,
        ldc: usize,
    ) {
        if self.failed() {
            return;
        }
        let g = Gemm {
            transa,
            transb,
            m,
            n,
            k,
            a,
            lda,
            b,
            ldb,
            c,
            ldc,
            alpha: 1.0,
            beta,
        };
        if let Err(e) = self.dev.gemm(self.cur(), &g) {
            self.record(&format!("{what} (cuBLAS)"), e);
        }
    }

    /// An fp32 view of `x`: `x` itself, or a converted copy (kept alive by the returned
    /// buffer) for a 16-bit activation.
    fn as_f32(&self, x: &Buf) -> (u64, Option<Buf>) {
        if x.dtype == DType::F32 {
            return (self.ptr(x), None);
        }
        let copy = self.alloc(
            &buffer_label("an fp32 copy of the linear head's input", x.len, DType::F32),
            x.len,
            DType::F32,
        );
        let args = [P(self.ptr(&copy)), P(self.ptr(x)), I(x.len as i32)];
        self.launch(&typed("convert_to_f32", x.dtype), elementwise(x.len), &args);
        (self.ptr(&copy), Some(copy))
    }

    /// cuBLAS's handle works on the main stream (its workspace is set for that stream, which
    /// graph capture needs): the linear head must not be inside a branch.
    fn expect_main(&self, what: &str) -> bool {
        if self.current.load(Ordering::Relaxed) != 0 {
            self.record(what, "cuBLAS called from a branch stream");
            return false;
        }
        true
    }

    /// Logits and the softmax buffer are fp32 on every path; anything else is a bug in the
    /// caller, reported rather than computed wrongly.
    fn expect_f32(&self, what: &str, b: &Buf) -> bool {
        if b.dtype != DType::F32 {
            self.record(what, format!("expected an fp32 buffer, got {:?}", b.dtype));
            return false;
        }
        true
    }
}

impl Backend<f32> for Gpu {
    type Buf = Buf;

    fn zeros(&self, len: usize) -> Buf {
        self.f32_zeros("a tensor", len)
    }

    fn act_zeros(&self, len: usize) -> Buf {
        let dt = self.opts.activations;
        self.alloc(&buffer_label("an activation", len, dt), len, dt)
    }

    fn upload(&self, data: &[f32]) -> Buf {
        self.upload_as(data, DType::F32)
    }

    fn upload_act(&self, data: &[f32]) -> Buf {
        self.upload_as(data, self.opts.activations)
    }

    fn download(&self, buf: &Buf) -> Vec<f32> {
        // Nothing is read after a failure: the values would be those of work that did not run.
        if !self.usable(&[buf]) {
            return vec![f32::NAN; buf.len];
        }
        // On the main stream, which has joined every branch stream by the time anything is
        // read back.
        let mut bytes = vec![0u8; buf.len * buf.dtype.size()];
        match self.dev.dtoh(self.stream(), &mut bytes, self.ptr(buf)) {
            Ok(()) => from_bytes(&bytes, buf.dtype),
            Err(e) => {
                self.record("copying from the GPU", e);
                vec![f32::NAN; buf.len]
            }
        }
    }

    fn fill_zero(&self, buf: &mut Buf) {
        if !self.usable(&[buf]) {
            return;
        }
        if let Err(e) = self
            .dev
            .memset(self.cur(), self.ptr(buf), 0, buf.len * buf.dtype.size())
        {
            self.record("memset", e);
        }
    }

    fn status(&self) -> anyhow::Result<()> {
        // The network checks the status after every forward and backward: a point where every
        // branch stream has been joined, so the memory dropped so far can be freed.
        self.settle();
        self.take_error()
    }

    fn issues_from_one_thread(&self) -> bool {
        // `branch` sets the stream of the ops that follow: one issuing thread, in order.
        true
    }

    fn branches_begin(&self, n: usize) {
        if self.lanes.len() == 1 {
            return;
        }
        let main = &self.lanes[0];
        if let Err(e) = self.dev.event_record(main.event, main.stream) {
            return self.record("recording a CUDA event", e);
        }
        for i in 0..n.min(self.lanes.len() - 1) {
            if let Err(e) = self.wait(self.lanes[self.branch_lane(i)].stream, main.event) {
                return self.record("ordering CUDA streams", e);
            }
        }
    }

    fn branch(&self, i: Option<usize>) {
        let lane = i.map_or(0, |i| self.branch_lane(i));
        self.current.store(lane, Ordering::Relaxed);
    }

    fn branches_end(&self, n: usize) {
        if self.lanes.len() == 1 {
            return;
        }
        let main = &self.lanes[0];
        for i in 0..n.min(self.lanes.len() - 1) {
            let lane = &self.lanes[self.branch_lane(i)];
            if let Err(e) = self.dev.event_record(lane.event, lane.stream) {
                return self.record("recording a CUDA event", e);
            }
            if let Err(e) = self.wait(main.stream, lane.event) {
                return self.record("ordering CUDA streams", e);
            }
        }
    }

    fn range_push(&self, name: &str) {
        RANGES.with(|r| r.borrow_mut().push(name.to_string()));
        self.dev.range_push(name);
    }

    fn profiler(&self, on: bool) -> anyhow::Result<()> {
        // The device waits for everything queued before the range, which belongs outside it.
        self.dev.profiler(on)
    }

    fn range_pop(&self) {
        RANGES.with(|r| r.borrow_mut().pop());
        self.dev.range_pop();
    }

    fn restore_loss_scale(&mut self, scale: f64) -> anyhow::Result<()> {
        if self.loss_scale.is_none() {
            return Ok(());
        }
        self.set_loss_scale(scale as f32)
    }

    fn loss_scale(&self) -> anyhow::Result<Option<(f64, u64)>> {
        Ok(self.read_loss_scale()?.map(|(s, k)| (s as f64, k)))
    }

    fn conv2d_forward(&self, y: &mut Buf, x: &Buf, w: &Buf, b: &Buf, xs: Nhwc, conv: &Conv2d) {
        let dt = x.dtype;
        let ys = conv.out_shape(xs);
        let wp = if dt == DType::F32 {
            self.ptr(w)
        } else {
            self.low(w, conv, dt)
        };
        let (xp, yp, bp) = (self.ptr(x), self.ptr(y), self.ptr(b));
        self.conv(
            "conv2d_forward",
            ConvDirection::Forward,
            (xp, wp, yp),
            xs,
            conv,
            dt,
            0.0,
        );
        if dt == DType::F32 {
            let add = AddTensor {
                a: dnn::channels(ys.c),
                a_ptr: bp,
                c: dnn::nhwc(ys, dt),
                c_ptr: yp,
                alpha: 1.0,
                beta: 1.0,
            };
            self.dnn_call("conv2d_forward bias", DnnCall::AddTensor(add));
        } else {
            // cuDNN's bias add wants the bias in the data type; ours stays fp32.
            let args = [P(yp), P(bp), I(ys.pixels() as i32), I(ys.c as i32)];
            self.launch(&typed("bias_add", dt), self.strided(ys.len()), &args);
        }
    }

    fn conv2d_backward(
        &self,
        dx: Option<&mut Buf>,
        dw: &mut Buf,
        db: &mut Buf,
        dy: &Buf,
        x: &Buf,
        w: &Buf,
        xs: Nhwc,
        conv: &Conv2d,
    ) {
        let dt = dy.dtype;
        let ys = conv.out_shape(xs);
        let dx_ptr = dx.map(|d| self.ptr(d));
        let (xp, dyp) = (self.ptr(x), self.ptr(dy));
        self.bias_grad(db, dy, ys);
        if dt == DType::F32 {
            // The fp32 weight gradient accumulates in place (beta = 1).
            let filter = (xp, self.ptr(dw), dyp);
            self.conv(
                "conv2d_backward filter",
                ConvDirection::BackwardFilter,
                filter,
                xs,
                conv,
                dt,
                1.0,
            );
            if let Some(dxp) = dx_ptr {
                let data = (dxp, self.ptr(w), dyp);
                self.conv(
                    "conv2d_backward data",
                    ConvDirection::BackwardData,
                    data,
                    xs,
                    conv,
                    dt,
                    0.0,
                );
            }
            return;
        }
        // Mixed precision: the weight gradient comes out of cuDNN in the data type (and the
        // filter layout) of the working copy and is added to the fp32 one (the bias gradient
        // above is reduced straight into fp32). cuDNN overwrites it (beta = 0), so it needs no
        // zeroing.
        let what = buffer_label("a 16-bit weight gradient", conv.weight_len(), dt);
        let dw_low = self.uninit(&what, conv.weight_len(), dt);
        let dw_lowp = self.ptr(&dw_low);
        let filter = (xp, dw_lowp, dyp);
        self.conv(
            "conv2d_backward filter",
            ConvDirection::BackwardFilter,
            filter,
            xs,
            conv,
            dt,
            0.0,
        );
        if let Some(dxp) = dx_ptr {
            let data = (dxp, self.low(w, conv, dt), dyp);
            self.conv(
                "conv2d_backward data",
                ConvDirection::BackwardData,
                data,
                xs,
                conv,
                dt,
                0.0,
            );
        }
        // cuDNN wrote the gradient in the filter layout of the 16-bit path (OHWI); the fp32
        // gradient keeps the master weight's OIHW.
        let args = [
            P(self.ptr(dw)),
            P(dw_lowp),
            I(conv.cout as i32),
            I(conv.cin as i32),
            I((conv.k * conv.k) as i32),
        ];
        let name = typed("add_ohwi_to_oihw", dt);
        self.launch(&name, elementwise(dw.len), &args);
    }

    fn batch_norm_forward_train(
        &self,
        y: &mut Buf,
        mean: &mut Buf,
        invstd: &mut Buf,
        running_mean: &mut Buf,
        running_var: &mut Buf,
        x: &Buf,
        gamma: &Buf,
        beta: &Buf,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) -> anyhow::Result<()> {
        let stats = (mean, invstd, running_mean, running_var);
        self.bn_train(y, stats, (x, gamma, beta), xs, cfg, false)
    }

    fn batch_norm_forward_eval(
        &self,
        y: &mut Buf,
        x: &Buf,
        gamma: &Buf,
        beta: &Buf,
        running_mean: &Buf,
        running_var: &Buf,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) {
        self.bn_eval(
            y,
            (x, gamma, beta),
            (running_mean, running_var),
            xs,
            cfg,
            false,
        );
    }

    fn batch_norm_backward(
        &self,
        dx: &mut Buf,
        dgamma: &mut Buf,
        dbeta: &mut Buf,
        dy: &Buf,
        x: &Buf,
        gamma: &Buf,
        mean: &Buf,
        invstd: &Buf,
        xs: Nhwc,
    ) {
        self.bn_backward(dx, dgamma, dbeta, dy, None, x, gamma, mean, invstd, xs);
    }

    fn batch_norm_relu_forward_train(
        &self,
        y: &mut Buf,
        mean: &mut Buf,
        invstd: &mut Buf,
        running_mean: &mut Buf,
        running_var: &mut Buf,
        x: &Buf,
        gamma: &Buf,
        beta: &Buf,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) -> anyhow::Result<()> {
        let stats = (mean, invstd, running_mean, running_var);
        self.bn_train(y, stats, (x, gamma, beta), xs, cfg, true)
    }

    fn batch_norm_relu_forward_eval(
        &self,
        y: &mut Buf,
        x: &Buf,
        gamma: &Buf,
        beta: &Buf,
        running_mean: &Buf,
        running_var: &Buf,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) {
        self.bn_eval(
            y,
            (x, gamma, beta),
            (running_mean, running_var),
            xs,
            cfg,
            true,
        );
    }

    fn batch_norm_relu_backward(
        &self,
        dx: &mut Buf,
        dgamma: &mut Buf,
        dbeta: &mut Buf,
        dy: &mut Buf,
        y: &Buf,
        x: &Buf,
        gamma: &Buf,
        mean: &Buf,
        invstd: &Buf,
        xs: Nhwc,
    ) {
        self.bn_backward(dx, dgamma, dbeta, dy, Some(y), x, gamma, mean, invstd, xs);
    }

    fn relu_forward(&self, y: &mut Buf, x: &Buf) {
        let args = [P(self.ptr(y)), P(self.ptr(x)), I(x.len as i32)];
        self.launch(&typed("relu_forward", x.dtype), elementwise(x.len), &args);
    }

    fn relu_backward(&self, dy: &mut Buf, y: &Buf) {
        let args = [P(self.ptr(dy)), P(self.ptr(y)), I(y.len as i32)];
        self.launch(&typed("relu_backward", y.dtype), elementwise(y.len), &args);
    }

    fn max_pool2d_forward(&self, y: &mut Buf, x: &Buf, xs: Nhwc, pool: &MaxPool2d) {
        let dt = x.dtype;
        let call = PoolForward {
            pool: dnn::max_pool(pool),
            x: dnn::nhwc(xs, dt),
            x_ptr: self.ptr(x),
            y: dnn::nhwc(pool.out_shape(xs), dt),
            y_ptr: self.ptr(y),
            alpha: 1.0,
            beta: 0.0,
        };
        self.dnn_call("max_pool2d_forward", DnnCall::PoolForward(call));
    }

    fn max_pool2d_backward(
        &self,
        dx: &mut Buf,
        dy: &Buf,
        x: &Buf,
        y: &Buf,
        xs: Nhwc,
        pool: &MaxPool2d,
    ) {
        let dt = x.dtype;
        // The forward's real x and y: cuDNN finds the maximum of each window from them.
        let call = PoolBackward {
            pool: dnn::max_pool(pool),
            y: dnn::nhwc(pool.out_shape(xs), dt),
            y_ptr: self.ptr(y),
            dy_ptr: self.ptr(dy),
            x: dnn::nhwc(xs, dt),
            x_ptr: self.ptr(x),
            dx_ptr: self.ptr(dx),
            alpha: 1.0,
            beta: 0.0,
        };
        self.dnn_call("max_pool2d_backward", DnnCall::PoolBackward(call));
    }

    fn fork_backward(&self, dx: &mut Buf, parts: &[&Buf]) {
        // The kernel sums up to four parts in order; more are folded in four at a time.
        let n = dx.len as i32;
        let name = typed("fork_backward", dx.dtype);
        let dxp = self.ptr(dx);
        let mut first = true;
        for chunk in parts.chunks(4) {
            let mut p = [0u64; 4];
            for (slot, part) in p.iter_mut().zip(chunk) {
                *slot = self.ptr(part);
            }
            if !first {
                // dx = dx + next parts: dx itself is the first summand.
                p.rotate_right(1);
                p[0] = dxp;
                if chunk.len() == 4 {
                    self.record("fork_backward", "more than 7 branches");
                }
            }
            first = false;
            let args = [P(dxp), P(p[0]), P(p[1]), P(p[2]), P(p[3]), I(n)];
            self.launch(&name, elementwise(dx.len), &args);
        }
    }

    fn concat_forward(&self, y: &mut Buf, parts: &[&Buf], channels: &[usize]) {
        self.concat(y, parts, channels);
    }

    fn concat_backward(&self, dparts: &mut [&mut Buf], dy: &Buf, channels: &[usize]) {
        self.split(dparts, dy, channels);
    }

    fn avg_pool2d_forward(&self, y: &mut Buf, x: &Buf, xs: Nhwc) {
        let ys = Nhwc::new(xs.n, xs.h / 2, xs.w / 2, xs.c);
        let dt = x.dtype;
        let call = PoolForward {
            pool: dnn::avg_pool2(),
            x: dnn::nhwc(xs, dt),
            x_ptr: self.ptr(x),
            y: dnn::nhwc(ys, dt),
            y_ptr: self.ptr(y),
            alpha: 1.0,
            beta: 0.0,
        };
        self.dnn_call("avg_pool2d_forward", DnnCall::PoolForward(call));
    }

    fn avg_pool2d_backward(&self, dx: &mut Buf, dy: &Buf, xs: Nhwc) {
        // A kernel of ours rather than cudnnPoolingBackward, which wants the forward's x and y
        // (that average pooling never reads) and does not allow dx or dy in their place.
        let args = [
            P(self.ptr(dx)),
            P(self.ptr(dy)),
            I(xs.n as i32),
            I(xs.h as i32),
            I(xs.w as i32),
            I(xs.c as i32),
        ];
        self.launch(
            &typed("avg_pool2d_backward", dy.dtype),
            elementwise(xs.len()),
            &args,
        );
    }

    fn linear_forward(
        &self,
        y: &mut Buf,
        x: &Buf,
        w: &Buf,
        b: &Buf,
        n: usize,
        fin: usize,
        fout: usize,
    ) {
        // The head is tiny ([N, 256]·[256, 10]) and produces the logits, so it runs in fp32 on
        // every path: a 16-bit input is widened first.
        if !self.expect_f32("linear_forward output", y) || !self.expect_main("linear_forward") {
            return;
        }
        let (xp, _x32) = self.as_f32(x);
        // Row-major y[n, out] = x[n, in]·wᵀ is column-major yᵀ[out, n] = w(in×out)ᵀ · xᵀ(in×n).
        self.sgemm(
            "linear_forward",
            (Transpose::T, Transpose::N),
            (fout, n, fin),
            self.ptr(w),
            fin,
            xp,
            fin,
            0.0,
            self.ptr(y),
            fout,
        );
        let add = AddTensor {
            a: dnn::channels(fout),
            a_ptr: self.ptr(b),
            c: dnn::nhwc(Nhwc::new(n, 1, 1, fout), DType::F32),
            c_ptr: self.ptr(y),
            alpha: 1.0,
            beta: 1.0,
        };
        self.dnn_call("linear_forward bias", DnnCall::AddTensor(add));
    }

    fn linear_backward(
        &self,
        dx: Option<&mut Buf>,
        dw: &mut Buf,
        db: &mut Buf,
        dy: &Buf,
        x: &Buf,
        w: &Buf,
        n: usize,
        fin: usize,
        fout: usize,
    ) {
        if !self.expect_f32("linear_backward gradient", dy) || !self.expect_main("linear_backward")
        {
            return;
        }
        let (xp, _x32) = self.as_f32(x);
        // dw[out, in] += dyᵀ·x  ⇔  column-major dwᵀ(in×out) += xᵀ(in×n) · dy(n×out).
        self.sgemm(
            "linear_backward dw",
            (Transpose::N, Transpose::T),
            (fin, fout, n),
            xp,
            fin,
            self.ptr(dy),
            fout,
            1.0,
            self.ptr(dw),
            fin,
        );
        if let Some(dx) = dx {
            // dx[n, in] = dy·w  ⇔  column-major dxᵀ(in×n) = wᵀ(in×out) · dyᵀ(out×n), in fp32,
            // then narrowed to the activation type.
            let dx32 = (dx.dtype != DType::F32).then(|| {
                let what = buffer_label(
                    "the fp32 input gradient of the linear head",
                    dx.len,
                    DType::F32,
                );
                self.alloc(&what, dx.len, DType::F32)
            });
            let target = dx32.as_ref().map_or(self.ptr(dx), |b| self.ptr(b));
            self.sgemm(
                "linear_backward dx",
                (Transpose::N, Transpose::N),
                (fin, n, fout),
                self.ptr(w),
                fin,
                self.ptr(dy),
                fout,
                0.0,
                target,
                fin,
            );
            if let Some(dx32) = &dx32 {
                let args = [P(self.ptr(dx)), P(self.ptr(dx32)), I(dx.len as i32)];
                self.launch(
                    &typed("convert_from_f32", dx.dtype),
                    elementwise(dx.len),
                    &args,
                );
            }
        }
        self.bias_grad(db, dy, Nhwc::new(n, 1, 1, fout));
    }

    fn cross_entropy_forward(
        &self,
        probs: &mut Buf,
        logits: &Buf,
        labels: &[u32],
        k: usize,
        smoothing: f64,
    ) -> f64 {
        if !self.expect_f32("cross_entropy_forward logits", logits)
            || !self.expect_f32("cross_entropy_forward softmax", probs)
        {
            return f64::NAN;
        }
        self.cross_entropy(probs, logits, labels, k, smoothing)
    }

    fn cross_entropy_backward(
        &self,
        dlogits: &mut Buf,
        probs: &Buf,
        _labels: &[u32],
        _k: usize,
        _smoothing: f64,
    ) {
        // The forward kernel already wrote (softmax − target)/N (× the loss scale in mixed
        // precision) into `probs`.
        if !self.usable(&[probs, dlogits]) {
            return;
        }
        let bytes = probs.len * probs.dtype.size();
        if let Err(e) = self
            .dev
            .dtod(self.cur(), self.ptr(dlogits), self.ptr(probs), bytes)
        {
            self.record("cross_entropy_backward copy", e);
        }
    }

    fn sgd_step_all(&self, params: &mut [SgdParam<'_, Buf>], first_step: bool, opt: &Sgd) {
        match &self.loss_scale {
            None => {
                for p in params.iter_mut() {
                    self.sgd(p.value, p.grad, p.momentum, first_step, opt, 0);
                }
            }
            Some(ls) => {
                let (scale, found_inf) = (ls.scale.ptr(), ls.found_inf.ptr());
                // Every gradient is unscaled and checked before any parameter moves, so an
                // overflow anywhere skips the whole step (on the device, without a sync).
                for p in params.iter_mut() {
                    let g = self.ptr(p.grad);
                    let args = [P(g), P(g), I(p.grad.len as i32), P(scale), P(found_inf)];
                    self.launch("amp_unscale_f32", self.strided(p.grad.len), &args);
                }
                for p in params.iter_mut() {
                    self.sgd(p.value, p.grad, p.momentum, first_step, opt, found_inf);
                }
                let (growth, skipped) = (ls.growth.ptr(), ls.skipped.ptr());
                let args = [
                    P(scale),
                    P(growth),
                    P(found_inf),
                    P(skipped),
                    F(LOSS_SCALE_GROWTH),
                    F(LOSS_SCALE_BACKOFF),
                    I(LOSS_SCALE_INTERVAL),
                ];
                self.launch("update_loss_scale", ONE_THREAD, &args);
            }
        }
        for p in params.iter() {
            p.value.shadow_fresh.store(false, Ordering::Release);
        }
    }

    fn sgd_step(
        &self,
        param: &mut Buf,
        grad: &Buf,
        momentum_buf: &mut Buf,
        first_step: bool,
        opt: &Sgd,
    ) {
        self.sgd(param, grad, momentum_buf, first_step, opt, 0);
        param.shadow_fresh.store(false, Ordering::Release);
    }
}

/// A CIFAR-10 split resident in device memory (the uint8 records, as in the files), with the
/// normalisation constants: what `augment_batch` builds training batches from.
pub struct DeviceRecords {
    bytes: DevMem,
    records: usize,
    /// MEAN then STD, 3 floats each.
    norm: DevMem,
}

impl DeviceRecords {
    pub fn len(&self) -> usize {
        self.records
    }
    pub fn is_empty(&self) -> bool {
        self.records == 0
    }
}

impl Gpu {
    /// Copies the records of `set` to the device, once (about 150 MB for the training split).
    pub fn upload_records(&self, set: &crate::data::Cifar10) -> anyhow::Result<DeviceRecords> {
        use crate::data::{MEAN, RECORD, STD};
        // A failure still unreported comes first; nothing is copied after it.
        self.take_error()?;
        let total: usize = set.record_chunks().map(|c| c.len()).sum();
        let err = |e| {
            anyhow::anyhow!(
                "copying the training set to the GPU ({} MB): {e}",
                total >> 20
            )
        };
        let bytes = match alloc_mem(&self.dev, self.cur(), total) {
            Ok(b) => b,
            Err(e) => {
                let what = format!("the training set ({} records)", total / RECORD);
                let msg = oom_message(&what, total.max(1), self.mem_info(), &e.to_string());
                anyhow::bail!(msg);
            }
        };
        let mut at = 0;
        for chunk in set.record_chunks() {
            self.dev
                .htod(self.cur(), bytes.ptr() + at as u64, chunk)
                .map_err(err)?;
            at += chunk.len();
        }
        let norm: Vec<u8> = MEAN
            .iter()
            .chain(STD.iter())
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let norm = self.uploaded(&norm).map_err(err)?;
        Ok(DeviceRecords {
            bytes,
            records: total / RECORD,
            norm,
        })
    }

    /// Renders the training batch of records `indices`, image `j` cropped by `views[j].0/1`
    /// (dy, dx in −4..=4) and mirrored when `views[j].2`, normalised, into an activation
    /// buffer (NHWC, the activation type): `make_batch` on the device (`cuda/data.cu`).
    pub fn augment_batch(
        &self,
        records: &DeviceRecords,
        indices: &[usize],
        views: &[(i32, i32, bool)],
    ) -> Buf {
        let b = indices.len();
        let out = self.act_zeros(b * 3072);
        if b == 0 || views.len() != b {
            self.record(
                "augment_batch",
                format!("{b} images but {} crop/flip draws", views.len()),
            );
            return out;
        }
        // One small copy per step: indices, dy, dx, flip.
        let mut params = Vec::with_capacity(4 * b);
        params.extend(indices.iter().map(|&i| i as i32));
        params.extend(views.iter().map(|v| v.0));
        params.extend(views.iter().map(|v| v.1));
        params.extend(views.iter().map(|v| v.2 as i32));
        if self.failed() {
            return out;
        }
        let bytes: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
        let params = match self.uploaded(&bytes) {
            Ok(p) => p,
            Err(e) => {
                self.record("copying the batch indices to the GPU", e);
                return out;
            }
        };
        // labels_out null: the host knows the labels. `params` is freed after the kernel, in
        // stream order.
        self.launch_augment(&out, 0, records, params.ptr(), b);
        out
    }

    fn capturing(&self) -> bool {
        self.capturing.load(Ordering::Acquire)
    }

    /// Starts recording a training step of `batch` images as a CUDA graph. Until
    /// [`Gpu::capture_end`] nothing executes: ops are recorded, may not read anything back, and
    /// the batch comes from [`Gpu::augment_staged`]. Every shape must have run once before
    /// (cuDNN's algorithm search and the buffers of that batch size exist), and no memory
    /// allocated before may be freed inside (the caller keeps the network's buffers).
    pub fn capture_begin(&self, batch: usize) -> anyhow::Result<()> {
        {
            let mut step = self.step.lock().unwrap_or_else(|p| p.into_inner());
            if step.as_ref().is_none_or(|st| st.batch != batch) {
                self.current.store(0, Ordering::Relaxed);
                let z = |bytes: usize| {
                    self.zeroed(bytes).map_err(|e| {
                        anyhow::anyhow!("allocating the CUDA graph's step state: {e:#}")
                    })
                };
                *step = Some(StepState {
                    batch,
                    params: z(4 * 4 * batch)?,
                    labels: z(4 * batch)?,
                    loss: z(4)?,
                    correct: z(4)?,
                    sums: z(16)?,
                    lr: z(4)?,
                });
            }
        }
        // Memory dropped before the capture is freed now, outside it.
        self.settle();
        self.synchronize()?;
        self.current.store(0, Ordering::Relaxed);
        self.dev
            .capture_begin(self.stream())
            .map_err(|e| anyhow::anyhow!("cannot start a CUDA graph capture: {e:#}"))?;
        self.capturing.store(true, Ordering::Release);
        // Every branch stream joins the capture now, so that capture_end can rejoin them all
        // (waiting on a stream that never joined would break the capture).
        let main = &self.lanes[0];
        let joined = self
            .dev
            .event_record(main.event, main.stream)
            .and_then(|()| {
                self.lanes[1..]
                    .iter()
                    .try_for_each(|lane| self.dev.stream_wait(lane.stream, main.event))
            });
        if let Err(e) = joined {
            self.record("ordering CUDA streams in a capture", e);
        }
        Ok(())
    }

    /// Ends the recording (also after a failure inside it, so the stream is usable again) and
    /// instantiates the graph.
    pub fn capture_end(&self, batch: usize) -> anyhow::Result<StepGraph> {
        // Temporaries dropped inside the step are freed inside the graph, and every branch
        // stream rejoins the main one: a capture must end where it began.
        self.settle();
        let main = &self.lanes[0];
        for lane in &self.lanes[1..] {
            if let Err(e) = self.dev.event_record(lane.event, lane.stream) {
                self.record("recording a CUDA event", e);
            } else if let Err(e) = self.dev.stream_wait(main.stream, lane.event) {
                self.record("ordering CUDA streams", e);
            }
        }
        self.capturing.store(false, Ordering::Release);
        let graph = self.dev.capture_end(main.stream);
        self.take_error()?;
        let graph = graph.map_err(|e| {
            anyhow::anyhow!("cannot build the CUDA graph of a training step: {e:#}")
        })?;
        Ok(StepGraph {
            dev: self.dev.clone(),
            graph,
            batch,
        })
    }

    /// Inside a capture: the data kernel renders the batch staged by [`Gpu::replay`] (record
    /// indices and crop/flip draws in the step's device buffers) into `out`, and its labels
    /// into the step's label buffer.
    pub fn augment_staged(&self, records: &DeviceRecords, out: &mut Buf) {
        let step = self.step.lock().unwrap_or_else(|p| p.into_inner());
        let Some(st) = step.as_ref() else {
            return self.record("augment_batch", "no captured step");
        };
        self.launch_augment(out, st.labels.ptr(), records, st.params.ptr(), st.batch);
    }

    /// `augment_batch_*` over `b` images into `out`: `params` is the device address of the
    /// 4·b ints (indices, dy, dx, flip), `labels` of the label output (0 for none).
    fn launch_augment(
        &self,
        out: &Buf,
        labels: u64,
        records: &DeviceRecords,
        params: u64,
        b: usize,
    ) {
        let (rp, np) = (records.bytes.ptr(), records.norm.ptr());
        let at = |k: usize| params + (k * b * 4) as u64;
        let args = [
            P(self.ptr(out)),
            P(labels),
            P(rp),
            I(records.records as i32),
            P(at(0)),
            P(at(1)),
            P(at(2)),
            P(at(3)),
            P(np),
            P(np + 12), // STD follows MEAN
            I(b as i32),
        ];
        let launch = LaunchDims {
            grid: [12, (b as u32).min(65535), 1],
            block: [256, 1, 1],
            shared_bytes: 0,
        };
        self.launch(&typed("augment_batch", out.dtype), launch, &args);
    }

    /// Runs the captured step once on the batch `indices` with crop/flip draws `views`, at
    /// learning rate `lr`: two small copies into the step's buffers, then the graph.
    pub fn replay(
        &self,
        g: &StepGraph,
        indices: &[usize],
        views: &[(i32, i32, bool)],
        lr: f32,
    ) -> anyhow::Result<()> {
        // A failure recorded outside the graph is reported before the graph runs again.
        self.take_error()?;
        if indices.len() != g.batch || views.len() != g.batch {
            anyhow::bail!(
                "a CUDA graph of {} images replayed on {} images",
                g.batch,
                indices.len()
            );
        }
        let mut step = self.step.lock().unwrap_or_else(|p| p.into_inner());
        let st = step
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("a CUDA graph without its step state"))?;
        let mut params = Vec::with_capacity(4 * g.batch);
        params.extend(indices.iter().map(|&i| i as i32));
        params.extend(views.iter().map(|v| v.0));
        params.extend(views.iter().map(|v| v.1));
        params.extend(views.iter().map(|v| v.2 as i32));
        let s = self.stream();
        let err = |e| anyhow::anyhow!("staging a training step: {e:#}");
        let bytes: Vec<u8> = params.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.dev.htod(s, st.params.ptr(), &bytes).map_err(err)?;
        self.dev
            .htod(s, st.lr.ptr(), &lr.to_le_bytes())
            .map_err(err)?;
        self.dev
            .graph_launch(g.graph, s)
            .map_err(|e| anyhow::anyhow!("replaying the CUDA graph of a training step: {e:#}"))
    }

    /// Σ loss·n and Σ correct of the captured steps run since the last call (waits for them).
    pub fn take_step_sums(&self) -> anyhow::Result<(f64, u64)> {
        let mut step = self.step.lock().unwrap_or_else(|p| p.into_inner());
        let Some(st) = step.as_mut() else {
            return Ok((0.0, 0));
        };
        self.take_error()?;
        let s = self.stream();
        let err = |e| anyhow::anyhow!("reading the training metrics: {e:#}");
        let mut bytes = [0u8; 16];
        self.dev.dtoh(s, &mut bytes, st.sums.ptr()).map_err(err)?;
        self.dev.memset(s, st.sums.ptr(), 0, 16).map_err(err)?;
        let loss = f64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let correct = f64::from_le_bytes(bytes[8..].try_into().expect("8 bytes"));
        Ok((loss, correct.max(0.0) as u64))
    }

    fn upload_as(&self, data: &[f32], dt: DType) -> Buf {
        let what = buffer_label("an uploaded tensor", data.len(), dt);
        if data.is_empty() || self.failed() {
            return self.alloc(&what, data.len(), dt);
        }
        match self.uploaded(&to_bytes(data, dt)) {
            Ok(mem) => self.wrap(mem, data.len(), dt),
            Err(e) => {
                self.record_oom(&what, data.len() * dt.size(), e);
                self.without_memory(data.len(), dt)
            }
        }
    }
}

impl Gpu {
    fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// A grid-stride launch of at most 8 blocks per SM, as the bn/concat kernels recommend.
    fn strided(&self, n: usize) -> LaunchDims {
        LaunchDims::linear(
            (n as u32).div_ceil(BLOCK).clamp(1, 8 * self.sm_count()),
            BLOCK,
        )
    }

    /// The BatchNorm reductions' launch for a [P, C] tensor on this GPU.
    fn reduction(&self, p: usize, c: usize) -> Reduction {
        geometry::batch_norm(p, c, self.sm_count())
    }

    /// The zeroed counters and a workspace of the reduction kernels, grown as needed. The
    /// kernels leave the counters zero again, so one pair serves every launch on this stream.
    fn reduction_buffers(&self, r: &Reduction) -> (u64, u64) {
        let mut b = self
            .lane()
            .bn_scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // A failed growth leaves the old, smaller buffers, which no launch then reads: the
        // failure is recorded and `launch` runs nothing until it is reported.
        if b.0.as_ref().is_none_or(|w| w.bytes() < 8 * r.workspace) {
            // The partial sums are written before they are read: no zeroing.
            match alloc_mem(&self.dev, self.cur(), 8 * r.workspace) {
                Ok(w) => b.0 = Some(w),
                Err(e) => self.record_oom(
                    "the partial sums of a per-channel reduction",
                    8 * r.workspace,
                    e,
                ),
            }
        }
        if b.1.as_ref().is_none_or(|c| c.bytes() < 4 * r.counters) {
            match self.zeroed(4 * r.counters) {
                Ok(c) => b.1 = Some(c),
                Err(e) => {
                    self.record_oom("the counters of a per-channel reduction", 4 * r.counters, e)
                }
            }
        }
        (
            b.0.as_ref().map_or(0, DevMem::ptr),
            b.1.as_ref().map_or(0, DevMem::ptr),
        )
    }

    /// Training-mode BatchNorm, then ReLU when `relu`: the statistics kernel, then the apply.
    #[allow(clippy::type_complexity)]
    fn bn_train(
        &self,
        y: &mut Buf,
        (mean, invstd, running_mean, running_var): (&mut Buf, &mut Buf, &mut Buf, &mut Buf),
        (x, gamma, beta): (&Buf, &Buf, &Buf),
        xs: Nhwc,
        cfg: &BatchNormCfg,
        relu: bool,
    ) -> anyhow::Result<()> {
        crate::backend::check_batch_norm_train(xs)?;
        self.bn_stats(mean, invstd, running_mean, running_var, x, xs, cfg);
        self.bn_apply(y, x, mean, invstd, gamma, beta, xs, relu);
        Ok(())
    }

    /// Eval-mode BatchNorm (running statistics), then ReLU when `relu`.
    fn bn_eval(
        &self,
        y: &mut Buf,
        (x, gamma, beta): (&Buf, &Buf, &Buf),
        (running_mean, running_var): (&Buf, &Buf),
        xs: Nhwc,
        cfg: &BatchNormCfg,
        relu: bool,
    ) {
        let mut invstd = self.f32_zeros("the eval-mode 1/σ of a BatchNorm", xs.c);
        self.bn_eval_invstd(&mut invstd, running_var, xs.c, cfg);
        self.bn_apply(y, x, running_mean, &invstd, gamma, beta, xs, relu);
    }

    #[allow(clippy::too_many_arguments)]
    fn bn_stats(
        &self,
        mean: &mut Buf,
        invstd: &mut Buf,
        running_mean: &mut Buf,
        running_var: &mut Buf,
        x: &Buf,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) {
        let (p, c) = (xs.pixels() as i32, xs.c as i32);
        let r = self.reduction(xs.pixels(), xs.c);
        let (ws, counters) = self.reduction_buffers(&r);
        let args = [
            P(self.ptr(mean)),
            P(self.ptr(invstd)),
            P(self.ptr(running_mean)),
            P(self.ptr(running_var)),
            P(ws),
            P(counters),
            P(self.ptr(x)),
            I(p),
            I(c),
            F(cfg.eps as f32),
            F(cfg.momentum as f32),
        ];
        self.launch(&typed("batch_norm_stats", x.dtype), config(&r), &args);
    }

    #[allow(clippy::too_many_arguments)]
    fn bn_apply(
        &self,
        y: &mut Buf,
        x: &Buf,
        mean: &Buf,
        invstd: &Buf,
        gamma: &Buf,
        beta: &Buf,
        xs: Nhwc,
        relu: bool,
    ) {
        let (p, c) = (xs.pixels() as i32, xs.c as i32);
        let args = [
            P(self.ptr(y)),
            I(c), // ldy: a plain [P, C] output
            I(0), // y_off
            P(self.ptr(x)),
            P(self.ptr(mean)),
            P(self.ptr(invstd)),
            P(self.ptr(gamma)),
            P(self.ptr(beta)),
            I(p),
            I(c),
            I(relu as i32),
        ];
        self.launch(
            &typed("batch_norm_relu_apply", x.dtype),
            self.strided(xs.len()),
            &args,
        );
    }

    fn bn_eval_invstd(&self, invstd: &mut Buf, running_var: &Buf, c: usize, cfg: &BatchNormCfg) {
        let args = [
            P(self.ptr(invstd)),
            P(self.ptr(running_var)),
            I(c as i32),
            F(cfg.eps as f32),
        ];
        let launch = LaunchDims::linear((c as u32).div_ceil(128), 128);
        self.launch("batch_norm_eval_invstd", launch, &args);
    }

    #[allow(clippy::too_many_arguments)]
    /// BatchNorm's backward, of BatchNorm+ReLU when `y` (the ReLU's output) is given: the
    /// kernels mask dy by `y > 0` as they read it.
    #[allow(clippy::too_many_arguments)]
    fn bn_backward(
        &self,
        dx: &mut Buf,
        dgamma: &mut Buf,
        dbeta: &mut Buf,
        dy: &Buf,
        y: Option<&Buf>,
        x: &Buf,
        gamma: &Buf,
        mean: &Buf,
        invstd: &Buf,
        xs: Nhwc,
    ) {
        let (p, c) = (xs.pixels() as i32, xs.c as i32);
        let coef = self.f32_zeros("the backward coefficients of a BatchNorm", 3 * xs.c);
        let r = self.reduction(xs.pixels(), xs.c);
        let (ws, counters) = self.reduction_buffers(&r);
        let (dyp, xp, mp, cp) = (self.ptr(dy), self.ptr(x), self.ptr(mean), self.ptr(&coef));
        // Without the ReLU (relu = 0) y is never read: dy stands in for it. ld = C and
        // offset 0: plain [P, C] tensors.
        let (yp, relu) = y.map_or((dyp, 0), |y| (self.ptr(y), 1));
        let args = [
            P(cp),
            P(self.ptr(dgamma)),
            P(self.ptr(dbeta)),
            P(ws),
            P(counters),
            P(dyp),
            I(c),
            I(0),
            P(yp),
            I(c),
            I(0),
            P(xp),
            P(mp),
            P(self.ptr(invstd)),
            P(self.ptr(gamma)),
            I(p),
            I(c),
            I(relu),
        ];
        self.launch(
            &typed("batch_norm_relu_backward_reduce", x.dtype),
            config(&r),
            &args,
        );
        let args = [
            P(self.ptr(dx)),
            P(dyp),
            I(c),
            I(0),
            P(yp),
            I(c),
            I(0),
            P(xp),
            P(mp),
            P(cp),
            I(p),
            I(c),
            I(relu),
        ];
        self.launch(
            &typed("batch_norm_relu_backward_apply", x.dtype),
            self.strided(xs.len()),
            &args,
        );
    }

    fn concat(&self, y: &mut Buf, parts: &[&Buf], channels: &[usize]) {
        let ld: i32 = channels.iter().sum::<usize>() as i32;
        let pixels = (y.len / ld.max(1) as usize) as i32;
        let name = typed("concat_forward", y.dtype);
        let yp = self.ptr(y);
        let mut off = 0i32;
        for (part, &c) in parts.iter().zip(channels) {
            let args = [
                P(yp),
                I(ld),
                I(off),
                P(self.ptr(part)),
                I(pixels),
                I(c as i32),
            ];
            self.launch(&name, self.strided(pixels as usize * c), &args);
            off += c as i32;
        }
    }

    fn split(&self, dparts: &mut [&mut Buf], dy: &Buf, channels: &[usize]) {
        let ld: i32 = channels.iter().sum::<usize>() as i32;
        let pixels = (dy.len / ld.max(1) as usize) as i32;
        let name = typed("concat_backward", dy.dtype);
        let dyp = self.ptr(dy);
        let mut off = 0i32;
        for (part, &c) in dparts.iter_mut().zip(channels) {
            let args = [
                P(self.ptr(part)),
                P(dyp),
                I(ld),
                I(off),
                I(pixels),
                I(c as i32),
            ];
            self.launch(&name, self.strided(pixels as usize * c), &args);
            off += c as i32;
        }
    }

    /// Runs the fused softmax cross-entropy: `probs` receives (softmax − target)/N, the
    /// gradient the backward hands on. Returns the mean loss (reading it back synchronises).
    fn cross_entropy(
        &self,
        probs: &mut Buf,
        logits: &Buf,
        labels: &[u32],
        k: usize,
        smoothing: f64,
    ) -> f64 {
        let n = labels.len();
        if self.failed() {
            return f64::NAN;
        }
        if self.capturing() {
            self.cross_entropy_captured(probs, logits, n, k, smoothing);
            return f64::NAN;
        }
        let labels_i: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
        let bytes: Vec<u8> = labels_i.iter().flat_map(|v| v.to_le_bytes()).collect();
        let labels_d = match self.uploaded(&bytes) {
            Ok(b) => b,
            Err(e) => {
                self.record("copying labels to the GPU", e);
                return f64::NAN;
            }
        };
        let loss = self.f32_zeros("the loss", 1);
        let correct = match self.zeroed(4) {
            Ok(b) => b,
            Err(e) => {
                self.record_oom("the accuracy counter", 4, e);
                return f64::NAN;
            }
        };
        let out = (self.ptr(&loss), correct.ptr());
        let labels_p = labels_d.ptr();
        self.launch_cross_entropy(probs, logits, labels_p, out, (n, k), smoothing);
        self.download(&loss).first().map_or(f64::NAN, |&l| l as f64)
    }

    /// `cross_entropy_forward_backward` over `n` rows of `k` logits: `labels` and `(loss,
    /// correct)` are device addresses; dlogits (into `probs`) carry the loss scale, if any.
    fn launch_cross_entropy(
        &self,
        probs: &mut Buf,
        logits: &Buf,
        labels: u64,
        (loss, correct): (u64, u64),
        (n, k): (usize, usize),
        smoothing: f64,
    ) {
        let scale = self.loss_scale.as_ref().map_or(0, |ls| ls.scale.ptr());
        let args = [
            P(self.ptr(probs)),
            P(loss),
            P(correct),
            P(self.ptr(logits)),
            P(labels),
            I(n as i32),
            I(k as i32),
            F(smoothing as f32),
            P(scale), // null on the fp32 path, which does not scale
        ];
        let threads = ((32 * n as u32).min(1024)).div_ceil(32) * 32;
        let launch = LaunchDims::linear(1, threads.max(32));
        self.launch("cross_entropy_forward_backward", launch, &args);
    }

    /// The loss inside a captured step: labels from the data kernel's output, the loss and the
    /// correct count into the step's device slots and added to its sums; nothing read back.
    fn cross_entropy_captured(
        &self,
        probs: &mut Buf,
        logits: &Buf,
        n: usize,
        k: usize,
        smoothing: f64,
    ) {
        let step = self.step.lock().unwrap_or_else(|p| p.into_inner());
        let Some(st) = step.as_ref().filter(|st| st.batch == n) else {
            return self.record(
                "cross_entropy_forward",
                format!("a captured step of {n} images without its device state"),
            );
        };
        let (labels, loss) = (st.labels.ptr(), st.loss.ptr());
        let (correct, sums) = (st.correct.ptr(), st.sums.ptr());
        self.launch_cross_entropy(probs, logits, labels, (loss, correct), (n, k), smoothing);
        let args = [P(sums), P(loss), P(correct), I(n as i32)];
        self.launch("accumulate_step_metrics", ONE_THREAD, &args);
    }

    /// The learning rate's device slot inside a captured step (0 otherwise: the lr argument).
    fn lr_device(&self) -> u64 {
        if !self.capturing() {
            return 0;
        }
        let step = self.step.lock().unwrap_or_else(|p| p.into_inner());
        step.as_ref().map_or(0, |st| st.lr.ptr())
    }

    /// torch.optim.SGD over one parameter; with `found_inf` (a device flag, 0 for none) the
    /// kernel does nothing when the flag is set.
    fn sgd(
        &self,
        param: &mut Buf,
        grad: &Buf,
        momentum_buf: &mut Buf,
        first_step: bool,
        opt: &Sgd,
        found_inf: u64,
    ) {
        let args = [
            P(self.ptr(param)),
            P(self.ptr(grad)),
            P(self.ptr(momentum_buf)),
            I(param.len as i32),
            F(opt.lr as f32),
            F(opt.momentum as f32),
            F(opt.weight_decay as f32),
            I(opt.nesterov as i32),
            I(first_step as i32),
            P(found_inf),
            P(self.lr_device()), // in a captured step, the lr set before each replay
        ];
        self.launch("sgd_step", self.strided(param.len), &args);
    }

    /// db[c] += Σ_pixels dy[p, c] (dy NHWC in any activation type, or the fp32 logits'
    /// gradient), by the project's own reduction kernel on every path: its bits depend only on
    /// the data and the shape, never on timing or on the GPU, which `--deterministic` needs and
    /// cuDNN's bias-gradient reduction does not promise.
    fn bias_grad(&self, db: &mut Buf, dy: &Buf, ys: Nhwc) {
        let r = geometry::bias_grad(ys.pixels(), ys.c, self.sm_count());
        let (ws, counters) = self.reduction_buffers(&r);
        let args = [
            P(self.ptr(db)),
            P(ws),
            P(counters),
            P(self.ptr(dy)),
            I(ys.pixels() as i32),
            I(ys.c as i32),
            I(geometry::BIAS_GRAD_TILE_ROWS as i32),
        ];
        self.launch(&typed("bias_grad", dy.dtype), config(&r), &args);
    }
}

/// The launch of a per-channel reduction.
fn config(r: &Reduction) -> LaunchDims {
    LaunchDims {
        grid: [r.grid.0, r.grid.1, 1],
        block: [r.block.0, r.block.1, 1],
        shared_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_names_what_how_much_and_the_device_memory() {
        let what = "an activation of 6422528 f16 values in block1.0";
        let free_total = Some((3 << 20, 140 << 30));
        let msg = oom_message(what, 12845056, free_total, "CUDA_ERROR_OUT_OF_MEMORY");
        for part in [
            "out of GPU memory allocating an activation of 6422528 f16 values in block1.0",
            "12845056 bytes (12.2 MiB) requested",
            "3145728 bytes (3.0 MiB) free of 150323855360 bytes (140.0 GiB) on the device",
            "--batch-size",
            "CUDA_ERROR_OUT_OF_MEMORY",
        ] {
            assert!(msg.contains(part), "{part:?} missing from: {msg}");
        }
        let msg = oom_message("the loss", 4, None, "e");
        assert!(
            msg.contains("4 bytes requested, free memory unknown"),
            "{msg}"
        );
        assert_eq!(size(2048), "2048 bytes (2.0 KiB)");
    }

    #[test]
    fn buffer_labels_name_the_innermost_profiler_range() {
        // The ranges are per thread, and each test runs on a thread of its own.
        assert_eq!(
            buffer_label("an activation", 10, DType::F16),
            "an activation of 10 f16 values"
        );
        RANGES.with(|r| {
            r.borrow_mut()
                .extend(["step 3".to_string(), "block1.0".to_string()])
        });
        assert_eq!(
            buffer_label("a tensor", 64, DType::F32),
            "a tensor of 64 f32 values in block1.0"
        );
        RANGES.with(|r| r.borrow_mut().clear());
    }
}
