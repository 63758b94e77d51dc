//! SGD with momentum, weight decay and Nesterov, as PyTorch's `torch.optim.SGD`.

use super::*;

impl<T: Elem> OptimOps<T> for Cpu {
    fn sgd_step(
        &self, param: &mut Vec<T>, grad: &Vec<T>, momentum_buf: &mut Vec<T>, first_step: bool,
        opt: &Sgd,
    ) {
        let (lr, mu, wd) = (T::cast(opt.lr), T::cast(opt.momentum), T::cast(opt.weight_decay));
        for ((p, g), b) in param.iter_mut().zip(grad).zip(momentum_buf.iter_mut()) {
            let g = *g + wd * *p;
            let step = if opt.momentum == 0.0 {
                g
            } else {
                *b = if first_step { g } else { mu * *b + g };
                if opt.nesterov {
                    g + mu * *b
                } else {
                    *b
                }
            };
            *p -= lr * step;
        }
    }
}
