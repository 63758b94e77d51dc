//! BatchNorm, alone and fused with the ReLU that follows it (`cuda/batch_norm.cu`): batch
//! statistics by a grid-wide reduction, the normalisation, and the backward's two passes.

// The ops take the arguments `BatchNormOps` declares for them, one for one.
#![allow(clippy::too_many_arguments)]

use super::*;

impl Gpu {
    /// The BatchNorm reductions' launch for a [P, C] tensor on this GPU.
    pub(super) fn reduction(&self, p: usize, c: usize) -> Reduction {
        geometry::batch_norm(p, c, self.sm_count())
    }

    /// The zeroed counters and a workspace of the reduction kernels, grown as needed. The
    /// kernels leave the counters zero again, so one pair serves every launch on this stream.
    pub(super) fn reduction_buffers(&self, r: &Reduction) -> (u64, u64) {
        let mut b = self.lane().bn_scratch.lock().unwrap_or_else(|p| p.into_inner());
        // A failed growth leaves the old, smaller buffers, which no launch then reads: the
        // failure is recorded and `launch` runs nothing until it is reported.
        if b.0.as_ref().is_none_or(|w| w.bytes() < 8 * r.workspace) {
            // The partial sums are written before they are read: no zeroing.
            match alloc_mem(&self.dev, self.current_stream(), 8 * r.workspace) {
                Ok(w) => b.0 = Some(w),
                Err(e) => self.record_oom(
                    "the partial sums of a per-channel reduction",
                    8 * r.workspace,
                    e,
                ),
            }
        }
        if b.1.as_ref().is_none_or(|c| c.bytes() < 4 * r.counters) {
            match self.zeroed(4 * r.counters) {
                Ok(c) => b.1 = Some(c),
                Err(e) => {
                    self.record_oom("the counters of a per-channel reduction", 4 * r.counters, e)
                }
            }
        }
        (b.0.as_ref().map_or(0, DevMem::ptr), b.1.as_ref().map_or(0, DevMem::ptr))
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_stats(
        &self, mean: &mut Buf, invstd: &mut Buf, running_mean: &mut Buf, running_var: &mut Buf,
        x: &Buf, xs: Nhwc, cfg: &BatchNormCfg,
    ) {
        let (p, c) = (xs.pixels() as i32, xs.c as i32);
        let r = self.reduction(xs.pixels(), xs.c);
        let (ws, counters) = self.reduction_buffers(&r);
        let args = [
            Ptr(self.ptr(mean)),
            Ptr(self.ptr(invstd)),
            Ptr(self.ptr(running_mean)),
            Ptr(self.ptr(running_var)),
            Ptr(ws),
            Ptr(counters),
            Ptr(self.ptr(x)),
            I32(p),
            I32(c),
            F32(cfg.eps as f32),
            F32(cfg.momentum as f32),
        ];
        self.launch(&typed("batch_norm_stats", x.dtype), config(&r), &args);
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn bn_apply(
        &self, y: &mut Buf, x: &Buf, mean: &Buf, invstd: &Buf, gamma: &Buf, beta: &Buf, xs: Nhwc,
        relu: bool,
    ) {
        let (p, c) = (xs.pixels() as i32, xs.c as i32);
        let args = [
            Ptr(self.ptr(y)),
            I32(c), // ldy: a plain [P, C] output
            I32(0), // y_off
            Ptr(self.ptr(x)),
            Ptr(self.ptr(mean)),
            Ptr(self.ptr(invstd)),
            Ptr(self.ptr(gamma)),
            Ptr(self.ptr(beta)),
            I32(p),
            I32(c),
            I32(relu as i32),
        ];
        self.launch(&typed("batch_norm_relu_apply", x.dtype), self.strided(xs.len()), &args);
    }

    pub(super) fn bn_eval_invstd(
        &self, invstd: &mut Buf, running_var: &Buf, c: usize, cfg: &BatchNormCfg,
    ) {
        let args =
            [Ptr(self.ptr(invstd)), Ptr(self.ptr(running_var)), I32(c as i32), F32(cfg.eps as f32)];
        let launch = LaunchDims::linear((c as u32).div_ceil(128), 128);
        self.launch("batch_norm_eval_invstd", launch, &args);
    }
}

/// SyncBatchNorm on the GPU, through the host: the few per-channel numbers each BatchNorm
/// exchanges are read back, combined over the ranks as the CPU backend does, and written
/// into the buffers the kernels read next. A round trip per BatchNorm per step, so this is
/// for correctness (and the emulated GPU), not speed.
impl Gpu {
    /// Replaces this rank's batch statistics (which the statistics kernel just computed, and
    /// folded into the running ones) by the global batch's, and redoes the running update
    /// from `before` with them. The variance comes back from 1/√(var + eps), as PyTorch's
    /// SyncBatchNorm also recovers it.
    fn sync_stats(
        &self, sync: &dyn BatchNormSync, batch: BatchStats<&mut Buf>,
        running: RunningStats<&mut Buf>, (mean0, var0): (Vec<f32>, Vec<f32>), xs: Nhwc,
        cfg: &BatchNormCfg,
    ) -> anyhow::Result<()> {
        let m = xs.pixels();
        let mu: Vec<f64> = self.read_now(batch.mean).iter().map(|&v| v as f64).collect();
        let s2: Vec<f64> = self
            .read_now(batch.invstd)
            .iter()
            .map(|&inv| (1.0 / (inv as f64).powi(2) - cfg.eps).max(0.0) * m as f64)
            .collect();
        let (total, mu, s2) = crate::backend::global_moments(sync, m, mu, s2);
        let var: Vec<f64> = s2.iter().map(|s| s / total as f64).collect();
        let unbiased = total as f64 / (total - 1) as f64;
        let k = cfg.momentum;
        let f = |v: f64| v as f32;
        self.write_now(batch.mean, &mu.iter().map(|&v| f(v)).collect::<Vec<_>>());
        let inv: Vec<f32> = var.iter().map(|v| f(1.0 / (v + cfg.eps).sqrt())).collect();
        self.write_now(batch.invstd, &inv);
        let rm: Vec<f32> =
            mean0.iter().zip(&mu).map(|(&o, &b)| f((1.0 - k) * o as f64 + k * b)).collect();
        let rv: Vec<f32> = var0
            .iter()
            .zip(&var)
            .map(|(&o, &v)| f((1.0 - k) * o as f64 + k * v * unbiased))
            .collect();
        self.write_now(running.mean, &rm);
        self.write_now(running.var, &rv);
        sync.check()
    }

    /// Rewrites the backward's coefficients `coef` ([γ·invstd, −γ·invstd²·Σdy·x̂/P,
    /// −γ·invstd·Σdy/P] per channel) with the sums and count of every rank: this rank's sums
    /// are what the reduction just added to the affine gradients (from `before`).
    fn sync_backward_coef(
        &self, sync: &dyn BatchNormSync, coef: &Buf, daffine: Affine<&Buf>,
        (dgamma0, dbeta0): (Vec<f32>, Vec<f32>), (gamma, invstd): (&Buf, &Buf), m: usize,
    ) {
        let dgamma = self.read_now(daffine.gamma);
        let dbeta = self.read_now(daffine.beta);
        let c = dgamma.len();
        let mut sums: Vec<f64> = dbeta.iter().zip(&dbeta0).map(|(a, b)| (a - b) as f64).collect();
        sums.extend(dgamma.iter().zip(&dgamma0).map(|(a, b)| (a - b) as f64));
        sums.push(m as f64);
        sync.sum(&mut sums);
        let total = sums[2 * c];
        let (g, inv) = (self.read_now(gamma), self.read_now(invstd));
        let mut out = vec![0f32; 3 * c];
        for ch in 0..c {
            let inv = inv[ch] as f64;
            let k = g[ch] as f64 * inv / total;
            out[ch] = (k * total) as f32;
            out[c + ch] = (-k * sums[c + ch] * inv) as f32;
            out[2 * c + ch] = (-k * sums[ch]) as f32;
        }
        self.write_now(coef, &out);
    }
}

impl BatchNormOps<f32> for Gpu {
    /// The statistics kernel, then the apply (with the ReLU when `relu`).
    fn batch_norm_forward_train(
        &self, y: &mut Buf, x: &Buf, Affine { gamma, beta }: Affine<&Buf>,
        running: RunningStats<&mut Buf>, batch: BatchStats<&mut Buf>, xs: Nhwc, cfg: &BatchNormCfg,
        relu: bool, sync: Option<&dyn BatchNormSync>,
    ) -> anyhow::Result<()> {
        crate::backend::check_batch_norm_train(xs)?;
        let BatchStats { mean, invstd } = batch;
        let before = sync.map(|_| (self.read_now(running.mean), self.read_now(running.var)));
        self.bn_stats(mean, invstd, running.mean, running.var, x, xs, cfg);
        if let (Some(sync), Some(before)) = (sync, before) {
            self.sync_stats(sync, BatchStats { mean, invstd }, running, before, xs, cfg)?;
        }
        self.bn_apply(y, x, mean, invstd, gamma, beta, xs, relu);
        Ok(())
    }

    /// 1/σ from the running variance, then the apply.
    fn batch_norm_forward_eval(
        &self, y: &mut Buf, x: &Buf, Affine { gamma, beta }: Affine<&Buf>,
        running: RunningStats<&Buf>, xs: Nhwc, cfg: &BatchNormCfg, relu: bool,
    ) {
        let mut invstd = self.f32_zeros("the eval-mode 1/σ of a BatchNorm", xs.c);
        self.bn_eval_invstd(&mut invstd, running.var, xs.c, cfg);
        self.bn_apply(y, x, running.mean, &invstd, gamma, beta, xs, relu);
    }

    /// The kernels mask dy by `relu_out > 0` as they read it.
    fn batch_norm_backward(
        &self, dx: &mut Buf, daffine: Affine<&mut Buf>, dy: &Buf, relu_out: Option<&Buf>, x: &Buf,
        gamma: &Buf, BatchStats { mean, invstd }: BatchStats<&Buf>, xs: Nhwc,
        sync: Option<&dyn BatchNormSync>,
    ) {
        let (p, c) = (xs.pixels() as i32, xs.c as i32);
        // With SyncBatchNorm: the affine gradients before this layer's sums are added.
        let daffine_before =
            sync.map(|_| (self.read_now(daffine.gamma), self.read_now(daffine.beta)));
        let coef = self.f32_zeros("the backward coefficients of a BatchNorm", 3 * xs.c);
        let r = self.reduction(xs.pixels(), xs.c);
        let (ws, counters) = self.reduction_buffers(&r);
        let (dyp, xp, mp, cp) = (self.ptr(dy), self.ptr(x), self.ptr(mean), self.ptr(&coef));
        // Without the ReLU (relu = 0) y is never read: dy stands in for it.
        let (yp, relu) = relu_out.map_or((dyp, 0), |y| (self.ptr(y), 1));
        // Both kernels read dy masked by y, and x − mean: dy and y as plain [P, C] tensors
        // (ld = C, offset 0).
        let masked_dy = [Ptr(dyp), I32(c), I32(0), Ptr(yp), I32(c), I32(0), Ptr(xp), Ptr(mp)];
        let (dg, db) = (self.ptr(daffine.gamma), self.ptr(daffine.beta));
        let sums = [Ptr(cp), Ptr(dg), Ptr(db), Ptr(ws), Ptr(counters)];
        let rest = [Ptr(self.ptr(invstd)), Ptr(self.ptr(gamma)), I32(p), I32(c), I32(relu)];
        let args = [&sums[..], &masked_dy, &rest].concat();
        self.launch(&typed("batch_norm_relu_backward_reduce", x.dtype), config(&r), &args);
        if let (Some(sync), Some(before)) = (sync, daffine_before) {
            let affine = Affine { gamma: &*daffine.gamma, beta: &*daffine.beta };
            self.sync_backward_coef(sync, &coef, affine, before, (gamma, invstd), xs.pixels());
        }
        let rest = [Ptr(cp), I32(p), I32(c), I32(relu)];
        let args = [&[Ptr(self.ptr(dx))][..], &masked_dy, &rest].concat();
        self.launch(
            &typed("batch_norm_relu_backward_apply", x.dtype),
            self.strided(xs.len()),
            &args,
        );
    }
}
