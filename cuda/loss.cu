// Softmax cross-entropy, forward and backward in one kernel, as PyTorch's CrossEntropyLoss
// (reduction mean) with label smoothing ε:
//   target[j] = (1 − ε)·[j = label] + ε/K
//   loss      = mean over rows of Σ_j −target[j]·log softmax(z)[j]
//             = mean over rows of (1 − ε)·(lse − z[label]) + ε·(lse − mean_j z[j])
//   dlogits   = (softmax(z) − target) / N · loss_scale
// plus the number of rows whose first maximum (lowest index among equal maxima, as argmax)
// is the label.
#include "common.cuh"

namespace incept {

__device__ __forceinline__ float quiet_nan() {
    return __int_as_float(0x7fc00000);
}

__device__ __forceinline__ void cross_entropy_impl(float* __restrict__ dlogits, float* __restrict__ loss,
                                                   int* __restrict__ correct, const float* __restrict__ logits,
                                                   const int* __restrict__ labels, int N, int K, float smoothing,
                                                   const float* __restrict__ loss_scale) {
    __shared__ double warp_loss[32];
    __shared__ int warp_correct[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const float grad_scale = (loss_scale != nullptr ? *loss_scale : 1.f) / (float)N;
    const float off_target = smoothing / (float)K;
    double my_loss = 0.0;  // lane 0's running sum over this warp's rows, in row order
    int my_correct = 0;

    for (int r = warp; r < N; r += warps) {  // one warp per row; the whole warp takes the branch
        const float* z = logits + (size_t)r * K;
        // Max with its first index; lanes see classes lane, lane + 32, ...
        float best = neg_inf();
        int best_j = K;
        for (int j = lane; j < K; j += 32) {
            const float v = z[j];
            if (v > best) {
                best = v;
                best_j = j;
            }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float ov = __shfl_xor_sync(FULL_MASK, best, off);
            const int oj = __shfl_xor_sync(FULL_MASK, best_j, off);
            if (ov > best || (ov == best && oj < best_j)) {
                best = ov;
                best_j = oj;
            }
        }
        float sum_exp = 0.f, sum_z = 0.f;
        for (int j = lane; j < K; j += 32) {
            sum_exp += expf(z[j] - best);
            sum_z += z[j];
        }
        sum_exp = warp_sum(sum_exp);
        sum_z = warp_sum(sum_z);
        const int label = labels[r];
        const bool valid = label >= 0 && label < K;
        const float inv_sum = 1.f / sum_exp;
        for (int j = lane; j < K; j += 32) {
            const float p = expf(z[j] - best) * inv_sum;
            const float t = off_target + (j == label ? 1.f - smoothing : 0.f);
            dlogits[(size_t)r * K + j] = valid ? (p - t) * grad_scale : quiet_nan();
        }
        if (lane == 0) {
            // The loss in double: lse − z terms cancel, and it is one value per row.
            const double lse = (double)best + log((double)sum_exp);
            const double row =
                valid ? (1.0 - (double)smoothing) * (lse - (double)z[label]) +
                            (double)smoothing * (lse - (double)sum_z / K)
                      : (double)quiet_nan();  // a label outside 0..K shows as a NaN loss
            my_loss += row;
            my_correct += best_j == label ? 1 : 0;
        }
    }
    if (lane == 0) {
        warp_loss[warp] = my_loss;
        warp_correct[warp] = my_correct;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double total = 0.0;
        int hits = 0;
        for (int w = 0; w < warps; ++w) {  // fixed order
            total += warp_loss[w];
            hits += warp_correct[w];
        }
        *loss = (float)(total / N);
        *correct = hits;
    }
}

}  // namespace incept

// cross_entropy_forward_backward(float* dlogits, float* loss, int* correct,
//     const float* logits, const int* labels, int N, int K, float smoothing,
//     const float* loss_scale)
//   logits, dlogits [N, K] float; labels [N] in 0..K (another value gives a NaN loss and NaN
//   gradients for its row, never a read out of bounds). Writes loss[0] (mean over the batch),
//   correct[0] (rows whose argmax is the label) and dlogits = (softmax − target)/N·scale with
//   scale = *loss_scale (a device value, so a dynamic loss scale needs no host sync), or 1 when
//   loss_scale is null.
//   Launch: ONE block (the batch mean is reduced inside it), blockDim.x a multiple of 32,
//   ≤ 1024; one warp per row: block = min(32·N, 1024) rounded up to 32, grid = 1.
extern "C" __global__ void cross_entropy_forward_backward(float* __restrict__ dlogits, float* __restrict__ loss,
                                                          int* __restrict__ correct,
                                                          const float* __restrict__ logits,
                                                          const int* __restrict__ labels, int N, int K,
                                                          float smoothing, const float* __restrict__ loss_scale) {
    incept::cross_entropy_impl(dlogits, loss, correct, logits, labels, N, K, smoothing, loss_scale);
}
INCEPT_REGISTER(cross_entropy_forward_backward)

// accumulate_step_metrics(double* sums, const float* loss, const int* correct, int n)
//   sums[0] += loss[0]·n (the step's summed loss, exact in double), sums[1] += correct[0]: an
//   epoch's running loss and accuracy kept on the device and read back only when the host wants
//   them, so a training step replayed as a CUDA graph needs no host sync. `loss` and `correct`
//   are what cross_entropy_forward_backward wrote for a batch of n. Launch: grid 1, block 1.
extern "C" __global__ void accumulate_step_metrics(double* __restrict__ sums, const float* __restrict__ loss,
                                                   const int* __restrict__ correct, int n) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    sums[0] += (double)loss[0] * (double)n;
    sums[1] += (double)correct[0];
}
INCEPT_REGISTER(accumulate_step_metrics)
