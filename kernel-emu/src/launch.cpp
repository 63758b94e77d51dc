// extern "C" launch wrappers: `emu_<kernel>(EmuDims, kernel arguments...)` runs the kernel of
// cuda/*.cu (compiled for the host by build.rs) over the given grid with emu_launch.
#include "emu.h"

extern "C" {
struct EmuDims {
    unsigned grid_x, grid_y, grid_z;
    unsigned block_x, block_y, block_z;
    uint64_t order;  // 0: blocks in blockIdx order; otherwise the seed of a random order
};
}

#define EMU_UNPAREN(...) __VA_ARGS__

// Declares kernel `name` (its C symbol, compiled from cuda/) and defines `emu_name`.
#define EMU_WRAP(name, params, args)                                                  \
    extern "C" void name params;                                                      \
    extern "C" void emu_##name(EmuDims d, EMU_UNPAREN params) {                       \
        emu_launch(dim3(d.grid_x, d.grid_y, d.grid_z), dim3(d.block_x, d.block_y, d.block_z), \
                   [&] { name args; }, d.order);                                      \
    }

// The same for the three instantiations name_f32, name_f16, name_bf16, with `T` in params.
#define EMU_WRAP_ONE(name, suffix, TYPE, params, args) \
    namespace emu_wrap_##name##_##suffix {             \
    using T = TYPE;                                    \
    EMU_WRAP(name##_##suffix, params, args)            \
    }
#define EMU_WRAP_3(name, params, args)                   \
    EMU_WRAP_ONE(name, f32, float, params, args)         \
    EMU_WRAP_ONE(name, f16, __half, params, args)        \
    EMU_WRAP_ONE(name, bf16, __nv_bfloat16, params, args)

// ---- concat.cu
EMU_WRAP_3(concat_forward, (T * y, int ldy, int y_off, const T* x, int P, int C), (y, ldy, y_off, x, P, C))
EMU_WRAP_3(concat_backward, (T * dx, const T* dy, int ldy, int dy_off, int P, int C), (dx, dy, ldy, dy_off, P, C))

// ---- bn_relu.cu
EMU_WRAP_3(batch_norm_stats,
           (float* mean, float* invstd, float* running_mean, float* running_var, double* workspace, int* counters,
            const T* x, int P, int C, float eps, float momentum),
           (mean, invstd, running_mean, running_var, workspace, counters, x, P, C, eps, momentum))
EMU_WRAP_3(batch_norm_relu_apply,
           (T * y, int ldy, int y_off, const T* x, const float* mean, const float* invstd, const float* gamma,
            const float* beta, int P, int C, int relu),
           (y, ldy, y_off, x, mean, invstd, gamma, beta, P, C, relu))
EMU_WRAP_3(batch_norm_relu_backward_reduce,
           (float* coef, float* dgamma, float* dbeta, double* workspace, int* counters, const T* dy, int ld_dy,
            int dy_off, const T* y, int ld_y, int y_off, const T* x, const float* mean, const float* invstd,
            const float* gamma, int P, int C, int relu),
           (coef, dgamma, dbeta, workspace, counters, dy, ld_dy, dy_off, y, ld_y, y_off, x, mean, invstd, gamma, P,
            C, relu))
EMU_WRAP_3(batch_norm_relu_backward_apply,
           (T * dx, const T* dy, int ld_dy, int dy_off, const T* y, int ld_y, int y_off, const T* x,
            const float* mean, const float* coef, int P, int C, int relu),
           (dx, dy, ld_dy, dy_off, y, ld_y, y_off, x, mean, coef, P, C, relu))
EMU_WRAP_3(bias_grad, (float* db, double* workspace, int* counters, const T* dy, int P, int C, int R),
           (db, workspace, counters, dy, P, C, R))
EMU_WRAP(batch_norm_eval_invstd, (float* invstd, const float* running_var, int C, float eps),
         (invstd, running_var, C, eps))

// ---- loss.cu
EMU_WRAP(cross_entropy_forward_backward,
         (float* dlogits, float* loss, int* correct, const float* logits, const int* labels, int N, int K,
          float smoothing, const float* loss_scale),
         (dlogits, loss, correct, logits, labels, N, K, smoothing, loss_scale))

EMU_WRAP(accumulate_step_metrics, (double* sums, const float* loss, const int* correct, int n),
         (sums, loss, correct, n))

// ---- optim.cu
EMU_WRAP_3(amp_unscale, (float* master, const T* grad, int n, const float* scale, int* found_inf),
           (master, grad, n, scale, found_inf))
EMU_WRAP(sgd_step,
         (float* param, const float* grad, float* momentum_buf, int n, float lr, float momentum, float weight_decay,
          int nesterov, int first_step, const int* found_inf, const float* lr_device),
         (param, grad, momentum_buf, n, lr, momentum, weight_decay, nesterov, first_step, found_inf, lr_device))
EMU_WRAP(update_loss_scale,
         (float* scale, int* growth_tracker, int* found_inf, int* skipped_steps, float growth_factor,
          float backoff_factor, int growth_interval),
         (scale, growth_tracker, found_inf, skipped_steps, growth_factor, backoff_factor, growth_interval))

// ---- data.cu
EMU_WRAP_3(augment_batch,
           (T * out, int* labels_out, const unsigned char* records, int n_records, const int* indices,
            const int* dy, const int* dx, const int* flip, const float* mean, const float* stdev, int batch),
           (out, labels_out, records, n_records, indices, dy, dx, flip, mean, stdev, batch))

// ---- the emulation's own conversions, so tests can check them against the `half` crate
extern "C" uint16_t emu_float2half_bits(float v) { return __float2half(v).x; }
extern "C" float emu_half_bits2float(uint16_t b) { return __half2float(__half{b}); }
extern "C" uint16_t emu_float2bfloat16_bits(float v) { return __float2bfloat16(v).x; }
extern "C" float emu_bfloat16_bits2float(uint16_t b) { return __bfloat162float(__nv_bfloat16{b}); }

// ---- elementwise.cu
EMU_WRAP_3(relu_forward, (T * y, const T* x, int n), (y, x, n))
EMU_WRAP_3(relu_backward, (T * dy, const T* y, int n), (dy, y, n))
EMU_WRAP_3(fork_backward, (T * dx, const T* a, const T* b, const T* c, const T* e, int n), (dx, a, b, c, e, n))
EMU_WRAP_3(convert_from_f32, (T * dst, const float* src, int n), (dst, src, n))
EMU_WRAP_3(convert_to_f32, (float* dst, const T* src, int n), (dst, src, n))
EMU_WRAP_3(weight_oihw_to_ohwi, (T * dst, const float* src, int K, int C, int RS), (dst, src, K, C, RS))
EMU_WRAP_3(add_ohwi_to_oihw, (float* grad, const T* g, int K, int C, int RS), (grad, g, K, C, RS))
EMU_WRAP_3(bias_add, (T * y, const float* b, int P, int C), (y, b, P, C))

// ---- pool.cu
EMU_WRAP_3(avg_pool2d_backward, (T * dx, const T* dy, int N, int H, int W, int C), (dx, dy, N, H, W, C))
