// Small element-wise kernels of both GPU paths: ReLU forward/backward, the sum of the branch
// gradients of an Inception block (the backward of feeding one tensor to four branches), and
// the fp32 ⇄ fp16/bf16 conversions of mixed precision.
// Templated on the activation type T (float, __half, __nv_bfloat16); every value is widened to
// float, the arithmetic is done in float and the result is rounded to T once, at the store, so
// the _f32 instantiations are the plain float kernels.
// One thread per element, grid-stride loops; launch with block 256,
// grid = min(ceil(n/256), 4096). n < 2^31.

#include "common.cuh"

namespace incept {

// y = max(x, 0); NaN passes through, as in PyTorch. The input itself is stored when it is kept
// (no float round trip), so a 16-bit NaN keeps its payload and -0 stays -0.
template <typename T>
__device__ __forceinline__ void relu_forward_impl(T* __restrict__ y, const T* __restrict__ x, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const T v = x[i];
        y[i] = to_float(v) < 0.0f ? from_float<T>(0.0f) : v;
    }
}

// dy *= [y > 0], in place (PyTorch masks with the output). `y <= 0` rather than `!(y > 0)`: a
// NaN output keeps its gradient, as in PyTorch and the CPU reference.
template <typename T>
__device__ __forceinline__ void relu_backward_impl(T* __restrict__ dy, const T* __restrict__ y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        if (to_float(y[i]) <= 0.0f) dy[i] = from_float<T>(0.0f);
    }
}

// dx = a + b + c + d, summed in float in that order (deterministic whatever branch finished
// first) and rounded to T once. Unused parts are null pointers, from the last one backwards.
// dx and a are not __restrict__: the host folds more than four parts by passing dx as `a`
// (each element is read and then written by the same thread, so that is safe).
template <typename T>
__device__ __forceinline__ void fork_backward_impl(T* dx, const T* a, const T* __restrict__ b,
                                                   const T* __restrict__ c, const T* __restrict__ d, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        float s = to_float(a[i]);
        if (b) s += to_float(b[i]);
        if (c) s += to_float(c[i]);
        if (d) s += to_float(d[i]);
        dx[i] = from_float<T>(s);
    }
}

// dst = src rounded to T (nearest even; beyond the 16-bit range → ±inf, NaN stays NaN): the
// working copy of the fp32 master weights.
template <typename T>
__device__ __forceinline__ void convert_from_f32_impl(T* __restrict__ dst, const float* __restrict__ src, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        dst[i] = from_float<T>(src[i]);
}

// dst = src widened to float (exact).
template <typename T>
__device__ __forceinline__ void convert_to_f32_impl(float* __restrict__ dst, const T* __restrict__ src, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)
        dst[i] = to_float(src[i]);
}

}  // namespace incept

// relu_forward_{f32,f16,bf16}(T* y, const T* x, int n)
//   y[i] = x[i] < 0 ? 0 : x[i] (NaN and -0 pass through unchanged). y and x distinct.
//   Launch: block 256, grid = min(ceil(n/256), 4096) (grid-stride).
INCEPT_INSTANTIATE_3(relu_forward, (T* __restrict__ y, const T* __restrict__ x, int n), (y, x, n))

// relu_backward_{f32,f16,bf16}(T* dy, const T* y, int n)
//   dy[i] = y[i] <= 0 ? 0 : dy[i], in place; y is the forward's output (NaN keeps dy).
//   Launch: as relu_forward.
INCEPT_INSTANTIATE_3(relu_backward, (T* __restrict__ dy, const T* __restrict__ y, int n), (dy, y, n))

// fork_backward_{f32,f16,bf16}(T* dx, const T* a, const T* b, const T* c, const T* d, int n)
//   dx[i] = T(a[i] + b[i] + c[i] + d[i]), summed in float in that order, one rounding; b, c, d
//   may be null (trailing parts only: d, then c, then b). dx may be the same buffer as a, not
//   as b, c or d. Launch: as relu_forward.
INCEPT_INSTANTIATE_3(fork_backward,
                     (T* dx, const T* a, const T* __restrict__ b, const T* __restrict__ c,
                      const T* __restrict__ d, int n),
                     (dx, a, b, c, d, n))

// convert_from_f32_{f32,f16,bf16}(T* dst, const float* src, int n)
//   dst[i] = T(src[i]), round to nearest even (overflow → ±inf; _f32 is a copy).
//   Launch: as relu_forward.
INCEPT_INSTANTIATE_16(convert_from_f32, (T* __restrict__ dst, const float* __restrict__ src, int n), (dst, src, n))

// convert_to_f32_{f32,f16,bf16}(float* dst, const T* src, int n)
//   dst[i] = float(src[i]) (exact). Launch: as relu_forward.
INCEPT_INSTANTIATE_16(convert_to_f32, (float* __restrict__ dst, const T* __restrict__ src, int n), (dst, src, n))
