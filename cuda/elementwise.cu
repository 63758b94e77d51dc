// Small f32 kernels of the fp32 reference GPU path: ReLU forward/backward and the sum of the
// branch gradients of an Inception block (the backward of feeding one tensor to four branches).
// One thread per element, grid-stride loops; launch with block 256, grid = min(ceil(n/256), 65535).

#include "common.cuh"

// y = max(x, 0); NaN passes through, as in PyTorch.
extern "C" __global__ void relu_forward_f32(float* __restrict__ y, const float* __restrict__ x, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        float v = x[i];
        y[i] = v < 0.0f ? 0.0f : v;
    }
}

// dy *= [y > 0], in place (PyTorch masks with the output).
extern "C" __global__ void relu_backward_f32(float* __restrict__ dy, const float* __restrict__ y, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        if (y[i] <= 0.0f) dy[i] = 0.0f;
    }
}

// dx = a + b + c + d, summed in that order (deterministic whatever branch finished first).
// Unused parts are passed as null pointers, from the last one backwards.
extern "C" __global__ void fork_backward_f32(float* __restrict__ dx, const float* __restrict__ a,
                                             const float* __restrict__ b, const float* __restrict__ c,
                                             const float* __restrict__ d, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        float s = a[i];
        if (b) s += b[i];
        if (c) s += c[i];
        if (d) s += d[i];
        dx[i] = s;
    }
}
