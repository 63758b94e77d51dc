//! NCCL, through the `libnccl.so.2` that `libs` opened (cudarc's NCCL module looks for other
//! file names): a communicator per rank, made from the unique id rank 0 draws and the ranks
//! exchange over their TCP group, and grouped all-reduces of fp32 gradients on a stream.
//!
//! The signatures are NCCL's (`nccl.h`, 2.10 and later for `ncclAvg`). The communicator is
//! blocking (the default): each call returns once its work is queued on the stream.

use crate::backend::cuda::libs::{function, libraries, Lib};
use anyhow::{bail, Result};
use std::ffi::{c_char, c_int, c_void, CStr};

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UniqueId {
    internal: [c_char; 128],
}

type CommPtr = *mut c_void;
/// `ncclResult_t`.
type NcclResult = c_int;
const NCCL_SUCCESS: NcclResult = 0;
/// `ncclFloat32` of `ncclDataType_t`, `ncclAvg` of `ncclRedOp_t`.
const NCCL_FLOAT32: c_int = 7;
const NCCL_AVG: c_int = 4;

/// The functions used, looked up once.
struct Api {
    get_unique_id: unsafe extern "C" fn(*mut UniqueId) -> NcclResult,
    comm_init_rank: unsafe extern "C" fn(*mut CommPtr, c_int, UniqueId, c_int) -> NcclResult,
    comm_abort: unsafe extern "C" fn(CommPtr) -> NcclResult,
    comm_get_async_error: unsafe extern "C" fn(CommPtr, *mut NcclResult) -> NcclResult,
    get_error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
    all_reduce: unsafe extern "C" fn(
        *const c_void,
        *mut c_void,
        usize,
        c_int,
        c_int,
        CommPtr,
        *mut c_void,
    ) -> NcclResult,
    group_start: unsafe extern "C" fn() -> NcclResult,
    group_end: unsafe extern "C" fn() -> NcclResult,
}

fn api() -> Result<&'static Api> {
    static API: std::sync::OnceLock<Option<Api>> = std::sync::OnceLock::new();
    libraries().require(Lib::Nccl)?;
    // SAFETY: each type is the one `nccl.h` declares for that symbol.
    let api = API.get_or_init(|| unsafe {
        Some(Api {
            get_unique_id: function(Lib::Nccl, b"ncclGetUniqueId\0")?,
            comm_init_rank: function(Lib::Nccl, b"ncclCommInitRank\0")?,
            comm_abort: function(Lib::Nccl, b"ncclCommAbort\0")?,
            comm_get_async_error: function(Lib::Nccl, b"ncclCommGetAsyncError\0")?,
            get_error_string: function(Lib::Nccl, b"ncclGetErrorString\0")?,
            all_reduce: function(Lib::Nccl, b"ncclAllReduce\0")?,
            group_start: function(Lib::Nccl, b"ncclGroupStart\0")?,
            group_end: function(Lib::Nccl, b"ncclGroupEnd\0")?,
        })
    });
    api.as_ref().ok_or_else(|| {
        anyhow::anyhow!("the NCCL library opened lacks a function of NCCL 2.10 or later: install nvidia-nccl-cu13 (or -cu12)")
    })
}

/// `Ok` when NCCL's library is there with every function used.
pub fn available() -> Result<()> {
    api().map(|_| ())
}

/// `r` as an error naming the call and NCCL's reason.
fn check(api: &Api, r: NcclResult, call: &str) -> Result<()> {
    if r == NCCL_SUCCESS {
        return Ok(());
    }
    // SAFETY: NCCL returns a static string for every result code.
    let why = unsafe { CStr::from_ptr((api.get_error_string)(r)) }.to_string_lossy();
    bail!("{call} failed: {why} (NCCL error {r}; NCCL_DEBUG=WARN says more)")
}

/// The id rank 0 draws and sends to the others, as bytes for the TCP group.
pub fn unique_id() -> Result<[u8; 128]> {
    let api = api()?;
    let mut id = UniqueId { internal: [0; 128] };
    // SAFETY: `id` is a valid ncclUniqueId to write.
    check(api, unsafe { (api.get_unique_id)(&mut id) }, "ncclGetUniqueId")?;
    Ok(id.internal.map(|c| c as u8))
}

/// A rank's NCCL communicator on the CUDA context current on this thread.
pub struct NcclComm {
    comm: CommPtr,
    world: usize,
}

// SAFETY: a communicator may be used from any thread, one call at a time, which `&self` calls
// through the backend's stream lock give.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl NcclComm {
    /// Joins the communicator of `world` ranks that `id` names, as `rank`, on the current
    /// device. Every rank must call it: it returns once all have.
    pub fn join(id: &[u8; 128], rank: usize, world: usize) -> Result<NcclComm> {
        let api = api()?;
        let id = UniqueId { internal: id.map(|b| b as c_char) };
        let mut comm: CommPtr = std::ptr::null_mut();
        // SAFETY: `comm` receives the handle; the id is passed by value as NCCL declares.
        let r = unsafe { (api.comm_init_rank)(&mut comm, world as c_int, id, rank as c_int) };
        check(api, r, &format!("ncclCommInitRank (rank {rank} of {world})"))?;
        Ok(NcclComm { comm, world })
    }

    pub fn world(&self) -> usize {
        self.world
    }

    /// Averages each fp32 buffer `(device pointer, count)` over the ranks in place, queued on
    /// `stream` after its earlier work, as one group (NCCL fuses them into few launches).
    pub fn all_reduce_mean(&self, stream: *mut c_void, bufs: &[(u64, usize)]) -> Result<()> {
        let api = api()?;
        // SAFETY: the pointers are live device buffers of `count` f32 on this communicator's
        // device, and `stream` a stream of its context; group calls nest as NCCL documents.
        unsafe {
            check(api, (api.group_start)(), "ncclGroupStart")?;
            let mut first_error = Ok(());
            for &(ptr, count) in bufs {
                let p = ptr as *mut c_void;
                let r = (api.all_reduce)(p, p, count, NCCL_FLOAT32, NCCL_AVG, self.comm, stream);
                if first_error.is_ok() {
                    first_error = check(api, r, "ncclAllReduce");
                }
            }
            // The group is always closed, so that a failed call leaves NCCL usable.
            let end = check(api, (api.group_end)(), "ncclGroupEnd");
            first_error.and(end)?;
        }
        self.async_error()
    }

    /// An error another rank's failure (or a network fault) left on this communicator.
    pub fn async_error(&self) -> Result<()> {
        let api = api()?;
        let mut e: NcclResult = NCCL_SUCCESS;
        // SAFETY: `e` receives the communicator's state.
        check(
            api,
            unsafe { (api.comm_get_async_error)(self.comm, &mut e) },
            "ncclCommGetAsyncError",
        )?;
        check(api, e, "a collective of this rank's NCCL communicator")
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Abort rather than destroy: destroying waits for the communicator's queued work,
        // which never finishes when a peer died mid-collective, and the process would hang on
        // its way out. At the end of a run nothing is queued, and abort frees the same.
        if let Ok(api) = api() {
            // SAFETY: `comm` came from ncclCommInitRank and is dropped once.
            unsafe { (api.comm_abort)(self.comm) };
        }
    }
}
