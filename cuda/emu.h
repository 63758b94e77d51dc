// Host emulation of the CUDA built-ins the kernels in cuda/ use, so that the SAME .cu sources
// compile with a host C++20 compiler (`-x c++ -std=c++20 -DINCEPT_EMU -pthread`) and run on
// the CPU in `cargo test` (through the kernel-emu crate).
//
// Execution model of `emu_launch`:
// - Blocks run one after another, in blockIdx order (x fastest), or in a seeded random order
//   (`order` ≠ 0) so that tests can show a result does not depend on which block runs first or
//   finishes last, as it must not on a GPU. `__shared__` is `static`, so every block sees the
//   same storage; that is sound only because blocks never overlap in time and launches are
//   serialized by a process-wide mutex.
// - The threads of a block are real host threads (one std::thread per CUDA thread, created once
//   per launch and reused for every block). `__syncthreads()` is a std::barrier across the
//   block; a thread that returns from the kernel early drops out of it, as exited threads do on
//   sm_70+.
// - Warps are groups of 32 consecutive linear thread ids. A shuffle writes the lane's value to a
//   per-warp exchange slot, waits at a per-warp barrier, reads the source lane's slot and waits
//   again: all 32 lanes must take part (full mask), as the kernels' conventions require.
// - Global-memory atomics on int use the compiler's __atomic builtins.
//
// What it does not model: memory coalescing, caches, bank conflicts, occupancy and timing;
// lockstep execution of a warp (lanes run independently between shuffles, so code that relies
// on implicit warp-synchronous execution without __syncwarp is not checked); concurrent blocks
// and the GPU's relaxed memory model across blocks (blocks run one after another here, so a
// missing __threadfence or an inter-block race cannot show); __syncthreads or a shuffle in
// divergent code (it hangs here; undefined on the GPU). A race between threads of one block is
// a real race here too, but whether it shows depends on the host scheduler.
#pragma once

#ifndef INCEPT_EMU
#error "emu.h is the host emulation of CUDA: compile with -DINCEPT_EMU"
#endif

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

// ---- qualifiers -------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static
#define __launch_bounds__(...)

// ---- built-in vector types and indices --------------------------------------------------------
struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
        : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

// ---- per-block synchronisation state ------------------------------------------------------------
struct EmuBlock {
    std::barrier<> block_bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    std::vector<uint64_t> exchange;  // one 8-byte slot per thread, for shuffles
    explicit EmuBlock(int threads) : block_bar(threads), exchange(threads) {
        for (int w = 0; w * 32 < threads; ++w) {
            int lanes = threads - w * 32 < 32 ? threads - w * 32 : 32;
            warp_bars.emplace_back(new std::barrier<>(lanes));
        }
    }
};
inline thread_local EmuBlock* emu_block = nullptr;
inline thread_local int emu_tid = 0;  // linear thread id within the block

inline void __syncthreads() { emu_block->block_bar.arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_block->warp_bars[emu_tid / 32]->arrive_and_wait(); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }

// Only what the kernels' conventions allow is modelled: full-mask shuffles over whole warps
// (width 32). Anything else stops the test run with a message instead of computing something
// the GPU would not.
inline void emu_check_shuffle(unsigned mask, int width) {
    if (mask != 0xffffffffu || width != 32) {
        std::fprintf(stderr, "emu.h: shuffle with mask %#x, width %d: only full-mask, width-32 shuffles are emulated\n",
                     mask, width);
        std::abort();
    }
}

// Warp shuffle: the lane reads the value of lane `src_lane` (its own when that lane is outside
// the warp, as the hardware does for shfl.down / shfl.xor). Every live lane of the warp must
// call it: a lane that skips a shuffle leaves the others waiting (a hang here, undefined
// behaviour on the GPU).
template <typename V>
inline V emu_shfl(V v, int src_lane) {
    static_assert(sizeof(V) <= 8, "shuffle of a value wider than 8 bytes");
    EmuBlock* b = emu_block;
    const int tid = emu_tid, warp = tid / 32;
    const int threads = (int)(blockDim.x * blockDim.y * blockDim.z);
    const int lanes = threads - warp * 32 < 32 ? threads - warp * 32 : 32;
    uint64_t slot = 0;
    std::memcpy(&slot, &v, sizeof(V));
    b->exchange[tid] = slot;
    b->warp_bars[warp]->arrive_and_wait();  // every lane has published its value
    V out = v;
    if (src_lane >= 0 && src_lane < lanes) {
        const uint64_t s = b->exchange[warp * 32 + src_lane];
        std::memcpy(&out, &s, sizeof(V));
    }
    b->warp_bars[warp]->arrive_and_wait();  // every lane has read before slots are reused
    return out;
}
template <typename V>
inline V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = 32) {
    emu_check_shuffle(mask, width);
    const int lane = emu_tid % 32;
    return emu_shfl(v, lane + (int)delta < 32 ? lane + (int)delta : lane);
}
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
    emu_check_shuffle(mask, width);
    const int lane = emu_tid % 32;
    return emu_shfl(v, lane ^ lane_mask);
}
template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src_lane, int width = 32) {
    emu_check_shuffle(mask, width);
    return emu_shfl(v, src_lane & 31);
}

// ---- atomics on int (global or shared) ---------------------------------------------------------
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicMax(int* p, int v) {
    int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
    }
    return old;
}
inline int atomicOr(int* p, int v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }

// ---- float intrinsics ---------------------------------------------------------------------------
// Round-to-nearest IEEE operations: plain C++ float arithmetic is exactly that when the host
// compiler neither contracts to FMA nor uses x87 (kernel-emu builds with -ffp-contract=off on
// x86-64, where SSE is the default).
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline int __float_as_int(float f) {
    int i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned i;
    std::memcpy(&i, &f, 4);
    return i;
}
inline float __uint_as_float(unsigned i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
// The <math.h> float functions (expf, logf, sqrtf, fmaxf, fminf, fabsf, ...) and the double
// ones come from <cmath>; rsqrtf is CUDA-only.
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
template <typename A>
inline A min(A a, A b) { return b < a ? b : a; }
template <typename A>
inline A max(A a, A b) { return a < b ? b : a; }

// ---- __half and __nv_bfloat16 -------------------------------------------------------------------
// Storage-only 16-bit types, as the kernels use them: loaded, converted to float, computed on
// in float, converted back with round-to-nearest-even (NaN stays NaN, overflow gives inf).
struct __half {
    uint16_t x;
};
struct __nv_bfloat16 {
    uint16_t x;
};

inline float __half2float(__half h) {
    const uint32_t sign = (uint32_t)(h.x & 0x8000u) << 16;
    const uint32_t exp = (h.x >> 10) & 0x1fu;
    uint32_t mant = h.x & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (mant << 13);  // inf or NaN (payload kept)
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);  // normal: rebias 15 → 127
    } else if (mant == 0) {
        bits = sign;  // ±0
    } else {
        // Subnormal half: mant·2^-24, exact in float.
        int e = -1;
        do {
            mant <<= 1;
            ++e;
        } while ((mant & 0x400u) == 0);
        mant &= 0x3ffu;
        bits = sign | ((uint32_t)(112 - e) << 23) | (mant << 13);
    }
    return __uint_as_float(bits);
}

inline __half __float2half(float f) {
    const uint32_t bits = __float_as_uint(f);
    const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    const uint32_t abs = bits & 0x7fffffffu;
    __half h;
    if (abs > 0x7f800000u) {  // NaN: quiet, keep the top payload bits
        h.x = (uint16_t)(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
        return h;
    }
    if (abs >= 0x477ff000u) {  // ≥ 65520 rounds to inf (65504 is the largest half)
        h.x = (uint16_t)(sign | 0x7c00u);
        return h;
    }
    if (abs < 0x38800000u) {  // below 2^-14: subnormal half or zero
        if (abs < 0x33000000u) {  // below 2^-25: rounds to ±0 (2^-25 itself ties to 0)
            h.x = sign;
            return h;
        }
        // value = m·2^(e-150) with the implicit bit; the half subnormal unit is 2^-24.
        const uint32_t e = abs >> 23;
        const uint32_t m = (abs & 0x7fffffu) | 0x800000u;
        // m·2^(e-150) in units of 2^-24 is m·2^(e-126): shift right by 126 - e (14 to 24).
        const uint32_t shift = 126u - e;
        uint32_t q = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1u);
        const uint32_t half_ulp = 1u << (shift - 1u);
        if (rem > half_ulp || (rem == half_ulp && (q & 1u))) ++q;
        h.x = (uint16_t)(sign | q);
        return h;
    }
    // Normal: rebias and round the 23-bit mantissa to 10 bits (a carry may bump the exponent,
    // up to inf, which is right).
    uint32_t v = abs - (112u << 23);
    const uint32_t rem = v & 0x1fffu;
    v >>= 13;
    if (rem > 0x1000u || (rem == 0x1000u && (v & 1u))) ++v;
    h.x = (uint16_t)(sign | v);
    return h;
}

inline float __bfloat162float(__nv_bfloat16 b) { return __uint_as_float((uint32_t)b.x << 16); }

inline __nv_bfloat16 __float2bfloat16(float f) {
    uint32_t bits = __float_as_uint(f);
    __nv_bfloat16 b;
    if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN: quiet
        b.x = (uint16_t)((bits >> 16) | 0x40u);
        return b;
    }
    bits += 0x7fffu + ((bits >> 16) & 1u);  // round to nearest even (overflow → inf)
    b.x = (uint16_t)(bits >> 16);
    return b;
}

// ---- launching ----------------------------------------------------------------------------------
// One launch at a time in the whole process: `__shared__` storage is static.
inline std::mutex emu_launch_mutex;

// The order in which `emu_launch` runs the blocks: 0, 1, 2, … for `order` 0, otherwise a
// permutation drawn from `order` (Fisher–Yates with splitmix64).
inline std::vector<long> emu_block_order(long blocks, uint64_t order) {
    std::vector<long> seq(blocks);
    for (long b = 0; b < blocks; ++b) seq[b] = b;
    uint64_t state = order;
    auto next = [&state] {
        uint64_t z = (state += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    };
    if (order != 0)
        for (long i = blocks - 1; i > 0; --i) std::swap(seq[i], seq[(long)(next() % (uint64_t)(i + 1))]);
    return seq;
}

// Runs `kernel` (a closure calling the __global__ function with its arguments) over `grid`
// blocks of `block` threads, in the block order `order` selects (see emu_block_order). Returns
// when every block has finished.
inline void emu_launch(dim3 grid, dim3 block, const std::function<void()>& kernel, uint64_t order = 0) {
    std::lock_guard<std::mutex> lock(emu_launch_mutex);
    const int threads = (int)(block.x * block.y * block.z);
    const long blocks = (long)grid.x * grid.y * grid.z;
    if (threads <= 0 || blocks <= 0) return;
    if (threads > 1024) {
        std::fprintf(stderr, "emu_launch: %d threads per block (CUDA allows 1024)\n", threads);
        std::abort();
    }
    const std::vector<long> sequence = emu_block_order(blocks, order);
    long current = 0;
    std::unique_ptr<EmuBlock> state(new EmuBlock(threads));
    // Runs once per block, after every thread finished it and before any starts the next.
    auto next_block = [&]() noexcept {
        ++current;
        state.reset(current < blocks ? new EmuBlock(threads) : nullptr);
    };
    std::barrier<decltype(next_block)> block_done(threads, next_block);
    auto worker = [&](int tid) {
        blockDim = block;
        gridDim = grid;
        threadIdx = dim3(tid % block.x, (tid / block.x) % block.y, tid / (block.x * block.y));
        emu_tid = tid;
        for (;;) {
            if (current >= blocks) break;  // `current` is published by the block_done barrier
            const long b = sequence[current];
            blockIdx = dim3((unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y),
                            (unsigned)(b / ((long)grid.x * grid.y)));
            emu_block = state.get();
            kernel();
            // Leave the block's barriers, so threads still inside the kernel are not kept
            // waiting for one that returned (exited threads do not take part on the GPU).
            emu_block->warp_bars[tid / 32]->arrive_and_drop();
            emu_block->block_bar.arrive_and_drop();
            block_done.arrive_and_wait();
        }
        emu_block = nullptr;
    };
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (int t = 0; t < threads; ++t) pool.emplace_back(worker, t);
    for (auto& t : pool) t.join();
}
