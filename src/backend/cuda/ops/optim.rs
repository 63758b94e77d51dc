//! SGD with momentum, weight decay and Nesterov, and the mixed-precision gradient unscaling
//! and loss-scale update around it (`cuda/optim.cu`).

use super::*;

impl Gpu {
    /// The learning rate's device slot inside a captured step (0 otherwise: the lr argument).
    pub(super) fn lr_device(&self) -> u64 {
        if !self.capturing() {
            return 0;
        }
        let step = self.step.lock().unwrap_or_else(|p| p.into_inner());
        step.as_ref().map_or(0, |st| st.lr.ptr())
    }

    /// torch.optim.SGD over one parameter; with `found_inf` (a device flag, 0 for none) the
    /// kernel does nothing when the flag is set.
    pub(super) fn sgd(
        &self,
        param: &mut Buf,
        grad: &Buf,
        momentum_buf: &mut Buf,
        first_step: bool,
        opt: &Sgd,
        found_inf: u64,
    ) {
        let args = [
            P(self.ptr(param)),
            P(self.ptr(grad)),
            P(self.ptr(momentum_buf)),
            I(param.len as i32),
            F(opt.lr as f32),
            F(opt.momentum as f32),
            F(opt.weight_decay as f32),
            I(opt.nesterov as i32),
            I(first_step as i32),
            P(found_inf),
            P(self.lr_device()), // in a captured step, the lr set before each replay
        ];
        self.launch("sgd_step", self.strided(param.len), &args);
    }
}

pub(super) fn sgd_step_all(
    gpu: &Gpu,
    params: &mut [SgdParam<'_, Buf>],
    first_step: bool,
    opt: &Sgd,
) {
    match &gpu.loss_scale {
        None => {
            for p in params.iter_mut() {
                gpu.sgd(p.value, p.grad, p.momentum, first_step, opt, 0);
            }
        }
        Some(ls) => {
            let (scale, found_inf) = (ls.scale.ptr(), ls.found_inf.ptr());
            // Every gradient is unscaled and checked before any parameter moves, so an
            // overflow anywhere skips the whole step (on the device, without a sync).
            for p in params.iter_mut() {
                let g = gpu.ptr(p.grad);
                let args = [P(g), P(g), I(p.grad.len as i32), P(scale), P(found_inf)];
                gpu.launch("amp_unscale_f32", gpu.strided(p.grad.len), &args);
            }
            for p in params.iter_mut() {
                gpu.sgd(p.value, p.grad, p.momentum, first_step, opt, found_inf);
            }
            let (growth, skipped) = (ls.growth.ptr(), ls.skipped.ptr());
            let args = [
                P(scale),
                P(growth),
                P(found_inf),
                P(skipped),
                F(LOSS_SCALE_GROWTH),
                F(LOSS_SCALE_BACKOFF),
                I(LOSS_SCALE_INTERVAL),
            ];
            gpu.launch("update_loss_scale", ONE_THREAD, &args);
        }
    }
    for p in params.iter() {
        p.value.shadow_fresh.store(false, Ordering::Release);
    }
}

pub(super) fn sgd_step(
    gpu: &Gpu,
    param: &mut Buf,
    grad: &Buf,
    momentum_buf: &mut Buf,
    first_step: bool,
    opt: &Sgd,
) {
    gpu.sgd(param, grad, momentum_buf, first_step, opt, 0);
    param.shadow_fresh.store(false, Ordering::Release);
}
