//! The data-parallel step on any backend, with PyTorch DDP's semantics: every rank starts from
//! rank 0's state, trains its own slice of each global batch, and applies the gradient averaged
//! over the ranks, so that all ranks take the same step.

use super::{Collective, SharedGroup};
use crate::backend::{Backend, BatchNormSync};
use crate::model::net::{HostTensor, Net};
use crate::model::TensorKind;
use anyhow::{bail, Result};

/// Rank `rank`'s images of a global batch: the batch is cut into `world` contiguous slices of
/// equal size and rank r takes images `[r·b, (r+1)·b)`, so that W ranks together see exactly
/// what one process with the whole batch sees. The epoch drops a last global batch that does
/// not split evenly, so every rank runs the same number of steps.
pub fn rank_slice(batch: &[usize], rank: usize, world: usize) -> Result<&[usize]> {
    let b = batch.len() / world.max(1);
    if rank >= world || b * world != batch.len() || b == 0 {
        bail!("a global batch of {} images does not split into {world} equal slices", batch.len());
    }
    Ok(&batch[rank * b..(rank + 1) * b])
}

/// Replaces every rank's parameters, running statistics and batch counters with rank 0's.
pub fn broadcast_state<B: Backend<f32>>(
    net: &mut Net<f32, B>, group: &mut dyn Collective,
) -> Result<()> {
    let state = net.state();
    let mut floats: Vec<f32> = Vec::new();
    let mut counts: Vec<f32> = Vec::new();
    for (_, t) in &state {
        match t {
            HostTensor::Float(v) => floats.extend(v),
            // Batch counters are small whole numbers, exact in f32.
            HostTensor::Int(c) => counts.push(*c as f32),
        }
    }
    group.broadcast(&mut floats)?;
    group.broadcast(&mut counts)?;
    let (mut at, mut counts) = (0, counts.into_iter());
    net.load_state(|info| {
        Ok(match info.kind {
            TensorKind::Count => {
                HostTensor::Int(counts.next().expect("one count per counter") as i64)
            }
            _ => {
                let v = floats[at..at + info.numel()].to_vec();
                at += info.numel();
                HostTensor::Float(v)
            }
        })
    })
}

/// Replaces every rank's BatchNorm running statistics with their mean over the ranks (each rank
/// estimated them from its own slices), so that evaluation and checkpoints see one model. Every
/// rank calls it, also with SyncBatchNorm, where it has nothing to do.
pub fn average_running_stats<B: Backend<f32>>(
    net: &mut Net<f32, B>, group: &mut dyn Collective,
) -> Result<()> {
    if net.sync_bn.is_some() {
        // SyncBatchNorm gave every rank the same statistics, bit for bit.
        return Ok(());
    }
    let state = net.state();
    let mut stats: Vec<f32> = state
        .iter()
        .filter(|(info, _)| info.kind == TensorKind::RunningStat)
        .flat_map(|(_, t)| match t {
            HostTensor::Float(v) => v.clone(),
            HostTensor::Int(_) => Vec::new(),
        })
        .collect();
    group.all_reduce_sum(&mut stats)?;
    let world = group.world() as f32;
    let mut at = 0;
    let mut old = state.into_iter();
    net.load_state(|info| {
        let (_, t) = old.next().expect("load_state asks in state() order");
        if info.kind != TensorKind::RunningStat {
            return Ok(t);
        }
        let v = stats[at..at + info.numel()].iter().map(|s| s / world).collect();
        at += info.numel();
        Ok(HostTensor::Float(v))
    })
}

/// Averages every parameter gradient over the ranks, and sums `metrics` (the step's loss sum,
/// correct count, …) over them. A backend with a collective of its own (NCCL on a GPU) averages
/// the gradients where they are, and `group` carries the metrics; otherwise one all-reduce over
/// `group` carries both. To be called between the backward and the optimizer step, on every
/// rank.
pub fn average_gradients<B: Backend<f32>>(
    net: &mut Net<f32, B>, group: &mut dyn Collective, metrics: &mut [f32],
) -> Result<()> {
    if net.average_grads_on_device()? {
        return group.all_reduce_sum(metrics);
    }
    let world = group.world() as f32;
    net.update_grads(|flat| {
        let n = flat.len();
        flat.extend_from_slice(metrics);
        group.all_reduce_sum(flat)?;
        metrics.copy_from_slice(&flat[n..]);
        flat.truncate(n);
        for g in flat.iter_mut() {
            *g /= world;
        }
        Ok(())
    })
}

/// SyncBatchNorm over a group ([`BatchNormSync`]): the statistics are summed in `f64` with
/// the group's all-reduce.
pub struct GroupBatchNormSync {
    group: SharedGroup,
    place: (usize, usize),
    failed: std::sync::Mutex<Option<anyhow::Error>>,
}

impl GroupBatchNormSync {
    pub fn new(group: SharedGroup) -> Self {
        let place = (group.rank(), group.world());
        GroupBatchNormSync { group, place, failed: std::sync::Mutex::new(None) }
    }
}

impl BatchNormSync for GroupBatchNormSync {
    fn rank(&self) -> usize {
        self.place.0
    }
    fn world(&self) -> usize {
        self.place.1
    }
    fn sum(&self, values: &mut [f64]) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.is_some() {
            return;
        }
        // A handle of the shared group: the call holds the group alone.
        if let Err(e) = self.group.clone().all_reduce_sum_f64(values) {
            *failed = Some(e);
        }
    }
    fn check(&self) -> Result<()> {
        match self.failed.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_global_batch_is_cut_into_contiguous_equal_slices() {
        let batch: Vec<usize> = (10..16).collect();
        assert_eq!(rank_slice(&batch, 0, 3).unwrap(), &[10, 11]);
        assert_eq!(rank_slice(&batch, 2, 3).unwrap(), &[14, 15]);
        assert!(rank_slice(&batch, 1, 1).is_err());
        let err = rank_slice(&batch, 0, 4).unwrap_err().to_string();
        assert!(err.contains("6 images does not split into 4"), "{err}");
    }
}
