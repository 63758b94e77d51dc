// Pooling kernels the library calls do not cover well: the backward of avg_pool2d(x, 2).
// cuDNN's pooling backward wants the forward's x and y besides dy, which average pooling never
// reads, and its documentation does not allow passing dx or dy in their place; the gradient is a
// copy of dy/4 into each window, simpler done here than worked around.
// NHWC, templated on the activation type T (float, __half, __nv_bfloat16), arithmetic in float,
// one rounding to T at the store.
#include "common.cuh"

namespace incept {

// dx[n, iy, ix, c] = dy[n, iy/2, ix/2, c] / 4 inside the pooled area, 0 in an odd last row or
// column (which floor-mode pooling never reads), as the CPU reference.
template <typename T>
__device__ __forceinline__ void avg_pool2d_backward_impl(T* __restrict__ dx, const T* __restrict__ dy, int N,
                                                         int H, int W, int C) {
    const int Ho = H / 2, Wo = W / 2;
    const int total = N * H * W * C;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        int p = i / C;
        const int c = i - p * C;
        const int ix = p % W;
        p /= W;
        const int iy = p % H;
        const int n = p / H;
        const int oy = iy / 2, ox = ix / 2;
        float g = 0.f;
        if (oy < Ho && ox < Wo) g = to_float(dy[((size_t)(n * Ho + oy) * Wo + ox) * C + c]) * 0.25f;
        dx[i] = from_float<T>(g);
    }
}

}  // namespace incept

// avg_pool2d_backward_{f32,f16,bf16}(T* dx, const T* dy, int N, int H, int W, int C)
//   The gradient of y = avg_pool2d(x, 2) (2×2 windows, stride 2, no padding, floor mode):
//   dx [N, H, W, C] = T(float(dy[n, iy/2, ix/2, c]) · 0.25), zero where iy/2 ≥ H/2 or
//   ix/2 ≥ W/2; dy [N, H/2, W/2, C]. Every element of dx is written; dx and dy distinct.
//   N·H·W·C < 2^31. Launch: block 256, grid = min(ceil(N·H·W·C/256), 4096) (grid-stride).
INCEPT_INSTANTIATE_3(avg_pool2d_backward, (T* __restrict__ dx, const T* __restrict__ dy, int N, int H, int W, int C),
                     (dx, dy, N, H, W, C))
