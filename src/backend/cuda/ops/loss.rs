//! The fused softmax cross-entropy (`cuda/loss.cu`) and the step's metrics on the device.

use super::*;

impl Gpu {
    /// Σ loss·n and Σ correct of the steps whose metrics stayed on the device since the last
    /// call ([`LossOps::cross_entropy_forward_summed`]); reading them waits for those steps.
    ///
    /// [`LossOps::cross_entropy_forward_summed`]: crate::backend::LossOps::cross_entropy_forward_summed
    pub fn take_step_sums(&self) -> anyhow::Result<(f64, u64)> {
        if self.slots.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
            return Ok((0.0, 0));
        }
        self.take_error()?;
        let s = self.stream();
        let mut bytes = [0u8; 16];
        self.with_slots(0, |st| {
            self.dev.dtoh(s, &mut bytes, st.sums.ptr())?;
            self.dev.memset(s, st.sums.ptr(), 0, 16)
        })
        .map_err(|e| anyhow::anyhow!("reading the training metrics: {e:#}"))?;
        let loss = f64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let correct = f64::from_le_bytes(bytes[8..].try_into().expect("8 bytes"));
        Ok((loss, correct.max(0.0) as u64))
    }

    /// The fused softmax cross-entropy over the rows of `labels`: the labels are staged into
    /// the step slots, `probs` receives (softmax − target)/N (the gradient the backward hands
    /// on), the mean loss and the correct count go to their slots, whose addresses are
    /// returned (`None` after a failure, which is recorded).
    fn cross_entropy_into_slots(
        &self, probs: &mut Buf, logits: &Buf, labels: &[u32], k: usize, smoothing: f64,
    ) -> Option<(u64, u64)> {
        if self.failed() {
            return None;
        }
        let n = labels.len();
        let staged = self
            .stage_labels(labels)
            .and_then(|labels| self.with_slots(n, |s| Ok((labels, s.loss.ptr(), s.correct.ptr()))));
        let (labels, loss, correct) = match staged {
            Ok(p) => p,
            Err(e) => {
                self.record("copying labels to the GPU", e);
                return None;
            }
        };
        self.launch_cross_entropy(probs, logits, labels, (loss, correct), (n, k), smoothing);
        Some((loss, correct))
    }

    /// The loss of an op-by-op step, read back (which waits for the step so far).
    pub(super) fn cross_entropy(
        &self, probs: &mut Buf, logits: &Buf, labels: &[u32], k: usize, smoothing: f64,
    ) -> f64 {
        let Some((loss, _)) = self.cross_entropy_into_slots(probs, logits, labels, k, smoothing)
        else {
            return f64::NAN;
        };
        // On the main stream, which has joined every branch stream by now.
        let mut bytes = [0u8; 4];
        match self.dev.dtoh(self.stream(), &mut bytes, loss) {
            Ok(()) => f32::from_le_bytes(bytes) as f64,
            Err(e) => {
                self.record("copying the loss from the GPU", e);
                f64::NAN
            }
        }
    }

    /// The loss of a step whose metrics stay on the device: added to the step sums, nothing
    /// read back (a replayed step cannot read).
    pub(super) fn cross_entropy_summed(
        &self, probs: &mut Buf, logits: &Buf, labels: &[u32], k: usize, smoothing: f64,
    ) {
        let Some((loss, correct)) =
            self.cross_entropy_into_slots(probs, logits, labels, k, smoothing)
        else {
            return;
        };
        let sums = match self.with_slots(0, |s| Ok(s.sums.ptr())) {
            Ok(p) => p,
            Err(e) => return self.record("accumulate_step_metrics", e),
        };
        let args = [Ptr(sums), Ptr(loss), Ptr(correct), I32(labels.len() as i32)];
        self.launch("accumulate_step_metrics", ONE_THREAD, &args);
    }

    /// `cross_entropy_forward_backward` over `n` rows of `k` logits: `labels` and `(loss,
    /// correct)` are device addresses; dlogits (into `probs`) carry the loss scale, if any.
    fn launch_cross_entropy(
        &self, probs: &mut Buf, logits: &Buf, labels: u64, (loss, correct): (u64, u64),
        (n, k): (usize, usize), smoothing: f64,
    ) {
        let scale = self.loss_scale.as_ref().map_or(0, |ls| ls.scale.ptr());
        let args = [
            Ptr(self.ptr(probs)),
            Ptr(loss),
            Ptr(correct),
            Ptr(self.ptr(logits)),
            Ptr(labels),
            I32(n as i32),
            I32(k as i32),
            F32(smoothing as f32),
            Ptr(scale), // null on the fp32 path, which does not scale
        ];
        let threads = ((32 * n as u32).min(1024)).div_ceil(32) * 32;
        let launch = LaunchDims::linear(1, threads.max(32));
        self.launch("cross_entropy_forward_backward", launch, &args);
    }
}

impl LossOps<f32> for Gpu {
    fn cross_entropy_forward(
        &self, probs: &mut Buf, logits: &Buf, labels: &[u32], k: usize, smoothing: f64,
    ) -> f64 {
        if !self.expect_f32("cross_entropy_forward logits", logits)
            || !self.expect_f32("cross_entropy_forward softmax", probs)
        {
            return f64::NAN;
        }
        self.cross_entropy(probs, logits, labels, k, smoothing)
    }

    fn cross_entropy_forward_summed(
        &self, probs: &mut Buf, logits: &Buf, labels: &[u32], k: usize, smoothing: f64,
    ) {
        if self.expect_f32("cross_entropy_forward logits", logits)
            && self.expect_f32("cross_entropy_forward softmax", probs)
        {
            self.cross_entropy_summed(probs, logits, labels, k, smoothing)
        }
    }

    fn cross_entropy_backward(
        &self, dlogits: &mut Buf, probs: &Buf, _labels: &[u32], _k: usize, _smoothing: f64,
    ) {
        // The forward kernel already wrote (softmax − target)/N (× the loss scale in mixed
        // precision) into `probs`.
        if !self.usable(&[probs, dlogits]) {
            return;
        }
        let bytes = probs.len * probs.dtype.size();
        if let Err(e) =
            self.dev.dtod(self.current_stream(), self.ptr(dlogits), self.ptr(probs), bytes)
        {
            self.record("cross_entropy_backward copy", e);
        }
    }
}
