//! Max pooling (cuDNN) and the global average pool (cuDNN forward, `cuda/pool.cu` backward).

use super::*;

pub(super) fn max_pool2d_forward(gpu: &Gpu, y: &mut Buf, x: &Buf, xs: Nhwc, pool: &MaxPool2d) {
    let dt = x.dtype;
    let call = PoolForward {
        pool: dnn::max_pool(pool),
        x: dnn::nhwc(xs, dt),
        x_ptr: gpu.ptr(x),
        y: dnn::nhwc(pool.out_shape(xs), dt),
        y_ptr: gpu.ptr(y),
        alpha: 1.0,
        beta: 0.0,
    };
    gpu.dnn_call("max_pool2d_forward", DnnCall::PoolForward(call));
}

pub(super) fn max_pool2d_backward(
    gpu: &Gpu,
    dx: &mut Buf,
    dy: &Buf,
    x: &Buf,
    y: &Buf,
    xs: Nhwc,
    pool: &MaxPool2d,
) {
    let dt = x.dtype;
    // The forward's real x and y: cuDNN finds the maximum of each window from them.
    let call = PoolBackward {
        pool: dnn::max_pool(pool),
        y: dnn::nhwc(pool.out_shape(xs), dt),
        y_ptr: gpu.ptr(y),
        dy_ptr: gpu.ptr(dy),
        x: dnn::nhwc(xs, dt),
        x_ptr: gpu.ptr(x),
        dx_ptr: gpu.ptr(dx),
        alpha: 1.0,
        beta: 0.0,
    };
    gpu.dnn_call("max_pool2d_backward", DnnCall::PoolBackward(call));
}

pub(super) fn avg_pool2d_forward(gpu: &Gpu, y: &mut Buf, x: &Buf, xs: Nhwc) {
    let ys = Nhwc::new(xs.n, xs.h / 2, xs.w / 2, xs.c);
    let dt = x.dtype;
    let call = PoolForward {
        pool: dnn::avg_pool2(),
        x: dnn::nhwc(xs, dt),
        x_ptr: gpu.ptr(x),
        y: dnn::nhwc(ys, dt),
        y_ptr: gpu.ptr(y),
        alpha: 1.0,
        beta: 0.0,
    };
    gpu.dnn_call("avg_pool2d_forward", DnnCall::PoolForward(call));
}

pub(super) fn avg_pool2d_backward(gpu: &Gpu, dx: &mut Buf, dy: &Buf, xs: Nhwc) {
    // A kernel of ours rather than cudnnPoolingBackward, which wants the forward's x and y
    // (that average pooling never reads) and does not allow dx or dy in their place.
    let args = [
        Ptr(gpu.ptr(dx)),
        Ptr(gpu.ptr(dy)),
        I32(xs.n as i32),
        I32(xs.h as i32),
        I32(xs.w as i32),
        I32(xs.c as i32),
    ];
    gpu.launch(
        &typed("avg_pool2d_backward", dy.dtype),
        elementwise(xs.len()),
        &args,
    );
}
