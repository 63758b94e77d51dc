//! The driver and library objects the real device owns, each destroyed on drop: streams with
//! their cuDNN and cuBLAS handles, events, executable graphs, and the pinned staging ring of
//! host-to-device copies.

use super::{dnn, drv};
use anyhow::{anyhow, bail, Result};
use cudarc::cublas::sys as blas;
use cudarc::driver::{result as cu, sys as cus};
use std::ffi::c_void;
use std::sync::Mutex;

/// Bytes of cuBLAS workspace per stream (cuBLAS's own default on Hopper is 32 MiB).
const BLAS_WORKSPACE: usize = 32 << 20;

/// Host-to-device copies go through pinned staging chunks of this size, `STAGING_CHUNKS` of
/// them used in turn.
pub const STAGING_CHUNK: usize = 1 << 20;
const STAGING_CHUNKS: usize = 8;

/// A cuBLAS status as an error naming the call.
pub fn blas_check(status: blas::cublasStatus_t, what: &str) -> Result<()> {
    if status == blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        bail!("{what} failed: {status:?}")
    }
}

/// A stream (destroyed on drop).
pub struct StreamHandle(pub cus::CUstream);

/// An event (destroyed on drop).
pub struct EventHandle(pub cus::CUevent);

/// An instantiated graph (destroyed on drop).
pub struct GraphExec(pub cus::CUgraphExec);

// SAFETY: streams, events and executable graphs are driver objects, and the driver API is
// thread-safe: any thread may use them with their context current, which every RealDevice
// entry point (and its Drop) makes it before touching one.
unsafe impl Send for StreamHandle {}
unsafe impl Sync for StreamHandle {}
unsafe impl Send for EventHandle {}
unsafe impl Sync for EventHandle {}
unsafe impl Send for GraphExec {}
unsafe impl Sync for GraphExec {}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        // SAFETY: created by cuStreamCreate and destroyed once, its work finished (the device
        // synchronizes before dropping its streams).
        let _ = unsafe { cu::stream::destroy(self.0) };
    }
}

impl Drop for EventHandle {
    fn drop(&mut self) {
        // SAFETY: created by cuEventCreate and destroyed once.
        let _ = unsafe { cu::event::destroy(self.0) };
    }
}

impl Drop for GraphExec {
    fn drop(&mut self) {
        // SAFETY: created by cuGraphInstantiateWithFlags and destroyed once; a launch still
        // running completes first (the driver defers the release).
        let _ = unsafe { cu::graph::exec_destroy(self.0) };
    }
}

/// A cuBLAS handle bound to one stream, with its own workspace.
pub struct Blas {
    pub handle: blas::cublasHandle_t,
    workspace: cus::CUdeviceptr,
}

// SAFETY: a cuBLAS handle may move between threads as long as calls on it are not concurrent
// (it lives behind a Mutex) and the context is current (bound by every entry point).
unsafe impl Send for Blas {}

impl Blas {
    /// A handle on `stream` in cuBLAS's default math mode (plain fp32 for SGEMM, no TF32),
    /// host-side alpha and beta, no atomics (the same bits every run), and a workspace of its
    /// own so that cuBLAS never allocates, inside a graph capture or out. The context must be
    /// current.
    pub fn new(stream: cus::CUstream) -> Result<Blas> {
        let handle =
            cudarc::cublas::result::create_handle().map_err(|e| anyhow!("cublasCreate: {e}"))?;
        let mut b = Blas { handle, workspace: 0 };
        // SAFETY: a live handle and stream; the workspace is owned by `b`, freed after the
        // handle is destroyed.
        unsafe {
            // cublasSetStream resets the workspace to cuBLAS's own pool: the stream first.
            blas_check(
                blas::cublasSetStream_v2(handle, stream as blas::cudaStream_t),
                "cublasSetStream",
            )?;
            blas_check(
                blas::cublasSetMathMode(handle, blas::cublasMath_t::CUBLAS_DEFAULT_MATH),
                "cublasSetMathMode",
            )?;
            blas_check(
                blas::cublasSetPointerMode_v2(
                    handle,
                    blas::cublasPointerMode_t::CUBLAS_POINTER_MODE_HOST,
                ),
                "cublasSetPointerMode",
            )?;
            blas_check(
                blas::cublasSetAtomicsMode(
                    handle,
                    blas::cublasAtomicsMode_t::CUBLAS_ATOMICS_NOT_ALLOWED,
                ),
                "cublasSetAtomicsMode",
            )?;
            b.workspace = cu::malloc_sync(BLAS_WORKSPACE)
                .map_err(drv("cuMemAlloc of the cuBLAS workspace"))?;
            blas_check(
                blas::cublasSetWorkspace_v2(handle, b.workspace as *mut c_void, BLAS_WORKSPACE),
                "cublasSetWorkspace",
            )?;
        }
        Ok(b)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: created by cublasCreate and destroyed once; the workspace (cuMemAlloc) is
        // freed after it, once the device has synchronized.
        unsafe {
            blas::cublasDestroy_v2(self.handle);
            if self.workspace != 0 {
                let _ = cu::memory_free(self.workspace);
            }
        }
    }
}

/// One stream with its library handles. Fields drop in order: the handles before the stream
/// they work on.
pub struct Lane {
    pub dnn: Mutex<dnn::Handle>,
    pub blas: Mutex<Blas>,
    pub stream: StreamHandle,
}

/// A pinned host buffer that host-to-device copies pass through, with the event marking the
/// end of the last copy out of it.
pub struct Chunk {
    pub host: *mut u8,
    pub event: cus::CUevent,
    /// A copy out of `host` was queued and `event` recorded after it.
    pub pending: bool,
}

// SAFETY: pinned host memory and an event of the device's context, used only under the
// staging Mutex with the context current.
unsafe impl Send for Chunk {}

impl Chunk {
    fn new() -> Result<Chunk> {
        let event = cu::event::create(cus::CUevent_flags::CU_EVENT_DISABLE_TIMING)
            .map_err(drv("cuEventCreate"))?;
        // SAFETY: page-locked host memory, freed on drop.
        match unsafe { cu::malloc_host(STAGING_CHUNK, 0) } {
            Ok(host) => Ok(Chunk { host: host.cast(), event, pending: false }),
            Err(e) => {
                // SAFETY: just created, never recorded.
                let _ = unsafe { cu::event::destroy(event) };
                Err(drv("cuMemHostAlloc of a staging buffer")(e))
            }
        }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: allocated by cuMemHostAlloc / cuEventCreate and released once; the device
        // synchronizes before dropping its staging buffers.
        unsafe {
            let _ = cu::free_host(self.host.cast());
            let _ = cu::event::destroy(self.event);
        }
    }
}

/// The staging ring of [`RealDevice::htod`].
#[derive(Default)]
pub struct Staging {
    pub chunks: Vec<Chunk>,
    next: usize,
}

impl Staging {
    /// The next chunk of the ring (made on first use), once the copy last queued out of it has
    /// finished.
    pub fn take(&mut self) -> Result<&mut Chunk> {
        let i = self.next;
        if i == self.chunks.len() {
            self.chunks.push(Chunk::new()?);
        }
        self.next = (i + 1) % STAGING_CHUNKS;
        let c = &mut self.chunks[i];
        if c.pending {
            // SAFETY: a live event, recorded after the last copy out of this chunk.
            unsafe { cu::event::synchronize(c.event) }
                .map_err(drv("cuEventSynchronize (a staged host-to-device copy)"))?;
            c.pending = false;
        }
        Ok(c)
    }
}
