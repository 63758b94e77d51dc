//! Max pooling (cuDNN) and the global average pool (cuDNN forward, `cuda/pool.cu` backward).

use super::*;

impl PoolOps<f32> for Gpu {
    fn max_pool2d_forward(&self, y: &mut Buf, x: &Buf, xs: Nhwc, pool: &MaxPool2d) {
        let dt = x.dtype;
        let call = PoolForward {
            pool: dnn::max_pool(pool),
            x: dnn::nhwc(xs, dt),
            x_ptr: self.ptr(x),
            y: dnn::nhwc(pool.out_shape(xs), dt),
            y_ptr: self.ptr(y),
            alpha: 1.0,
            beta: 0.0,
        };
        self.dnn_call("max_pool2d_forward", DnnCall::PoolForward(call));
    }

    fn max_pool2d_backward(
        &self, dx: &mut Buf, dy: &Buf, x: &Buf, y: &Buf, xs: Nhwc, pool: &MaxPool2d,
    ) {
        let dt = x.dtype;
        // The forward's real x and y: cuDNN finds the maximum of each window from them.
        let call = PoolBackward {
            pool: dnn::max_pool(pool),
            y: dnn::nhwc(pool.out_shape(xs), dt),
            y_ptr: self.ptr(y),
            dy_ptr: self.ptr(dy),
            x: dnn::nhwc(xs, dt),
            x_ptr: self.ptr(x),
            dx_ptr: self.ptr(dx),
            alpha: 1.0,
            beta: 0.0,
        };
        self.dnn_call("max_pool2d_backward", DnnCall::PoolBackward(call));
    }

    fn avg_pool2d_forward(&self, y: &mut Buf, x: &Buf, xs: Nhwc) {
        let ys = Nhwc::new(xs.n, xs.h / 2, xs.w / 2, xs.c);
        let dt = x.dtype;
        let call = PoolForward {
            pool: dnn::avg_pool2(),
            x: dnn::nhwc(xs, dt),
            x_ptr: self.ptr(x),
            y: dnn::nhwc(ys, dt),
            y_ptr: self.ptr(y),
            alpha: 1.0,
            beta: 0.0,
        };
        self.dnn_call("avg_pool2d_forward", DnnCall::PoolForward(call));
    }

    fn avg_pool2d_backward(&self, dx: &mut Buf, dy: &Buf, xs: Nhwc) {
        // A kernel of ours rather than cudnnPoolingBackward, which wants the forward's x and y
        // (that average pooling never reads) and does not allow dx or dy in their place.
        let args = [
            Ptr(self.ptr(dx)),
            Ptr(self.ptr(dy)),
            I32(xs.n as i32),
            I32(xs.h as i32),
            I32(xs.w as i32),
            I32(xs.c as i32),
        ];
        self.launch(&typed("avg_pool2d_backward", dy.dtype), elementwise(xs.len()), &args);
    }
}
