//! ReLU alone (`cuda/elementwise.cu`); fused into BatchNorm it lives in `batch_norm`.

use super::*;

impl ElementwiseOps<f32> for Gpu {
    fn relu_forward(&self, y: &mut Buf, x: &Buf) {
        let args = [Ptr(self.ptr(y)), Ptr(self.ptr(x)), I32(x.len as i32)];
        self.launch(&typed("relu_forward", x.dtype), elementwise(x.len), &args);
    }

    fn relu_backward(&self, dy: &mut Buf, y: &Buf) {
        let args = [Ptr(self.ptr(dy)), Ptr(self.ptr(y)), I32(y.len as i32)];
        self.launch(&typed("relu_backward", y.dtype), elementwise(y.len), &args);
    }
}
