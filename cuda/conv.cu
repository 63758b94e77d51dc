// The kernels of the convolution family (cuDNN computes the convolutions themselves), over
// NHWC activations seen as [P, C] (P = N·H·W pixels, channel fastest):
// - the bias: added after cuDNN's convolution (bias_add), and its gradient Σ_p dy (bias_grad,
//   also the linear head's), with the same bits on every GPU and every run;
// - the 16-bit working copy of an fp32 OIHW master weight in OHWI (cuDNN's KRSC, the filter
//   layout of its NHWC tensor-core kernels), and its 16-bit OHWI gradient accumulated back into
//   the fp32 OIHW gradient.
// Templated on the activation type T (float, __half, __nv_bfloat16); values are widened to
// float and rounded to T once, at the store.
#include "reduce.cuh"

namespace incept {

// dst[k, r, s, c] = T(src[k, c, r, s]): the fp32 master weight of a convolution, in PyTorch's
// OIHW, cast to its 16-bit working copy in OHWI (cuDNN's KRSC), the filter layout its NHWC
// tensor-core kernels read without a transpose of their own. One thread per element of dst
// (coalesced stores; the loads gather, from a weight of at most a few hundred KB).
template <typename T>
__device__ __forceinline__ void weight_oihw_to_ohwi_impl(T* __restrict__ dst, const float* __restrict__ src, int K,
                                                         int C, int RS) {
    const int n = K * C * RS;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const int c = i % C;
        const int t = i / C;
        const int rs = t % RS;
        const int k = t / RS;
        dst[i] = from_float<T>(src[((size_t)k * C + c) * RS + rs]);
    }
}

// grad[k, c, r, s] += g[k, r, s, c] widened to float: a 16-bit weight gradient from cuDNN (OHWI)
// accumulated into the fp32 OIHW gradient (autograd's +=). inf/NaN propagate, so amp_unscale
// still sees an overflow. One thread per element of grad, each read-modify-write its own.
template <typename T>
__device__ __forceinline__ void add_ohwi_to_oihw_impl(float* __restrict__ grad, const T* __restrict__ g, int K,
                                                      int C, int RS) {
    const int n = K * C * RS;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const int rs = i % RS;
        const int t = i / RS;
        const int c = t % C;
        const int k = t / C;
        grad[i] += to_float(g[((size_t)k * RS + rs) * C + c]);
    }
}

// y[p·C + c] += b[c] in place, in float, rounded to T once: the bias of a convolution whose
// output came from cuDNN without it.
template <typename T>
__device__ __forceinline__ void bias_add_impl(T* __restrict__ y, const float* __restrict__ b, int P, int C) {
    const int total = P * C;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += blockDim.x * gridDim.x) {
        const int c = i - (i / C) * C;
        y[i] = from_float<T>(to_float(y[i]) + b[c]);
    }
}

// db[c] += Σ_p dy[p, c]: the bias gradient of a convolution or of the linear head, on every
// precision path. Unlike the BN reductions, the summation order does not depend on the grid:
// the rows are cut into fixed tiles of R rows, each tile is summed the same way whichever block
// takes it (float per thread over rows ty, ty + BY, …, then the BY thread sums in double in
// order), and the last block merges the tile sums in an order fixed by the tile index and BY.
// The result therefore depends only on the data, P, C, R and BY, never on G (which follows the
// GPU's SM count) or on the order in which blocks run: the same bits on every GPU and every run.
template <typename T>
__device__ __forceinline__ void bias_grad_impl(float* __restrict__ db, double* workspace, int* counters,
                                               const T* __restrict__ dy, int P, int C, int R) {
    __shared__ double red[REDUCE_MAX_BY][REDUCE_MAX_BX + 1];
    const int tx = threadIdx.x, ty = threadIdx.y, by = blockDim.y;
    const int c = blockIdx.x * blockDim.x + tx;
    const bool active = c < C;
    const int tiles = (P + R - 1) / R;

    // The loop bounds depend only on blockIdx.y, so every thread of the block meets the barriers.
    for (int t = blockIdx.y; t < tiles; t += gridDim.y) {
        const int r1 = min(P, (t + 1) * R);
        float s = 0.f;
        if (active)
            for (int r = t * R + ty; r < r1; r += by) s += to_float(dy[(size_t)r * C + c]);
        red[ty][tx] = s;
        __syncthreads();
        if (ty == 0 && active) {
            double acc = 0.0;
            for (int k = 0; k < by; ++k) acc += red[k][tx];
            workspace[(size_t)t * C + c] = acc;
        }
        __syncthreads();  // row 0 has read `red` before the next tile overwrites it
    }
    if (!reduce_last_block(counters)) return;

    // Thread ty merges tiles ty, ty + BY, … in order, then row 0 adds the BY partials in order:
    // BY-way parallel, so a long row of tiles is not read by one thread alone.
    double part = 0.0;
    if (active) {
        const volatile double* ws = workspace;
        for (int t = ty; t < tiles; t += by) part += ws[(size_t)t * C + c];
    }
    red[ty][tx] = part;
    __syncthreads();
    if (ty == 0 && active) {
        double total = 0.0;
        for (int k = 0; k < by; ++k) total += red[k][tx];
        db[c] = db[c] + (float)total;  // accumulates, as autograd; one float add
    }
}

}  // namespace incept

// weight_oihw_to_ohwi_{f32,f16,bf16}(T* dst, const float* src, int K, int C, int RS)
//   dst[(k·RS + rs)·C + c] = T(src[(k·C + c)·RS + rs]) (round to nearest even): an OIHW weight
//   [K, C, R, S] (RS = R·S) to OHWI/KRSC [K, R, S, C]. dst and src distinct, K·C·RS < 2^31.
//   Launch: block 256, grid = min(ceil(K·C·RS/256), 4096) (grid-stride).
INCEPT_INSTANTIATE_16(weight_oihw_to_ohwi, (T* __restrict__ dst, const float* __restrict__ src, int K, int C, int RS),
                     (dst, src, K, C, RS))

// add_ohwi_to_oihw_{f32,f16,bf16}(float* grad, const T* g, int K, int C, int RS)
//   grad[(k·C + c)·RS + rs] += float(g[(k·RS + rs)·C + c]) (inf/NaN propagate): the reverse
//   permutation of weight_oihw_to_ohwi, accumulating. Launch: as weight_oihw_to_ohwi.
INCEPT_INSTANTIATE_16(add_ohwi_to_oihw, (float* __restrict__ grad, const T* __restrict__ g, int K, int C, int RS),
                     (grad, g, K, C, RS))

// bias_add_{f32,f16,bf16}(T* y, const float* b, int P, int C)
//   y[p·C + c] = T(float(y[p·C + c]) + b[c]) for p < P, c < C, in place; y [P, C] contiguous,
//   P·C < 2^31. Launch: block 256, grid = min(ceil(P·C/256), 4096) (grid-stride over P·C).
INCEPT_INSTANTIATE_16(bias_add, (T* __restrict__ y, const float* __restrict__ b, int P, int C), (y, b, P, C))

// bias_grad_{f32,f16,bf16}(float* db, double* workspace, int* counters, const T* dy, int P, int C,
//     int R)
//   dy [P, C] contiguous (a convolution's output gradient, or the logits' gradient of the
//   linear head). db[c] += Σ_p dy[p·C + c]: tiles of R rows (R ≥ 1), each summed in float per
//   thread and in double across the block, the ceil(P/R) tile sums merged in double in a fixed
//   order, then db[c] = db[c] + (float)total. The bits depend on P, C, R and BY only: not on G,
//   not on the order the blocks run in.
//   Launch: block (32, 16) ((16, 32) when C ≤ 16), grid (ceil(C/BX), G) for any G ≥ 1 (more
//   than ceil(P/R) leaves blocks idle); workspace ceil(P/R)·C doubles, counters gridDim.x ints,
//   zero before the launch and left zero.
INCEPT_INSTANTIATE_3(bias_grad,
                     (float* __restrict__ db, double* workspace, int* counters, const T* __restrict__ dy, int P,
                      int C, int R),
                     (db, workspace, counters, dy, P, C, R))
