//! SGD with momentum, weight decay and Nesterov, as PyTorch's `torch.optim.SGD`.

use super::*;

pub(super) fn sgd_step<T: Elem>(
    param: &mut [T],
    grad: &[T],
    momentum_buf: &mut [T],
    first_step: bool,
    opt: &Sgd,
) {
    let (lr, mu, wd) = (
        T::cast(opt.lr),
        T::cast(opt.momentum),
        T::cast(opt.weight_decay),
    );
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
