//! ReLU alone (`cuda/elementwise.cu`); fused into BatchNorm it lives in `batch_norm`.

use super::*;

pub(super) fn relu_forward(gpu: &Gpu, y: &mut Buf, x: &Buf) {
    let args = [P(gpu.ptr(y)), P(gpu.ptr(x)), I(x.len as i32)];
    gpu.launch(&typed("relu_forward", x.dtype), elementwise(x.len), &args);
}

pub(super) fn relu_backward(gpu: &Gpu, dy: &mut Buf, y: &Buf) {
    let args = [P(gpu.ptr(dy)), P(gpu.ptr(y)), I(y.len as i32)];
    gpu.launch(&typed("relu_backward", y.dtype), elementwise(y.len), &args);
}
