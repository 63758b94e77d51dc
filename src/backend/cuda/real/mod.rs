//! The real device: [`Device`] on an NVIDIA GPU through the CUDA driver API, cuDNN and cuBLAS
//! (cudarc's raw bindings).
//!
//! - Memory is raw device addresses from the stream-ordered allocator (`cuMemAllocAsync` /
//!   `cuMemFreeAsync`, the device's default memory pool).
//! - Streams are non-blocking (no implicit ordering with the legacy NULL stream); each has its
//!   own cuDNN handle and cuBLAS handle, made when the stream is (so that nothing is created or
//!   allocated inside a graph capture), the cuBLAS one with a fixed workspace of its own.
//! - Kernels are found by name among every `.entry` of the embedded modules, and each launch's
//!   arguments are checked against the PTX signature ([`kernels`]).
//! - Every entry point makes the device's context current on the calling thread first, so the
//!   backend may call from any thread.

mod dnn;
mod handles;
mod kernels;
pub mod nccl;

use super::device::{
    AlgoPerf, ConvDirection, ConvProblem, Device, DeviceInfo, DnnCall, Event, Gemm, Graph,
    KernelArg, LaunchDims, Stream, Transpose,
};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublas::sys as blas;
use cudarc::driver::{result as cu, sys as cus, CudaContext};
use handles::{
    blas_check, Blas, EventHandle, GraphExec, Lane, Staging, StreamHandle, STAGING_CHUNK,
};
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

/// A driver error as `what failed: CUDA_ERROR_… (message)`.
pub(crate) fn drv(what: &str) -> impl FnOnce(cu::DriverError) -> anyhow::Error + '_ {
    move |e| {
        let msg = e
            .error_string()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "no description".into());
        anyhow!("{what} failed: {:?} ({msg})", e.0)
    }
}

/// A CUDA GPU: its context, streams, events, graphs and kernels.
pub struct RealDevice {
    info: DeviceInfo,
    /// NVTX ranges reach a profiler.
    nvtx: bool,
    kernels: kernels::Kernels,
    /// Indexed by [`Stream`]; never shrinks while the device lives.
    lanes: RwLock<Vec<Arc<Lane>>>,
    /// Indexed by [`Event`].
    events: RwLock<Vec<EventHandle>>,
    /// Indexed by [`Graph`]; `None` once destroyed (numbers are not reused).
    graphs: Mutex<Vec<Option<GraphExec>>>,
    /// The thread that began the capture open on each stream (CUDA requires the same thread
    /// to end it).
    captures: Mutex<HashMap<u32, std::thread::ThreadId>>,
    staging: Mutex<Staging>,
    /// Last: released after everything above is destroyed.
    ctx: Arc<CudaContext>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl RealDevice {
    /// Opens CUDA device `ordinal` (its primary context) and loads every kernel module. The
    /// device keeps no algorithm choice (the backend makes it; cuBLAS runs without atomics).
    pub fn open(ordinal: usize) -> Result<RealDevice> {
        super::driver::probe(ordinal).with_context(|| format!("--device cuda:{ordinal}"))?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow!("cannot open CUDA device {ordinal}: {e}"))?;
        // CudaContext::new made the context current on this thread.
        if !ctx.has_async_alloc() {
            bail!("CUDA device {ordinal} has no memory pools (cuMemAllocAsync), which this backend allocates from");
        }
        let attr = |a, what: &str| ctx.attribute(a).map_err(drv(what));
        use cus::CUdevice_attribute as A;
        let major = attr(
            A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
            "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MAJOR)",
        )?;
        let minor = attr(
            A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
            "cuDeviceGetAttribute(COMPUTE_CAPABILITY_MINOR)",
        )?;
        let sms = attr(
            A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            "cuDeviceGetAttribute(MULTIPROCESSOR_COUNT)",
        )?;
        let info = DeviceInfo {
            name: ctx.name().map_err(drv("cuDeviceGetName"))?,
            compute_capability: (major.max(0) as u32, minor.max(0) as u32),
            multiprocessors: sms.max(1) as u32,
            total_memory: ctx.total_mem().map_err(drv("cuDeviceTotalMem"))?,
        };
        let (major, minor) = info.compute_capability;
        let driver = super::driver::driver_version().unwrap_or_else(|_| "?".into());
        let kernels = kernels::Kernels::load(
            super::driver::ptx::PTX,
            |m| super::driver::matching_cubin(m, major, minor),
            &driver,
        )?;
        tracing::debug!(
            from_cubin = kernels.from_cubin,
            from_ptx = super::driver::ptx::PTX.len() - kernels.from_cubin,
            kernels = kernels.by_name.len(),
            "CUDA device {ordinal} opened: {} ({major}.{minor}), driver CUDA {driver}",
            info.name
        );
        Ok(RealDevice {
            info,
            nvtx: super::nvtx::active(),
            kernels,
            lanes: RwLock::default(),
            events: RwLock::default(),
            graphs: Mutex::default(),
            captures: Mutex::default(),
            staging: Mutex::default(),
            ctx,
        })
    }

    /// Makes the device's context current on the calling thread. (Not cudarc's
    /// `bind_to_thread`, which first reports and clears errors recorded by cudarc's own
    /// objects, of which this device has none.)
    fn bind(&self) -> Result<()> {
        let want = self.ctx.cu_ctx();
        if cu::ctx::get_current().map_err(drv("cuCtxGetCurrent"))? != Some(want) {
            // SAFETY: the context is alive (held by `self.ctx`).
            unsafe { cu::ctx::set_current(want) }.map_err(drv("cuCtxSetCurrent"))?;
        }
        Ok(())
    }

    fn lane(&self, s: Stream) -> Result<Arc<Lane>> {
        self.lanes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(s.0 as usize)
            .cloned()
            .ok_or_else(|| anyhow!("stream {} was never created", s.0))
    }

    /// The raw stream: valid while `self` is (streams are destroyed only on drop).
    fn stream(&self, s: Stream) -> Result<cus::CUstream> {
        Ok(self.lane(s)?.stream.0)
    }

    fn event(&self, e: Event) -> Result<cus::CUevent> {
        self.events
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(e.0 as usize)
            .map(|h| h.0)
            .ok_or_else(|| anyhow!("event {} was never created", e.0))
    }

    /// Whether `s` is being captured into a graph (or a capture on it was invalidated).
    fn capturing(s: cus::CUstream) -> Result<bool> {
        // SAFETY: a live stream.
        let status = unsafe { cu::stream::is_capturing(s) }.map_err(drv("cuStreamIsCapturing"))?;
        Ok(status != cus::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    /// An error if `s` is being captured: `what` touches host memory or allocates, which a
    /// graph cannot replay.
    fn not_capturing(s: cus::CUstream, stream: Stream, what: &str) -> Result<()> {
        if Self::capturing(s)? {
            bail!(
                "{what} on stream {} during a CUDA graph capture: it cannot be recorded in a graph",
                stream.0
            );
        }
        Ok(())
    }

    /// Ends any capture open on `s` and discards its graph, ignoring errors.
    fn end_capture_quietly(s: cus::CUstream) {
        if Self::capturing(s).unwrap_or(false) {
            // SAFETY: a live stream; the graph (if any) is destroyed at once.
            if let Ok(g) = unsafe { cu::stream::end_capture(s) } {
                if !g.is_null() {
                    // SAFETY: the template just returned, destroyed once.
                    let _ = unsafe { cu::graph::destroy(g) };
                }
            }
        }
    }
}

impl Drop for RealDevice {
    fn drop(&mut self) {
        // Every handle below is destroyed with the context current and its work finished.
        if self.bind().is_err() {
            tracing::warn!("cannot make the CUDA context current to release the device");
        }
        for lane in self.lanes.get_mut().unwrap_or_else(PoisonError::into_inner).iter() {
            Self::end_capture_quietly(lane.stream.0);
        }
        let _ = cu::ctx::synchronize();
        self.graphs.get_mut().unwrap_or_else(PoisonError::into_inner).clear();
        self.staging.get_mut().unwrap_or_else(PoisonError::into_inner).chunks.clear();
        self.lanes.get_mut().unwrap_or_else(PoisonError::into_inner).clear();
        self.events.get_mut().unwrap_or_else(PoisonError::into_inner).clear();
        // Then the fields: the modules are unloaded, and last the context is released.
    }
}

fn op(t: Transpose) -> blas::cublasOperation_t {
    match t {
        Transpose::N => blas::cublasOperation_t::CUBLAS_OP_N,
        Transpose::T => blas::cublasOperation_t::CUBLAS_OP_T,
    }
}

fn blas_int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| anyhow!("cublasSgemm: {what} = {v} does not fit an int"))
}

impl Device for RealDevice {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn mem_info(&self) -> Option<(usize, usize)> {
        self.bind().ok()?;
        cu::mem_get_info().ok()
    }

    fn stream_create(&self) -> Result<Stream> {
        self.bind()?;
        let stream = StreamHandle(
            cu::stream::create(cu::stream::StreamKind::NonBlocking)
                .map_err(drv("cuStreamCreate"))?,
        );
        let lane = Lane {
            dnn: Mutex::new(dnn::Handle::new(stream.0)?),
            blas: Mutex::new(Blas::new(stream.0)?),
            stream,
        };
        let mut lanes = self.lanes.write().unwrap_or_else(PoisonError::into_inner);
        lanes.push(Arc::new(lane));
        Ok(Stream((lanes.len() - 1) as u32))
    }

    fn event_create(&self) -> Result<Event> {
        self.bind()?;
        let e = EventHandle(
            cu::event::create(cus::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(drv("cuEventCreate"))?,
        );
        let mut events = self.events.write().unwrap_or_else(PoisonError::into_inner);
        events.push(e);
        Ok(Event((events.len() - 1) as u32))
    }

    fn event_record(&self, event: Event, stream: Stream) -> Result<()> {
        self.bind()?;
        let (e, s) = (self.event(event)?, self.stream(stream)?);
        // SAFETY: a live event and stream of this context.
        unsafe { cu::event::record(e, s) }.map_err(drv("cuEventRecord"))
    }

    fn stream_wait(&self, stream: Stream, event: Event) -> Result<()> {
        self.bind()?;
        let (s, e) = (self.stream(stream)?, self.event(event)?);
        // SAFETY: a live stream and event of this context.
        unsafe { cu::stream::wait_event(s, e, cus::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
            .map_err(drv("cuStreamWaitEvent"))
    }

    fn event_query(&self, event: Event) -> Result<bool> {
        self.bind()?;
        let e = self.event(event)?;
        // SAFETY: a live event.
        match unsafe { cu::event::query(e) } {
            Ok(()) => Ok(true),
            Err(cu::DriverError(cus::CUresult::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(err) => Err(drv("cuEventQuery")(err)),
        }
    }

    fn stream_synchronize(&self, stream: Stream) -> Result<()> {
        self.bind()?;
        let s = self.stream(stream)?;
        // SAFETY: a live stream.
        unsafe { cu::stream::synchronize(s) }.map_err(drv("cuStreamSynchronize"))
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        cu::ctx::synchronize().map_err(drv("cuCtxSynchronize"))
    }

    fn alloc(&self, stream: Stream, bytes: usize) -> Result<u64> {
        self.bind()?;
        let s = self.stream(stream)?;
        // Never 0 bytes (an invalid value to the driver): every allocation is a distinct,
        // non-null address.
        // SAFETY: a live stream; the memory is the caller's until `free`.
        unsafe { cu::malloc_async(s, bytes.max(1)) }
            .map_err(drv(&format!("cuMemAllocAsync of {bytes} bytes")))
    }

    fn free(&self, stream: Stream, ptr: u64) -> Result<()> {
        if ptr == 0 {
            return Ok(());
        }
        self.bind()?;
        let s = self.stream(stream)?;
        // SAFETY: the caller frees an address `alloc` returned, once.
        unsafe { cu::free_async(ptr, s) }.map_err(drv("cuMemFreeAsync"))
    }

    fn memset(&self, stream: Stream, ptr: u64, value: u8, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        let s = self.stream(stream)?;
        // SAFETY: the caller passes `bytes` of live device memory.
        unsafe { cu::memset_d8_async(ptr, value, bytes, s) }.map_err(drv("cuMemsetD8Async"))
    }

    /// Asynchronous in CUDA's sense, and `src` is free on return: each piece of it is copied
    /// into a pinned staging chunk first, the DMA reads the chunk, and a chunk is reused only
    /// after its last copy finished. (`cuMemcpyHtoDAsync` straight from pageable memory is
    /// documented to return once the source is staged only for the synchronous variant; for
    /// the async one the driver "may" stage it, so it is not relied on.)
    fn htod(&self, stream: Stream, dst: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.bind()?;
        let s = self.stream(stream)?;
        // A graph would replay the copy from the staging chunk's contents at replay time.
        Self::not_capturing(s, stream, "a host-to-device copy")?;
        let mut staging = lock(&self.staging);
        for (i, piece) in src.chunks(STAGING_CHUNK).enumerate() {
            let chunk = staging.take()?;
            // SAFETY: the chunk holds STAGING_CHUNK bytes and no queued copy reads it any
            // more (`take` waited); the DMA reads it after this function returns, which the
            // event recorded next guards; `dst` is live device memory of `src.len()` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(piece.as_ptr(), chunk.host, piece.len());
                cus::cuMemcpyHtoDAsync_v2(
                    dst + (i * STAGING_CHUNK) as u64,
                    chunk.host as *const c_void,
                    piece.len(),
                    s,
                )
                .result()
                .map_err(drv("cuMemcpyHtoDAsync"))?;
                cu::event::record(chunk.event, s).map_err(drv("cuEventRecord"))?;
            }
            chunk.pending = true;
        }
        Ok(())
    }

    fn dtoh(&self, stream: Stream, dst: &mut [u8], src: u64) -> Result<()> {
        self.bind()?;
        let s = self.stream(stream)?;
        Self::not_capturing(s, stream, "a device-to-host copy")?;
        if !dst.is_empty() {
            // SAFETY: `src` is live device memory of `dst.len()` bytes; `dst` is borrowed
            // until the stream is synchronized below.
            unsafe { cu::memcpy_dtoh_async(dst, src, s) }.map_err(drv("cuMemcpyDtoHAsync"))?;
        }
        // SAFETY: a live stream.
        unsafe { cu::stream::synchronize(s) }
            .map_err(drv("cuStreamSynchronize (after a device-to-host copy)"))
    }

    fn dtod(&self, stream: Stream, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.bind()?;
        let s = self.stream(stream)?;
        // SAFETY: the caller passes `bytes` of live device memory at both addresses.
        unsafe { cu::memcpy_dtod_async(dst, src, bytes, s) }.map_err(drv("cuMemcpyDtoDAsync"))
    }

    fn launch(
        &self, stream: Stream, name: &str, dims: LaunchDims, args: &[KernelArg],
    ) -> Result<()> {
        let k = self.kernels.get(name)?;
        kernels::check_args(&k.entry, args)?;
        self.bind()?;
        let s = self.stream(stream)?;
        // cuLaunchKernel reads each parameter through a pointer to its value.
        let mut values = args.to_vec();
        let mut params: Vec<*mut c_void> = values
            .iter_mut()
            .map(|a| match a {
                KernelArg::Ptr(p) => (p as *mut u64).cast(),
                KernelArg::I32(v) => (v as *mut i32).cast(),
                KernelArg::F32(v) => (v as *mut f32).cast(),
            })
            .collect();
        let [gx, gy, gz] = dims.grid;
        let [bx, by, bz] = dims.block;
        // SAFETY: the function is loaded; the arguments match its PTX signature in number
        // and kind (checked above) and `values` outlives the call, which copies them; the
        // caller passes addresses of live device memory of the sizes the kernel reads.
        unsafe {
            cu::launch_kernel(k.func, (gx, gy, gz), (bx, by, bz), dims.shared_bytes, s, &mut params)
        }
        .map_err(drv(&format!(
            "cuLaunchKernel({name}, grid {:?}, block {:?}, {} shared bytes)",
            dims.grid, dims.block, dims.shared_bytes
        )))
    }

    fn conv_algorithms(
        &self, stream: Stream, problem: &ConvProblem, dir: ConvDirection, measure: bool,
    ) -> Result<Vec<AlgoPerf>> {
        self.bind()?;
        let lane = self.lane(stream)?;
        if measure {
            // cudnnFind* allocates scratch memory and synchronizes.
            Self::not_capturing(lane.stream.0, stream, "cudnnFind (measuring algorithms)")?;
        }
        let h = lock(&lane.dnn);
        dnn::algorithms(&h, problem, dir, measure)
            .with_context(|| format!("{dir:?} algorithms for {problem:?}"))
    }

    fn dnn(&self, stream: Stream, call: &DnnCall) -> Result<()> {
        self.bind()?;
        let lane = self.lane(stream)?;
        let h = lock(&lane.dnn);
        // SAFETY: the caller passes live device memory of the sizes the call's descriptors
        // give, usable on `stream`, the handle's stream.
        unsafe { dnn::run(&h, call) }
    }

    fn gemm(&self, stream: Stream, g: &Gemm) -> Result<()> {
        let (m, n, k) = (blas_int(g.m, "m")?, blas_int(g.n, "n")?, blas_int(g.k, "k")?);
        let (lda, ldb, ldc) =
            (blas_int(g.lda, "lda")?, blas_int(g.ldb, "ldb")?, blas_int(g.ldc, "ldc")?);
        self.bind()?;
        let lane = self.lane(stream)?;
        let b = lock(&lane.blas);
        // SAFETY: the caller passes live fp32 device matrices of the shapes and leading
        // dimensions given; alpha and beta are host values (POINTER_MODE_HOST) read before
        // the call returns; the handle works on `stream`.
        let status = unsafe {
            blas::cublasSgemm_v2(
                b.handle,
                op(g.transa),
                op(g.transb),
                m,
                n,
                k,
                &g.alpha,
                g.a as *const f32,
                lda,
                g.b as *const f32,
                ldb,
                &g.beta,
                g.c as *mut f32,
                ldc,
            )
        };
        blas_check(status, "cublasSgemm")
    }

    fn cuda_stream(&self, stream: Stream) -> Result<Option<usize>> {
        self.bind()?;
        Ok(Some(self.stream(stream)? as usize))
    }

    fn capture_begin(&self, stream: Stream) -> Result<()> {
        self.bind()?;
        let s = self.stream(stream)?;
        // SAFETY: a live stream; THREAD_LOCAL: only this thread's unsafe calls (allocations,
        // synchronizations) are kept out of the capture.
        unsafe {
            cu::stream::begin_capture(
                s,
                cus::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(drv("cuStreamBeginCapture"))?;
        lock(&self.captures).insert(stream.0, std::thread::current().id());
        Ok(())
    }

    fn capture_end(&self, stream: Stream) -> Result<Graph> {
        self.bind()?;
        let s = self.stream(stream)?;
        {
            let mut captures = lock(&self.captures);
            if captures.get(&stream.0).is_some_and(|t| *t != std::thread::current().id()) {
                // The driver refuses it too (CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD).
                bail!("the capture on stream {} must end on the thread that began it", stream.0);
            }
            captures.remove(&stream.0);
        }
        // SAFETY: a live stream; the graph template is destroyed below.
        let graph = unsafe { cu::stream::end_capture(s) }.map_err(drv("cuStreamEndCapture"))?;
        if graph.is_null() {
            bail!("cuStreamEndCapture returned no graph (the capture was invalidated)");
        }
        // Auto-free: memory allocated inside the graph and not freed there is freed before
        // the next launch, so that a relaunch is possible.
        // SAFETY: `graph` is the live template just returned.
        let exec = unsafe {
            cu::graph::instantiate(
                graph,
                cus::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH,
            )
        };
        // SAFETY: the template is no longer needed once instantiated (or not).
        let _ = unsafe { cu::graph::destroy(graph) };
        let exec = GraphExec(exec.map_err(drv("cuGraphInstantiateWithFlags"))?);
        let mut graphs = lock(&self.graphs);
        graphs.push(Some(exec));
        Ok(Graph((graphs.len() - 1) as u32))
    }

    fn capture_abort(&self, stream: Stream) {
        if self.bind().is_err() {
            return;
        }
        lock(&self.captures).remove(&stream.0);
        let Ok(s) = self.stream(stream) else {
            return;
        };
        Self::end_capture_quietly(s);
        // Streams that joined the failed capture and never rejoined it.
        let lanes: Vec<Arc<Lane>> =
            self.lanes.read().unwrap_or_else(PoisonError::into_inner).clone();
        for lane in lanes {
            Self::end_capture_quietly(lane.stream.0);
        }
        // Whatever the capture left (its invalidation, failed frees of memory allocated
        // inside it) is reported by the calls that hit it and is not sticky in the driver
        // API; wait for the work queued before the capture so the caller starts clean.
        if let Err(e) = cu::ctx::synchronize() {
            tracing::warn!("cuCtxSynchronize after an abandoned CUDA graph capture: {e}");
        }
    }

    fn graph_launch(&self, graph: Graph, stream: Stream) -> Result<()> {
        self.bind()?;
        let s = self.stream(stream)?;
        let graphs = lock(&self.graphs);
        let exec = graphs.get(graph.0 as usize).and_then(Option::as_ref).ok_or_else(|| {
            anyhow!("graph {} does not exist (never made, or destroyed)", graph.0)
        })?;
        // SAFETY: a live executable graph and stream.
        unsafe { cu::graph::launch(exec.0, s) }.map_err(drv("cuGraphLaunch"))
    }

    fn graph_destroy(&self, graph: Graph) {
        if self.bind().is_err() {
            return;
        }
        let exec = lock(&self.graphs).get_mut(graph.0 as usize).and_then(Option::take);
        drop(exec);
    }

    fn range_push(&self, name: &str) {
        if self.nvtx {
            super::nvtx::push(name);
        }
    }

    fn range_pop(&self) {
        if self.nvtx {
            super::nvtx::pop();
        }
    }

    fn profiler(&self, on: bool) -> Result<()> {
        self.bind()?;
        // Everything queued before the range belongs outside it.
        cu::ctx::synchronize().map_err(drv("cuCtxSynchronize"))?;
        // SAFETY: plain driver calls on the current context.
        let (r, what) = unsafe {
            if on {
                (cus::cuProfilerStart(), "cuProfilerStart")
            } else {
                (cus::cuProfilerStop(), "cuProfilerStop")
            }
        };
        r.result().map_err(drv(what))
    }
}
