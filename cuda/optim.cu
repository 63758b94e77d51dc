// The optimizer step of mixed-precision training, entirely on the device (no host sync, so a
// whole training step can be captured in one CUDA graph):
//   amp_unscale_*      16-bit (or fp32) gradients → fp32 master gradients × 1/scale, and an
//                      overflow flag set when any gradient is inf or NaN;
//   sgd_step           torch.optim.SGD over one flat fp32 buffer of every parameter, skipped
//                      when the flag is set;
//   update_loss_scale  halves the scale on overflow, doubles it after `growth_interval` clean
//                      steps in a row (torch.amp.GradScaler's rule), clears the flag.
// Per step, in stream order: amp_unscale → sgd_step → update_loss_scale.
#include "common.cuh"

namespace incept {

template <typename T>
__device__ __forceinline__ void amp_unscale_impl(float* master, const T* grad, int n,
                                                 const float* __restrict__ scale, int* __restrict__ found_inf) {
    const float inv = 1.f / *scale;  // torch: inv_scale = scale.reciprocal()
    bool bad = false;
    const int stride = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float g = to_float(grad[i]);
        const float u = g * inv;
        // The input as torch checks it; the output too, since a tiny scale could overflow it.
        bad |= !is_finite(g) || !is_finite(u);
        master[i] = u;
    }
    if (bad) atomicMax(found_inf, 1);  // int atomic, one per thread that saw an overflow
}

}  // namespace incept

// amp_unscale_{f32,f16,bf16}(float* master, const T* grad, int n, const float* scale,
//     int* found_inf)
//   master[i] = grad[i] · (1 / *scale); *found_inf = 1 when any grad[i] or master[i] is inf or
//   NaN (never cleared here: update_loss_scale clears it). For f32, master may be grad itself
//   (in place). Launch: block 256, grid = min(ceil(n/256), 8·SMs) (grid-stride).
INCEPT_INSTANTIATE_ONE(amp_unscale, f32, float, (float* master, const T* grad, int n, const float* __restrict__ scale, int* __restrict__ found_inf),
                     (master, grad, n, scale, found_inf))

// sgd_step(float* param, const float* grad, float* momentum_buf, int n, const float* lr,
//     float momentum, float weight_decay, int nesterov, int first_step, const int* found_inf)
//   torch.optim.SGD (dampening 0) over n elements:
//     g = grad + weight_decay·param
//     momentum 0:  step = g                      (momentum_buf unused, may be null)
//     else:        buf = first_step ? g : momentum·buf + g;  step = nesterov ? g + momentum·buf : buf
//     param -= *lr·step
//   The learning rate is read from device memory, so that a schedule reaches op-by-op and
//   replayed (CUDA graph) steps the same way. Nothing is written when found_inf is not null
//   and *found_inf != 0 (the overflowed step is skipped on the device).
//   With a zero-filled momentum buffer first_step may stay 0: momentum·0 + g is exactly g.
//   Launch: block 256, grid = min(ceil(n/256), 8·SMs) (grid-stride).
extern "C" __global__ void sgd_step(float* __restrict__ param, const float* __restrict__ grad,
                                    float* __restrict__ momentum_buf, int n, const float* __restrict__ lr,
                                    float momentum, float weight_decay, int nesterov, int first_step,
                                    const int* __restrict__ found_inf) {
    if (found_inf != nullptr && *found_inf != 0) return;
    const float rate = *lr;
    const int stride = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float p = param[i];
        const float g = grad[i] + weight_decay * p;
        float step = g;
        if (momentum != 0.f) {
            const float buf = first_step ? g : momentum * momentum_buf[i] + g;
            momentum_buf[i] = buf;
            step = nesterov ? g + momentum * buf : buf;
        }
        param[i] = p - rate * step;
    }
}
INCEPT_REGISTER(sgd_step)

// update_loss_scale(float* scale, int* growth_tracker, int* found_inf, int* skipped_steps,
//     float growth_factor, float backoff_factor, int growth_interval)
//   torch.amp.GradScaler's update: on overflow scale ×= backoff_factor (0.5) and the tracker
//   restarts; otherwise the tracker counts clean steps and at growth_interval (2000) the scale
//   ×= growth_factor (2) unless that would be inf, and the tracker restarts. Then clears
//   *found_inf for the next step and, when skipped_steps is not null, counts the skipped step
//   there (so the host can read how many steps were skipped whenever it syncs anyway).
//   Launch: grid 1, block 1 (any other thread does nothing).
extern "C" __global__ void update_loss_scale(float* __restrict__ scale, int* __restrict__ growth_tracker,
                                             int* __restrict__ found_inf, int* __restrict__ skipped_steps,
                                             float growth_factor, float backoff_factor, int growth_interval) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    if (*found_inf != 0) {
        *scale = *scale * backoff_factor;
        *growth_tracker = 0;
        if (skipped_steps != nullptr) *skipped_steps += 1;
    } else {
        int clean = *growth_tracker + 1;
        if (clean >= growth_interval) {
            const float grown = *scale * growth_factor;
            if (incept::is_finite(grown)) *scale = grown;
            clean = 0;
        }
        *growth_tracker = clean;
    }
    *found_inf = 0;
}
INCEPT_REGISTER(update_loss_scale)
