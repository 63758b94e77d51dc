//! ReLU and its gradient.

use super::*;

/// ReLU as PyTorch computes it: `x < 0` rather than `x <= 0`, so NaN passes through.
#[inline]
pub(super) fn relu<T: Elem>(v: T) -> T {
    if v < T::zero() {
        T::zero()
    } else {
        v
    }
}

/// The gradient ReLU lets through: `y <= 0` blocks it (a NaN output keeps its gradient, as in
/// PyTorch).
#[inline]
pub(super) fn relu_grad<T: Elem>(g: T, y: T) -> T {
    if y <= T::zero() {
        T::zero()
    } else {
        g
    }
}

impl<T: Elem> ElementwiseOps<T> for Cpu {
    fn relu_forward(&self, y: &mut Vec<T>, x: &Vec<T>) {
        y.par_iter_mut().zip(x.par_iter()).for_each(|(y, x)| *y = relu(*x));
    }

    fn relu_backward(&self, dy: &mut Vec<T>, y: &Vec<T>) {
        // A select on every element rather than a conditional store: about half the outputs
        // are zero in no predictable pattern, and the select vectorises.
        dy.par_chunks_mut(4096).zip(y.par_chunks(4096)).for_each(|(g, y)| {
            for (g, y) in g.iter_mut().zip(y) {
                *g = relu_grad(*g, *y);
            }
        });
    }
}
