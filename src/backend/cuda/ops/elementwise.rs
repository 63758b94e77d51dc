//! ReLU alone (`cuda/elementwise.cu`); fused into BatchNorm it lives in `batch_norm`.

use super::*;

pub(super) fn relu_forward(gpu: &Gpu, y: &mut Buf, x: &Buf) {
    let args = [Ptr(gpu.ptr(y)), Ptr(gpu.ptr(x)), I32(x.len as i32)];
    gpu.launch(&typed("relu_forward", x.dtype), elementwise(x.len), &args);
}

pub(super) fn relu_backward(gpu: &Gpu, dy: &mut Buf, y: &Buf) {
    let args = [Ptr(gpu.ptr(dy)), Ptr(gpu.ptr(y)), I32(y.len as i32)];
    gpu.launch(&typed("relu_backward", y.dtype), elementwise(y.len), &args);
}
