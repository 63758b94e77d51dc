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

impl BatchNormOps<f32> for Gpu {
    /// The statistics kernel, then the apply (with the ReLU when `relu`).
    fn batch_norm_forward_train(
        &self, y: &mut Buf, x: &Buf, Affine { gamma, beta }: Affine<&Buf>,
        running: RunningStats<&mut Buf>, batch: BatchStats<&mut Buf>, xs: Nhwc, cfg: &BatchNormCfg,
        relu: bool, sync: Option<&dyn BatchNormSync>,
    ) -> anyhow::Result<()> {
        crate::backend::check_batch_norm_train(xs)?;
        if sync.is_some() {
            anyhow::bail!(
                "SyncBatchNorm (--sync-bn) runs on the CPU backend; the CUDA backend trains one process"
            );
        }
        let BatchStats { mean, invstd } = batch;
        self.bn_stats(mean, invstd, running.mean, running.var, x, xs, cfg);
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
        // The forward refused it: the backward never gets one.
        debug_assert!(sync.is_none(), "SyncBatchNorm on the CUDA backend");
        let (p, c) = (xs.pixels() as i32, xs.c as i32);
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
        let rest = [Ptr(cp), I32(p), I32(c), I32(relu)];
        let args = [&[Ptr(self.ptr(dx))][..], &masked_dy, &rest].concat();
        self.launch(
            &typed("batch_norm_relu_backward_apply", x.dtype),
            self.strided(xs.len()),
            &args,
        );
    }
}
