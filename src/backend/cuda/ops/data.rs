//! The training set resident on the GPU and the batches built from it there
//! (`cuda/data.cu`: crop, flip, normalise).

use super::*;

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
    pub(super) fn launch_augment(
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
