//! `Backend<f32>` for [`Gpu`]: each op is a cuDNN or cuBLAS call or a kernel of `cuda/`, in
//! the element type of its activations (fp32, or fp16/bf16 in mixed precision).
//!
//! This file holds what every op shares (device memory, launches, failure handling), the
//! buffers and the branch streams. Each op family's trait is implemented in the file of its
//! name (`conv`, `batch_norm`, `pool`, `concat`, `elementwise`, `loss`, `optim`), beside the
//! kernels of `cuda/` with the same name. `data` builds training batches on the device and
//! `step` captures and replays a step.

use super::device::{
    AddTensor, ConvCall, ConvDirection, DnnCall, Gemm, KernelArg, LaunchDims, MathType,
    PoolBackward, PoolForward, Transpose,
};
use super::{
    alloc_mem, dnn, DType, DevMem, Gpu, GpuBuf, StepGraph, StepSlots, LOSS_SCALE_BACKOFF,
    LOSS_SCALE_GROWTH, LOSS_SCALE_INTERVAL,
};
use crate::backend::geometry::{self, Reduction};
use crate::backend::{
    Affine, Backend, BatchNormCfg, BatchNormOps, BatchNormSync, BatchStats, Buffers, ConcatOps,
    Conv2d, ConvOps, ElementwiseOps, LossOps, MaxPool2d, Nhwc, OptimOps, PoolOps, RunningStats,
    Sgd, SgdParam,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

mod batch_norm;
mod concat;
mod conv;
mod data;
mod elementwise;
mod loss;
mod optim;
mod pool;
mod step;

pub use data::DeviceRecords;
pub use step::StepInputs;

type Buf = GpuBuf;

use KernelArg::{Ptr, F32, I32};

/// Threads per block of the element-wise kernels.
const BLOCK: u32 = 256;

/// The launch of the one-thread bookkeeping kernels (loss scale, step metrics).
const ONE_THREAD: LaunchDims = LaunchDims { grid: [1, 1, 1], block: [1, 1, 1], shared_bytes: 0 };

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
        DType::F16 => {
            data.iter().flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes()).collect()
        }
        DType::Bf16 => {
            data.iter().flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect()
        }
    }
}

/// The inverse of [`to_bytes`].
fn from_bytes(bytes: &[u8], dt: DType) -> Vec<f32> {
    match dt {
        DType::F32 => {
            bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
        }
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
        self.error.lock().unwrap_or_else(|p| p.into_inner()).is_some()
    }

    /// An fp32 buffer's values as the current stream has them now (it waits for that
    /// stream's work): the few numbers a collective exchanges through the host.
    pub(super) fn read_now(&self, buf: &Buf) -> Vec<f32> {
        debug_assert_eq!(buf.dtype, DType::F32);
        let mut bytes = vec![0u8; 4 * buf.len];
        if let Err(e) = self.dev.dtoh(self.current_stream(), &mut bytes, self.ptr(buf)) {
            self.record("copying values for the other ranks from the GPU", e);
        }
        bytes.chunks_exact(4).map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    /// Overwrites an fp32 buffer with `values`, in the current stream's order.
    pub(super) fn write_now(&self, buf: &Buf, values: &[f32]) {
        debug_assert_eq!((buf.dtype, buf.len), (DType::F32, values.len()));
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_ne_bytes()).collect();
        if let Err(e) = self.dev.htod(self.current_stream(), self.ptr(buf), &bytes) {
            self.record("copying values from the other ranks to the GPU", e);
        }
    }

    /// The raw device address of a buffer, for cuDNN calls and kernel arguments. The backend
    /// orders its streams itself (events at forks and joins), so cudarc records no event. A
    /// buffer whose allocation failed has none: that is recorded (so the work it was for does
    /// not run) and 0 returned.
    pub(super) fn ptr(&self, b: &Buf) -> u64 {
        if b.mem.is_none() {
            self.record(
                "using a GPU buffer",
                format!("its allocation ({} {} values) failed earlier", b.len, b.dtype.suffix()),
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
        let m = alloc_mem(&self.dev, self.current_stream(), bytes)?;
        self.dev.memset(self.current_stream(), m.ptr(), 0, m.bytes())?;
        Ok(m)
    }

    /// `data` copied into fresh device memory on the current stream.
    fn uploaded(&self, data: &[u8]) -> anyhow::Result<DevMem> {
        let m = alloc_mem(&self.dev, self.current_stream(), data.len())?;
        if !data.is_empty() {
            self.dev.htod(self.current_stream(), m.ptr(), data)?;
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
        match alloc_mem(&self.dev, self.current_stream(), bytes) {
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

    /// Launches kernel `name` with its parameters in order; false (and nothing queued) when a
    /// failure is recorded, before or by the launch.
    fn launch(&self, name: &str, dims: LaunchDims, args: &[KernelArg]) -> bool {
        if self.failed() {
            return false;
        }
        // Each caller passes the kernel's exact parameter list (pointers to live buffers of
        // the sizes the kernel reads, then scalars), as documented in cuda/; the device checks
        // it against the kernel's signature.
        match self.dev.launch(self.current_stream(), name, dims, args) {
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
        if let Err(e) = self.dev.dnn(self.current_stream(), &call) {
            self.record(what, e);
        }
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

impl Buffers<f32> for Gpu {
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
        if let Err(e) =
            self.dev.memset(self.current_stream(), self.ptr(buf), 0, buf.len * buf.dtype.size())
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
}

impl Backend<f32> for Gpu {
    fn average_over_ranks(&self, grads: &mut [&mut Buf]) -> anyhow::Result<bool> {
        Gpu::average_over_ranks(self, grads)
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
}

impl Gpu {
    fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// A grid-stride launch of at most 8 blocks per SM, as the bn/concat kernels recommend.
    fn strided(&self, n: usize) -> LaunchDims {
        LaunchDims::linear((n as u32).div_ceil(BLOCK).clamp(1, 8 * self.sm_count()), BLOCK)
    }
}

/// The launch of a per-channel reduction.
fn config(r: &Reduction) -> LaunchDims {
    LaunchDims { grid: [r.grid.0, r.grid.1, 1], block: [r.block.0, r.block.1, 1], shared_bytes: 0 }
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
        assert!(msg.contains("4 bytes requested, free memory unknown"), "{msg}");
        assert_eq!(size(2048), "2048 bytes (2.0 KiB)");
    }

    #[test]
    fn buffer_labels_name_the_innermost_profiler_range() {
        // The ranges are per thread, and each test runs on a thread of its own.
        assert_eq!(buffer_label("an activation", 10, DType::F16), "an activation of 10 f16 values");
        RANGES.with(|r| r.borrow_mut().extend(["step 3".to_string(), "block1.0".to_string()]));
        assert_eq!(
            buffer_label("a tensor", 64, DType::F32),
            "a tensor of 64 f32 values in block1.0"
        );
        RANGES.with(|r| r.borrow_mut().clear());
    }
}
