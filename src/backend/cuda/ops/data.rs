//! The training set resident on the GPU and the batches built from it there
//! (`cuda/data.cu`: crop, flip, normalise).

use super::*;

/// Values per CIFAR image (32×32×3).
const IMAGE: usize = 3072;

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
        let err =
            |e| anyhow::anyhow!("copying the training set to the GPU ({} MB): {e}", total >> 20);
        let bytes = match alloc_mem(&self.dev, self.current_stream(), total) {
            Ok(b) => b,
            Err(e) => {
                let what = format!("the training set ({} records)", total / RECORD);
                let msg = oom_message(&what, total.max(1), self.mem_info(), &e.to_string());
                anyhow::bail!(msg);
            }
        };
        let mut at = 0;
        for chunk in set.record_chunks() {
            self.dev.htod(self.current_stream(), bytes.ptr() + at as u64, chunk).map_err(err)?;
            at += chunk.len();
        }
        let norm: Vec<u8> = MEAN.iter().chain(STD.iter()).flat_map(|v| v.to_le_bytes()).collect();
        let norm = self.uploaded(&norm).map_err(err)?;
        Ok(DeviceRecords { bytes, records: total / RECORD, norm })
    }

    /// Renders the training batch of records `indices`, image `j` cropped by `views[j].0/1`
    /// (dy, dx in −4..=4) and mirrored when `views[j].2`, normalised, into an activation
    /// buffer (NHWC, the activation type): `make_batch` on the device (`cuda/data.cu`). The
    /// draws go through the step slots, as in a replayed step.
    pub fn augment_batch(
        &self, records: &DeviceRecords, indices: &[usize], views: &[(i32, i32, bool)],
    ) -> Buf {
        let mut out = self.act_zeros(indices.len() * IMAGE);
        if self.failed() {
            return out;
        }
        match self.stage_draws(indices, views) {
            Ok(_) => self.augment_staged(records, &mut out),
            Err(e) => self.record("augment_batch", e),
        }
        out
    }

    /// The data kernel renders the batch whose draws are in the step slots (staged by
    /// [`Gpu::stage_step`] or [`Gpu::augment_batch`]) into `out`, of `out.len / 3072` images.
    pub fn augment_staged(&self, records: &DeviceRecords, out: &mut Buf) {
        let b = out.len / IMAGE;
        if b == 0 {
            return self.record("augment_batch", "an empty batch");
        }
        match self.with_slots(b, |s| Ok(s.draws.ptr())) {
            Ok(draws) => self.launch_augment(out, records, draws, b),
            Err(e) => self.record("augment_batch", e),
        }
    }

    /// `augment_batch_*` over `b` images into `out`: `draws` is the device address of the
    /// 4·b ints (indices, dy, dx, flip).
    fn launch_augment(&self, out: &Buf, records: &DeviceRecords, draws: u64, b: usize) {
        let (rp, np) = (records.bytes.ptr(), records.norm.ptr());
        let at = |k: usize| draws + (k * b * 4) as u64;
        let args = [
            Ptr(self.ptr(out)),
            Ptr(rp),
            I32(records.records as i32),
            Ptr(at(0)),
            Ptr(at(1)),
            Ptr(at(2)),
            Ptr(at(3)),
            Ptr(np),
            Ptr(np + 12), // STD follows MEAN
            I32(b as i32),
        ];
        let launch = LaunchDims {
            grid: [12, (b as u32).min(65535), 1],
            block: [256, 1, 1],
            shared_bytes: 0,
        };
        self.launch(&typed("augment_batch", out.dtype), launch, &args);
    }

    pub(super) fn upload_as(&self, data: &[f32], dt: DType) -> Buf {
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
