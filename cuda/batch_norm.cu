// Fused BatchNorm (training and eval) + ReLU over NHWC activations seen as [P, C]
// (P = N·H·W pixels, channel fastest), PyTorch's BatchNorm2d semantics:
// - training normalises with the batch mean and the biased variance (÷P), eps inside the sqrt;
// - running_mean ← (1−m)·running_mean + m·mean, running_var ← (1−m)·running_var + m·var·P/(P−1);
// - eval normalises with the running statistics;
// - the ReLU backward masks with the output: dy' = (y <= 0) ? 0 : dy.
//
// Per-channel reductions (batch statistics, Σdy', Σdy'·x̂; reduce.cuh, which conv.cu's bias
// gradient shares with fixed tiles in place of chunks) are grid-wide and deterministic:
// block (bx, by) of the grid owns channels [bx·blockDim.x, +blockDim.x) and the row chunk
// `by` of gridDim.y equal chunks; each thread accumulates its rows (stride blockDim.y) in float,
// the block combines its threads in double in a fixed order and writes its partial to a
// workspace; the last block of each channel group to finish (int atomic on a counter) merges
// the partials in chunk order, in double. No float atomics; the result depends only on the
// data and the launch geometry.
//
// Shared requirements of the reduction kernels (batch_norm_stats,
// batch_norm_relu_backward_reduce; conv.cu's bias_grad differs in its row split and workspace):
//   block = (BX, BY) with BX ≤ 32 and BY ≤ 32 (recommended (32, 16); (16, 32) when C = 16),
//   grid = (ceil(C / BX), G), G ≥ 1 row chunks. Recommended: about two blocks per SM while
//   each thread keeps at least ~8 rows, G = max(1, min(ceil(2·SMs / gridDim.x), P / (8·BY))).
//   workspace: 2·G·C doubles, counters: gridDim.x ints, zero before the first launch (the
//   kernel leaves them zero again). Launches that may run concurrently (different streams)
//   need their own workspace and counters. P·C < 2^31, P ≥ 2 for training statistics.
#include "reduce.cuh"

namespace incept {

// ---- batch_norm_stats ----------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void batch_norm_stats_impl(float* __restrict__ mean, float* __restrict__ invstd,
                                                      float* __restrict__ running_mean,
                                                      float* __restrict__ running_var, double* workspace,
                                                      int* counters, const T* __restrict__ x, int P, int C,
                                                      float eps, float momentum) {
    __shared__ float red_a[REDUCE_MAX_BY][REDUCE_MAX_BX + 1];
    __shared__ float red_b[REDUCE_MAX_BY][REDUCE_MAX_BX + 1];
    __shared__ float shift[REDUCE_MAX_BX];
    const int tx = threadIdx.x, ty = threadIdx.y, by = blockDim.y;
    const int c = blockIdx.x * blockDim.x + tx;
    const bool active = c < C;
    const int G = gridDim.y, chunk = blockIdx.y;
    int r0, r1;
    reduce_chunk(P, G, chunk, r0, r1);
    const int n = r1 - r0;

    // Pass 1: the chunk's mean, used as the shift of pass 2.
    float s = 0.f;
    if (active)
        for (int r = r0 + ty; r < r1; r += by) s += to_float(x[(size_t)r * C + c]);
    red_a[ty][tx] = s;
    __syncthreads();
    if (ty == 0) {
        double t = 0.0;
        for (int k = 0; k < by; ++k) t += red_a[k][tx];
        shift[tx] = n > 0 ? (float)(t / n) : 0.f;
    }
    __syncthreads();

    // Pass 2 (corrected two-pass): Σd and Σd² with d = x − shift give the chunk's exact mean
    // shift + Σd/n and M2 = Σd² − (Σd)²/n, whatever the rounding of the shift.
    const float m0 = shift[tx];
    float d1 = 0.f, d2 = 0.f;
    if (active)
        for (int r = r0 + ty; r < r1; r += by) {
            const float d = to_float(x[(size_t)r * C + c]) - m0;
            d1 += d;
            d2 += d * d;
        }
    red_a[ty][tx] = d1;  // row 0's reads of red_a happened before the barrier above
    red_b[ty][tx] = d2;
    __syncthreads();
    if (ty == 0 && active) {
        double t1 = 0.0, t2 = 0.0;
        for (int k = 0; k < by; ++k) {
            t1 += red_a[k][tx];
            t2 += red_b[k][tx];
        }
        double cm = 0.0, m2 = 0.0;
        if (n > 0) {
            cm = (double)m0 + t1 / n;
            m2 = t2 - t1 * t1 / n;
            if (m2 < 0.0) m2 = 0.0;
        }
        workspace[(size_t)chunk * C + c] = cm;
        workspace[(size_t)(G + chunk) * C + c] = m2;
    }
    if (!reduce_last_block(counters)) return;

    // Merge the chunks in order (Chan et al.), in double.
    if (ty == 0 && active) {
        const volatile double* ws = workspace;
        double cnt = 0.0, mu = 0.0, m2 = 0.0;
        for (int k = 0; k < G; ++k) {
            int a0, a1;
            reduce_chunk(P, G, k, a0, a1);
            if (a1 <= a0) continue;
            const double nb = a1 - a0;
            const double mb = ws[(size_t)k * C + c];
            const double m2b = ws[(size_t)(G + k) * C + c];
            const double total = cnt + nb;
            const double delta = mb - mu;
            mu += delta * (nb / total);
            m2 += m2b + delta * delta * (cnt * nb / total);
            cnt = total;
        }
        const double var = m2 / cnt;  // biased: what training normalises with
        mean[c] = (float)mu;
        invstd[c] = (float)(1.0 / sqrt(var + (double)eps));
        if (running_mean != nullptr && running_var != nullptr) {
            const double m = momentum;
            const double unbiased = cnt > 1.0 ? var * cnt / (cnt - 1.0) : var;
            running_mean[c] = (float)((1.0 - m) * (double)running_mean[c] + m * mu);
            running_var[c] = (float)((1.0 - m) * (double)running_var[c] + m * unbiased);
        }
    }
}

// ---- batch_norm_relu_apply ---------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void batch_norm_relu_apply_impl(T* __restrict__ y, int ldy, int y_off,
                                                           const T* __restrict__ x,
                                                           const float* __restrict__ mean,
                                                           const float* __restrict__ invstd,
                                                           const float* __restrict__ gamma,
                                                           const float* __restrict__ beta, int P, int C,
                                                           int relu) {
    const int total = P * C;
    const int stride = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int p = i / C;
        const int c = i - p * C;
        // (x − mean)·(invstd·γ) + β: the mean is subtracted first, as the CPU reference does,
        // so a large mean next to a small spread loses nothing.
        float v = (to_float(x[i]) - mean[c]) * (invstd[c] * gamma[c]) + beta[c];
        if (relu && v < 0.f) v = 0.f;  // NaN passes, as in PyTorch
        y[(size_t)p * ldy + y_off + c] = from_float<T>(v);
    }
}

// ---- batch_norm_relu_backward -------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float bn_masked_grad(const T* dy, int ld_dy, int dy_off, const T* y, int ld_y,
                                                int y_off, int p, int c, int relu) {
    const float g = to_float(dy[(size_t)p * ld_dy + dy_off + c]);
    if (relu && to_float(y[(size_t)p * ld_y + y_off + c]) <= 0.f) return 0.f;
    return g;
}

template <typename T>
__device__ __forceinline__ void batch_norm_relu_backward_reduce_impl(
    float* __restrict__ coef, float* __restrict__ dgamma, float* __restrict__ dbeta, double* workspace,
    int* counters, const T* dy, int ld_dy, int dy_off, const T* y, int ld_y, int y_off, const T* __restrict__ x,
    const float* __restrict__ mean, const float* __restrict__ invstd, const float* __restrict__ gamma, int P,
    int C, int relu) {
    __shared__ float red_a[REDUCE_MAX_BY][REDUCE_MAX_BX + 1];
    __shared__ float red_b[REDUCE_MAX_BY][REDUCE_MAX_BX + 1];
    const int tx = threadIdx.x, ty = threadIdx.y, by = blockDim.y;
    const int c = blockIdx.x * blockDim.x + tx;
    const bool active = c < C;
    const int G = gridDim.y, chunk = blockIdx.y;
    int r0, r1;
    reduce_chunk(P, G, chunk, r0, r1);

    // Σdy' and Σdy'·(x − mean) over this thread's rows.
    float s1 = 0.f, s2 = 0.f;
    if (active) {
        const float mu = mean[c];
        for (int r = r0 + ty; r < r1; r += by) {
            const float g = bn_masked_grad(dy, ld_dy, dy_off, y, ld_y, y_off, r, c, relu);
            s1 += g;
            s2 += g * (to_float(x[(size_t)r * C + c]) - mu);
        }
    }
    red_a[ty][tx] = s1;
    red_b[ty][tx] = s2;
    __syncthreads();
    if (ty == 0 && active) {
        double t1 = 0.0, t2 = 0.0;
        for (int k = 0; k < by; ++k) {
            t1 += red_a[k][tx];
            t2 += red_b[k][tx];
        }
        workspace[(size_t)chunk * C + c] = t1;
        workspace[(size_t)(G + chunk) * C + c] = t2;
    }
    if (!reduce_last_block(counters)) return;

    if (ty == 0 && active) {
        const volatile double* ws = workspace;
        double sum_dy = 0.0, sum_dy_xmu = 0.0;
        for (int k = 0; k < G; ++k) {
            sum_dy += ws[(size_t)k * C + c];
            sum_dy_xmu += ws[(size_t)(G + k) * C + c];
        }
        const double inv = invstd[c];
        const double sum_dy_xhat = sum_dy_xmu * inv;  // Σdy'·x̂
        if (dbeta != nullptr) dbeta[c] += (float)sum_dy;
        if (dgamma != nullptr) dgamma[c] += (float)sum_dy_xhat;
        // dx = γ·invstd/P · (P·dy' − Σdy' − x̂·Σdy'x̂) = a·dy' + b·(x − mean) + c0.
        const double k = (double)gamma[c] * inv / P;
        coef[c] = (float)(k * P);
        coef[C + c] = (float)(-k * sum_dy_xhat * inv);
        coef[2 * C + c] = (float)(-k * sum_dy);
    }
}

template <typename T>
__device__ __forceinline__ void batch_norm_relu_backward_apply_impl(T* dx, const T* dy, int ld_dy, int dy_off,
                                                                    const T* y, int ld_y, int y_off,
                                                                    const T* __restrict__ x,
                                                                    const float* __restrict__ mean,
                                                                    const float* __restrict__ coef, int P, int C,
                                                                    int relu) {
    const int total = P * C;
    const int stride = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
        const int p = i / C;
        const int c = i - p * C;
        const float g = bn_masked_grad(dy, ld_dy, dy_off, y, ld_y, y_off, p, c, relu);
        const float v = coef[c] * g + coef[C + c] * (to_float(x[i]) - mean[c]) + coef[2 * C + c];
        dx[i] = from_float<T>(v);
    }
}

// ---- bias_grad ------------------------------------------------------------------------------------

}  // namespace incept

// batch_norm_stats_{f32,f16,bf16}(float* mean, float* invstd, float* running_mean,
//     float* running_var, double* workspace, int* counters, const T* x, int P, int C,
//     float eps, float momentum)
//   x [P, C] contiguous. Writes mean[C] and invstd[C] = 1/√(var + eps) (biased var), and, when
//   running_mean and running_var are not null, updates them in place with the unbiased var.
//   Launch: block (32, 16) (BX, BY ≤ 32), grid (ceil(C/BX), G); workspace 2·G·C doubles,
//   counters gridDim.x ints (see the top of the file).
INCEPT_INSTANTIATE_3(batch_norm_stats,
                     (float* __restrict__ mean, float* __restrict__ invstd, float* __restrict__ running_mean,
                      float* __restrict__ running_var, double* workspace, int* counters, const T* __restrict__ x,
                      int P, int C, float eps, float momentum),
                     (mean, invstd, running_mean, running_var, workspace, counters, x, P, C, eps, momentum))

// batch_norm_relu_apply_{f32,f16,bf16}(T* y, int ldy, int y_off, const T* x, const float* mean,
//     const float* invstd, const float* gamma, const float* beta, int P, int C, int relu)
//   y[p·ldy + y_off + c] = relu?((x[p·C + c] − mean[c])·invstd[c]·gamma[c] + beta[c]).
//   ldy = C, y_off = 0 for a plain output; ldy = Σ channels, y_off = the branch's first
//   channel to write straight into the Inception join. Training passes the batch mean/invstd
//   from batch_norm_stats, eval the running mean and batch_norm_eval_invstd's output.
//   Launch: block 256, grid = min(ceil(P·C/256), 8·SMs) (grid-stride).
INCEPT_INSTANTIATE_3(batch_norm_relu_apply,
                     (T* __restrict__ y, int ldy, int y_off, const T* __restrict__ x, const float* __restrict__ mean,
                      const float* __restrict__ invstd, const float* __restrict__ gamma,
                      const float* __restrict__ beta, int P, int C, int relu),
                     (y, ldy, y_off, x, mean, invstd, gamma, beta, P, C, relu))

// batch_norm_relu_backward_reduce_{f32,f16,bf16}(float* coef, float* dgamma, float* dbeta,
//     double* workspace, int* counters, const T* dy, int ld_dy, int dy_off, const T* y,
//     int ld_y, int y_off, const T* x, const float* mean, const float* invstd,
//     const float* gamma, int P, int C, int relu)
//   dy, y: the gradient of the BN(+ReLU) output and that output, each [P, ld] read at columns
//   off..off+C (ld = C, off = 0 when not part of a join). x: the BN input [P, C]; mean, invstd:
//   the batch statistics of the forward. With dy' = relu && y <= 0 ? 0 : dy:
//   dbeta[c] += Σdy', dgamma[c] += Σdy'·x̂ (either may be null), and
//   coef[0·C + c] = γ·invstd, coef[1·C + c] = −γ·invstd³·Σdy'(x − mean)/P,
//   coef[2·C + c] = −γ·invstd·Σdy'/P, the per-channel terms of dx for the apply kernel.
//   Launch: as batch_norm_stats.
INCEPT_INSTANTIATE_3(batch_norm_relu_backward_reduce,
                     (float* __restrict__ coef, float* __restrict__ dgamma, float* __restrict__ dbeta,
                      double* workspace, int* counters, const T* dy, int ld_dy, int dy_off, const T* y, int ld_y,
                      int y_off, const T* __restrict__ x, const float* __restrict__ mean,
                      const float* __restrict__ invstd, const float* __restrict__ gamma, int P, int C, int relu),
                     (coef, dgamma, dbeta, workspace, counters, dy, ld_dy, dy_off, y, ld_y, y_off, x, mean, invstd,
                      gamma, P, C, relu))

// batch_norm_relu_backward_apply_{f32,f16,bf16}(T* dx, const T* dy, int ld_dy, int dy_off,
//     const T* y, int ld_y, int y_off, const T* x, const float* mean, const float* coef,
//     int P, int C, int relu)
//   dx[p·C + c] = coef[c]·dy' + coef[C + c]·(x − mean[c]) + coef[2C + c], dx [P, C]
//   contiguous. dx may be the same buffer as dy when ld_dy = C and dy_off = 0.
//   Launch: block 256, grid = min(ceil(P·C/256), 8·SMs) (grid-stride).
INCEPT_INSTANTIATE_3(batch_norm_relu_backward_apply,
                     (T* dx, const T* dy, int ld_dy, int dy_off, const T* y, int ld_y, int y_off,
                      const T* __restrict__ x, const float* __restrict__ mean, const float* __restrict__ coef,
                      int P, int C, int relu),
                     (dx, dy, ld_dy, dy_off, y, ld_y, y_off, x, mean, coef, P, C, relu))

// batch_norm_eval_invstd(float* invstd, const float* running_var, int C, float eps)
//   invstd[c] = 1/√(running_var[c] + eps), computed in double: the eval path's invstd for
//   batch_norm_relu_apply_* with the running mean. Launch: block 128, grid ceil(C/128).
extern "C" __global__ void batch_norm_eval_invstd(float* __restrict__ invstd, const float* __restrict__ running_var,
                                                  int C, float eps) {
    for (int c = blockIdx.x * blockDim.x + threadIdx.x; c < C; c += gridDim.x * blockDim.x)
        invstd[c] = (float)(1.0 / sqrt((double)running_var[c] + (double)eps));
}
INCEPT_REGISTER(batch_norm_eval_invstd)
