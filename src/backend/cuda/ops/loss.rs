//! The fused softmax cross-entropy (`cuda/loss.cu`) and the step's metrics on the device.

use super::*;

impl Gpu {
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

    /// Runs the fused softmax cross-entropy: `probs` receives (softmax − target)/N, the
    /// gradient the backward hands on. Returns the mean loss (reading it back synchronises).
    pub(super) fn cross_entropy(
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
    pub(super) fn launch_cross_entropy(
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
    pub(super) fn cross_entropy_captured(
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
}

pub(super) fn cross_entropy_forward(
    gpu: &Gpu,
    probs: &mut Buf,
    logits: &Buf,
    labels: &[u32],
    k: usize,
    smoothing: f64,
) -> f64 {
    if !gpu.expect_f32("cross_entropy_forward logits", logits)
        || !gpu.expect_f32("cross_entropy_forward softmax", probs)
    {
        return f64::NAN;
    }
    gpu.cross_entropy(probs, logits, labels, k, smoothing)
}

pub(super) fn cross_entropy_backward(
    gpu: &Gpu,
    dlogits: &mut Buf,
    probs: &Buf,
    _labels: &[u32],
    _k: usize,
    _smoothing: f64,
) {
    // The forward kernel already wrote (softmax − target)/N (× the loss scale in mixed
    // precision) into `probs`.
    if !gpu.usable(&[probs, dlogits]) {
        return;
    }
    let bytes = probs.len * probs.dtype.size();
    if let Err(e) = gpu
        .dev
        .dtod(gpu.cur(), gpu.ptr(dlogits), gpu.ptr(probs), bytes)
    {
        gpu.record("cross_entropy_backward copy", e);
    }
}
