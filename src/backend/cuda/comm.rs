//! Averaging gradients over data-parallel ranks where they live, in device memory: with NCCL
//! on CUDA GPUs, or through the host over the ranks' TCP group where there is no NCCL (the
//! emulated GPU). Either way every rank ends the call with the same average.

use super::{DType, Gpu, GpuBuf};
use crate::backend::Buffers;
use crate::dist::{Collective, SharedGroup};
use anyhow::{bail, Result};

/// How a [`Gpu`] reaches the other ranks.
pub enum Comm {
    /// Each buffer copied to the host, summed over the TCP group in rank order, divided by
    /// the number of ranks and copied back: the emulated GPU, and the tests' stand-in for NCCL.
    Host(SharedGroup),
    /// NCCL's all-reduce on the backend's main stream.
    #[cfg(feature = "cudnn")]
    Nccl(super::real::nccl::NcclComm),
}

impl Comm {
    pub fn describe(&self) -> &'static str {
        match self {
            Comm::Host(_) => "through the host over TCP",
            #[cfg(feature = "cudnn")]
            Comm::Nccl(_) => "NCCL",
        }
    }
}

/// The collective for `gpu`'s ranks: NCCL on a CUDA device, the host path on the emulated one.
pub fn for_device(gpu: &Gpu, group: &SharedGroup) -> Result<Comm> {
    if gpu.dev.cuda_stream(gpu.stream())?.is_none() {
        return Ok(Comm::Host(group.clone()));
    }
    #[cfg(feature = "cudnn")]
    return nccl(gpu, &mut group.clone());
    #[cfg(not(feature = "cudnn"))]
    bail!("a CUDA device in a build without CUDA")
}

/// NCCL for CUDA ranks: rank 0 draws the communicator's id and sends it over `group`, and
/// every rank joins on the device of `gpu`.
#[cfg(feature = "cudnn")]
fn nccl(gpu: &Gpu, group: &mut dyn Collective) -> Result<Comm> {
    let id = nccl_id(group)?;
    // NCCL uses the CUDA context current on this thread: the device's own.
    gpu.dev.cuda_stream(gpu.stream())?;
    Ok(Comm::Nccl(super::real::nccl::NcclComm::join(&id, group.rank(), group.world())?))
}

/// The NCCL communicator's id, drawn by rank 0 and sent to every rank over `group` (as
/// floats, which carry bytes exactly). Needs NCCL, not a GPU.
#[cfg(feature = "cudnn")]
pub fn nccl_id(group: &mut dyn Collective) -> Result<[u8; 128]> {
    let mut id = [0f32; 128];
    if group.rank() == 0 {
        id = super::real::nccl::unique_id()?.map(f32::from);
    }
    group.broadcast(&mut id)?;
    Ok(id.map(|b| b as u8))
}

/// Whether NCCL can be used here: its library, with every function the ranks call.
#[cfg(feature = "cudnn")]
pub fn nccl_available() -> Result<()> {
    super::real::nccl::available()
}

impl Gpu {
    /// The collective the data-parallel step averages gradients with.
    pub fn set_comm(&mut self, comm: Comm) {
        self.comm = Some(comm);
    }

    /// Averages fp32 buffers over the ranks in place; `false` without a [`Comm`].
    pub(crate) fn average_over_ranks(&self, bufs: &mut [&mut GpuBuf]) -> Result<bool> {
        let Some(comm) = &self.comm else { return Ok(false) };
        if let Some(b) = bufs.iter().find(|b| b.dtype != DType::F32) {
            bail!(
                "averaging a {} buffer over the ranks: only fp32 gradients are",
                b.dtype.suffix()
            );
        }
        self.status()?;
        match comm {
            Comm::Host(group) => {
                // One all-reduce of every buffer's values, in order.
                let mut flat: Vec<f32> = bufs.iter().flat_map(|b| self.read_now(b)).collect();
                self.status()?;
                let mut group = group.clone();
                group.all_reduce_sum(&mut flat)?;
                let world = group.world() as f32;
                let mut at = 0;
                for b in bufs.iter() {
                    let mean: Vec<f32> = flat[at..at + b.len].iter().map(|v| v / world).collect();
                    self.write_now(b, &mean);
                    at += b.len;
                }
            }
            #[cfg(feature = "cudnn")]
            Comm::Nccl(c) => {
                let Some(stream) = self.dev.cuda_stream(self.stream())? else {
                    bail!("NCCL needs a CUDA device; this one has no CUDA streams");
                };
                let ptrs: Vec<(u64, usize)> = bufs.iter().map(|b| (self.ptr(b), b.len)).collect();
                c.all_reduce_mean(stream as *mut std::ffi::c_void, &ptrs)?;
            }
        }
        Ok(true)
    }
}
