//! SGD with momentum, weight decay and Nesterov, and the mixed-precision gradient unscaling
//! and loss-scale update around it (`cuda/optim.cu`).

use super::*;

impl Gpu {
    /// torch.optim.SGD over one parameter at the learning rate of the step slots; with
    /// `found_inf` (a device flag, 0 for none) the kernel does nothing when the flag is set.
    pub(super) fn sgd(
        &self, param: &mut Buf, grad: &Buf, momentum_buf: &mut Buf, first_step: bool, opt: &Sgd,
        found_inf: u64,
    ) {
        let lr = match self.stage_lr(opt.lr as f32) {
            Ok(p) => p,
            Err(e) => return self.record("copying the learning rate to the GPU", e),
        };
        let args = [
            Ptr(self.ptr(param)),
            Ptr(self.ptr(grad)),
            Ptr(self.ptr(momentum_buf)),
            I32(param.len as i32),
            Ptr(lr),
            F32(opt.momentum as f32),
            F32(opt.weight_decay as f32),
            I32(opt.nesterov as i32),
            I32(first_step as i32),
            Ptr(found_inf),
        ];
        self.launch("sgd_step", self.strided(param.len), &args);
    }
}

impl OptimOps<f32> for Gpu {
    fn sgd_step_all(&self, params: &mut [SgdParam<'_, Buf>], first_step: bool, opt: &Sgd) {
        match &self.loss_scale {
            None => {
                for p in params.iter_mut() {
                    self.sgd(p.value, p.grad, p.momentum, first_step, opt, 0);
                }
            }
            Some(ls) => {
                let (scale, found_inf) = (ls.scale.ptr(), ls.found_inf.ptr());
                // Every gradient is unscaled and checked before any parameter moves, so an
                // overflow anywhere skips the whole step (on the device, without a sync).
                for p in params.iter_mut() {
                    let g = self.ptr(p.grad);
                    let args = [Ptr(g), Ptr(g), I32(p.grad.len as i32), Ptr(scale), Ptr(found_inf)];
                    self.launch("amp_unscale_f32", self.strided(p.grad.len), &args);
                }
                for p in params.iter_mut() {
                    self.sgd(p.value, p.grad, p.momentum, first_step, opt, found_inf);
                }
                let (growth, skipped) = (ls.growth.ptr(), ls.skipped.ptr());
                let args = [
                    Ptr(scale),
                    Ptr(growth),
                    Ptr(found_inf),
                    Ptr(skipped),
                    F32(LOSS_SCALE_GROWTH),
                    F32(LOSS_SCALE_BACKOFF),
                    I32(LOSS_SCALE_INTERVAL),
                ];
                self.launch("update_loss_scale", ONE_THREAD, &args);
            }
        }
        for p in params.iter() {
            p.value.shadow_fresh.store(false, Ordering::Release);
        }
    }

    fn sgd_step(
        &self, param: &mut Buf, grad: &Buf, momentum_buf: &mut Buf, first_step: bool, opt: &Sgd,
    ) {
        self.sgd(param, grad, momentum_buf, first_step, opt, 0);
        param.shadow_fresh.store(false, Ordering::Release);
    }
}
