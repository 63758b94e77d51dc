// Shared device helpers for the kernels in cuda/: element conversions, warp and block
// reductions, the instantiation macro.
//
// On the GPU this is compiled by NVRTC or nvcc (sm_80+) with cuda_fp16.h / cuda_bf16.h from the
// CUDA toolkit. With -DINCEPT_EMU it is compiled by the host C++ compiler and cuda/emu.h
// supplies the CUDA built-ins instead (see that file for what the emulation models).
#pragma once

#ifdef INCEPT_EMU
#include "emu.h"
#else
#include <cuda_fp16.h>
#include <cuda_bf16.h>
// The host emulation's kernel registry (see cuda/emu.h): nothing on the GPU. Written after the
// definition of every non-template `extern "C" __global__` kernel.
#define INCEPT_REGISTER(name)
#endif

namespace incept {

// ---- element conversions (all arithmetic is done in float) -----------------------------------

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
    return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
    return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
    return __bfloat162float(v);
}

// Round to nearest even.
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
    return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
    return __float2half(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16(v);
}

// ±inf and NaN have the all-ones exponent. Written on the bits so that neither fast-math
// flags nor a missing <math.h> change it.
__device__ __forceinline__ bool is_finite(float v) {
    return (__float_as_int(v) & 0x7f800000) != 0x7f800000;
}

__device__ __forceinline__ float neg_inf() {
    return __int_as_float((int)0xff800000u);
}

// ---- reductions ---------------------------------------------------------------------------------
// Fixed shapes, fixed order: the result depends only on the values and the block size, never on
// timing. The whole warp (block) must call them (full-mask shuffles, __syncthreads inside).

constexpr unsigned FULL_MASK = 0xffffffffu;

template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(FULL_MASK, v, off);
    return v;
}

template <typename A>
__device__ __forceinline__ A warp_max(A v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const A o = __shfl_xor_sync(FULL_MASK, v, off);
        v = o > v ? o : v;
    }
    return v;
}

// Sum over a 1-D block (blockDim.x a multiple of 32, at most 1024); every thread gets the
// result. Warp sums by shuffles, then warp 0 sums the per-warp partials by shuffles.
template <typename A>
__device__ __forceinline__ A block_sum(A v) {
    __shared__ A partial[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // `partial` may still be read by a previous call
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    A total = lane < warps ? partial[lane] : A(0);
    total = warp_sum(total);  // every warp reduces the same values in the same order
    return total;
}

}  // namespace incept

// extern "C" instantiations `name_f32`, `name_f16`, `name_bf16` of a device template
// `incept::name_impl<T>`. The parameter list is spelled with `T`, which each instantiation
// defines in a namespace of its own (extern "C" names ignore namespaces):
//   INCEPT_INSTANTIATE_3(concat_forward, (T* y, int ld), (y, ld))
// defines `extern "C" __global__ void concat_forward_f32(float* y, int ld)` calling
// `incept::concat_forward_impl<float>(y, ld)`, and the same for __half and __nv_bfloat16.
// Under INCEPT_EMU each instantiation also registers itself (INCEPT_REGISTER).
#define INCEPT_INSTANTIATE_ONE(name, suffix, TYPE, params, args)      \
    namespace incept_instance_##name##_##suffix {                     \
    using T = TYPE;                                                   \
    extern "C" __global__ void name##_##suffix params {               \
        incept::name##_impl<T> args;                                  \
    }                                                                 \
    INCEPT_REGISTER(name##_##suffix)                                  \
    }

#define INCEPT_INSTANTIATE_3(name, params, args)                \
    INCEPT_INSTANTIATE_ONE(name, f32, float, params, args)      \
    INCEPT_INSTANTIATE_ONE(name, f16, __half, params, args)     \
    INCEPT_INSTANTIATE_ONE(name, bf16, __nv_bfloat16, params, args)

// The 16-bit instantiations only (`_f16`, `_bf16`): kernels of the mixed-precision path that
// the fp32 path has no use for (it converts nothing; cuDNN adds its bias).
#define INCEPT_INSTANTIATE_16(name, params, args)               \
    INCEPT_INSTANTIATE_ONE(name, f16, __half, params, args)     \
    INCEPT_INSTANTIATE_ONE(name, bf16, __nv_bfloat16, params, args)
