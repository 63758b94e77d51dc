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
// - Everything runs on the OS thread that calls `emu_launch`: no threads are created. The CUDA
//   threads of a block are user-level contexts (coroutines) on stacks of EMU_STACK_BYTES
//   (64 KiB, mmap'd once with a guard page below, reused by every launch). Thread 0 runs until
//   it returns or reaches a barrier (`__syncthreads`, a shuffle, `__syncwarp`); only then is it
//   suspended and the next thread started. A thread that returns frees its stack for the next
//   one, so a kernel without barriers runs its threads one after another, each to completion,
//   on one hot stack. A barrier is released when every thread of the block (of the warp, for
//   shuffles and __syncwarp) that has not returned has reached it; the released threads then
//   resume in thread-id order. A thread that returns from the kernel early drops out of the
//   barriers, as exited threads do on sm_70+. The switch is a few instructions of assembly on
//   x86-64 ELF; elsewhere (or with -DINCEPT_EMU_UCONTEXT) it is ucontext's swapcontext.
// - threadIdx, blockIdx, blockDim, gridDim are globals the scheduler sets before it resumes a
//   thread (thread_local, so launches on different OS threads cannot see each other's).
// - Warps are groups of 32 consecutive linear thread ids. A shuffle writes the lane's value to
//   its exchange slot (two per lane, used alternately), waits at the warp barrier and reads the
//   source lane's slot: all live lanes of the warp must take part (full mask), as the kernels'
//   conventions require.
// - A barrier that can never be released (some threads wait at __syncthreads or a shuffle that
//   others of the block or warp never reach: a barrier in divergent code) aborts the process
//   with a message naming the block and what its threads wait for.
// - Global-memory atomics on int use the compiler's __atomic builtins.
//
// What it does not model: memory coalescing, caches, bank conflicts, occupancy and timing;
// lockstep execution of a warp (lanes run one after another between barriers, so code that
// relies on implicit warp-synchronous execution without __syncwarp is not checked, and reads a
// lane's stale value instead); partial masks of __syncwarp (it waits for the whole warp);
// concurrent blocks and the GPU's relaxed memory model across blocks (blocks run one after
// another here, so a missing __threadfence or an inter-block race cannot show); races between
// the threads of a block (they never run at the same time: a missing __syncthreads shows only
// when the thread-id order of execution gets the wrong value, e.g. a later thread's write read
// by an earlier thread); dynamic shared memory (`extern __shared__`); stack use beyond 64 KiB
// per thread (it hits the guard page: a segfault).
#pragma once

#ifndef INCEPT_EMU
#error "emu.h is the host emulation of CUDA: compile with -DINCEPT_EMU"
#endif

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
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

// ---- the scheduler of a block's threads (see the top of this file) -----------------------------
// Defined below, with emu_launch; the built-ins need only these.
inline void emu_wait_block();
inline void emu_wait_warp();
inline uint64_t* emu_exchange_slot(int tid, unsigned parity);
inline unsigned emu_next_shuffle_parity();
inline thread_local int emu_tid = 0;  // linear thread id within the block of the running thread

inline void __syncthreads() { emu_wait_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_wait_warp(); }
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
    const int tid = emu_tid, warp = tid / 32;
    const int threads = (int)(blockDim.x * blockDim.y * blockDim.z);
    const int lanes = threads - warp * 32 < 32 ? threads - warp * 32 : 32;
    // Two slots per lane, used alternately: a lane cannot overwrite the slot of this shuffle
    // before every lane has read it, since that takes the warp barrier of the next shuffle.
    const unsigned parity = emu_next_shuffle_parity();
    uint64_t slot = 0;
    std::memcpy(&slot, &v, sizeof(V));
    *emu_exchange_slot(tid, parity) = slot;
    emu_wait_warp();  // every live lane has published its value
    V out = v;
    if (src_lane >= 0 && src_lane < lanes) {
        const uint64_t s = *emu_exchange_slot(warp * 32 + src_lane, parity);
        std::memcpy(&out, &s, sizeof(V));
    }
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

// ---- user-level contexts ------------------------------------------------------------------------
// A context is a suspended stack. `emu_ctx_make` prepares one that starts in `emu_runner_entry`
// (which never returns), `emu_ctx_swap` saves the running one in `from` and resumes `to`.
inline void emu_runner_entry();

#if defined(__x86_64__) && defined(__ELF__) && !defined(INCEPT_EMU_UCONTEXT)
#define INCEPT_EMU_ASM_SWITCH 1
// incept_emu_ctx_switch(save, sp): pushes the callee-saved registers (System V: rbp, rbx,
// r12–r15) and the return address on the running stack, stores its stack pointer in *save,
// loads `sp` and pops the same frame from there. The floating-point control words are shared
// by every context (nothing here changes them). incept_emu_ctx_start is where a new context's
// first switch "returns" to: it calls the function in r13 on a 16-byte aligned stack. Both are
// in a COMDAT group, so that every translation unit may include this header.
extern "C" void incept_emu_ctx_switch(void** save, void* sp);
extern "C" void incept_emu_ctx_start();
__asm__(
    ".pushsection .text.incept_emu_ctx_switch,\"axG\",@progbits,incept_emu_ctx_switch,comdat\n"
    ".weak incept_emu_ctx_switch\n"
    ".hidden incept_emu_ctx_switch\n"
    ".type incept_emu_ctx_switch,@function\n"
    "incept_emu_ctx_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size incept_emu_ctx_switch, .-incept_emu_ctx_switch\n"
    ".weak incept_emu_ctx_start\n"
    ".hidden incept_emu_ctx_start\n"
    ".type incept_emu_ctx_start,@function\n"
    "incept_emu_ctx_start:\n"
    "  callq *%r13\n"
    "  ud2\n"
    ".size incept_emu_ctx_start, .-incept_emu_ctx_start\n"
    ".popsection\n");

struct EmuContext {
    void* sp = nullptr;
};
inline void emu_ctx_make(EmuContext& c, char* stack_lo, size_t size) {
    const uintptr_t top = (uintptr_t)(stack_lo + size) & ~(uintptr_t)15;
    // The frame incept_emu_ctx_switch pops: r15, r14, r13, r12, rbx, rbp, return address. After
    // the `ret` the stack pointer is top − 16, 16-byte aligned, as `callq` wants it.
    void** sp = (void**)(top - 72);
    sp[0] = nullptr;                                 // r15
    sp[1] = nullptr;                                 // r14
    sp[2] = (void*)&emu_runner_entry;                // r13: called by incept_emu_ctx_start
    sp[3] = nullptr;                                 // r12
    sp[4] = nullptr;                                 // rbx
    sp[5] = nullptr;                                 // rbp
    sp[6] = (void*)&incept_emu_ctx_start;            // return address
    c.sp = sp;
}
inline void emu_ctx_swap(EmuContext& from, EmuContext& to) { incept_emu_ctx_switch(&from.sp, to.sp); }
#else
#include <ucontext.h>
struct EmuContext {
    ucontext_t uc;
};
inline void emu_ctx_make(EmuContext& c, char* stack_lo, size_t size) {
    if (getcontext(&c.uc) != 0) {
        std::perror("emu.h: getcontext");
        std::abort();
    }
    c.uc.uc_stack.ss_sp = stack_lo;
    c.uc.uc_stack.ss_size = size;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, &emu_runner_entry, 0);
}
inline void emu_ctx_swap(EmuContext& from, EmuContext& to) {
    if (swapcontext(&from.uc, &to.uc) != 0) {
        std::perror("emu.h: swapcontext");
        std::abort();
    }
}
#endif

// ---- runners -----------------------------------------------------------------------------------
// A runner is a context with its own stack that starts the threads of a block one after another
// by plain calls of the kernel (emu_runner_entry). When a thread reaches a barrier, it keeps the
// runner (its frames are on that stack) and switches to the scheduler, which hands the next
// unstarted threads to another runner; when a resumed thread returns, its runner goes on
// starting threads, or parks as idle. So a block without barriers runs on one runner with no
// switch per thread, and a block with barriers needs one runner per suspended thread.
// Runners and their stacks are created on demand and kept for the whole process.
constexpr size_t EMU_STACK_BYTES = 64 * 1024;

struct EmuRunner {
    EmuContext ctx;
    char* stack = nullptr;
};

// Stacks are mmap'd with a PROT_NONE guard page below (an overflow is a segfault, not a silent
// corruption of the neighbour).
inline char* emu_new_stack() {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    void* m = mmap(nullptr, EMU_STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                   -1, 0);
    if (m == MAP_FAILED) {
        std::perror("emu.h: mmap of a thread stack");
        std::abort();
    }
    if (mprotect(m, page, PROT_NONE) != 0) {
        std::perror("emu.h: mprotect of a stack guard page");
        std::abort();
    }
    return (char*)m + page;
}

// ---- the scheduler of one launch ----------------------------------------------------------------
enum class EmuThreadState : uint8_t { Unstarted, Running, Ready, AtBlockBarrier, AtWarpBarrier, Done };

struct EmuThread {
    EmuThreadState state = EmuThreadState::Unstarted;
    int runner = -1;        // the runner whose stack holds the suspended thread
    unsigned shuffles = 0;  // shuffles done in this block: selects the exchange slot
};

struct EmuScheduler {
    EmuContext main;  // the emu_launch caller, which runs the scheduling loop
    dim3 block;
    int threads = 0;
    const std::function<void()>* kernel = nullptr;
    std::vector<EmuThread> thr;
    std::vector<int> ready;  // released threads, resumed in this order
    size_t ready_head = 0;
    int next = 0;      // the next thread to start
    int live = 0;      // threads of the block that have not returned (started or not)
    int at_block = 0;  // of which waiting at __syncthreads
    std::vector<int> warp_live, warp_waiting;
    std::vector<uint64_t> exchange;  // two shuffle slots per thread
    int current = -1;                // the running thread
    int runner = -1;                 // the runner the running thread is on

    int lanes(int warp) const { return threads - warp * 32 < 32 ? threads - warp * 32 : 32; }
    void set_current(int t) {
        current = t;
        emu_tid = t;
        threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    }
    void release_block() {
        for (int t = 0; t < threads; ++t)
            if (thr[t].state == EmuThreadState::AtBlockBarrier) {
                thr[t].state = EmuThreadState::Ready;
                ready.push_back(t);
            }
        at_block = 0;
    }
    void release_warp(int w) {
        const int end = w * 32 + lanes(w);
        for (int t = w * 32; t < end; ++t)
            if (thr[t].state == EmuThreadState::AtWarpBarrier) {
                thr[t].state = EmuThreadState::Ready;
                ready.push_back(t);
            }
        warp_waiting[w] = 0;
    }
    // The running thread waits here (its runner's stack kept) until the scheduler resumes it.
    void suspend();
    // Bookkeeping of a thread that returned from the kernel: it leaves the block's barriers.
    void finished(int t) {
        const int w = t / 32;
        thr[t].state = EmuThreadState::Done;
        --live;
        --warp_live[w];
        if (at_block > 0 && at_block == live) release_block();
        if (warp_waiting[w] > 0 && warp_waiting[w] == warp_live[w]) release_warp(w);
    }
    void run_block();
};

// The launch in progress (launches are serialized by emu_launch_mutex), and the runners.
inline EmuScheduler* emu_sched = nullptr;
inline std::deque<EmuRunner> emu_runners;  // a deque: contexts keep their address
inline std::vector<int> emu_idle_runners;

inline void EmuScheduler::suspend() {
    const int r = runner;
    thr[current].runner = r;
    emu_ctx_swap(emu_runners[r].ctx, main);
}

inline void emu_wait_block() {
    EmuScheduler& s = *emu_sched;
    s.thr[s.current].state = EmuThreadState::AtBlockBarrier;
    if (++s.at_block == s.live) s.release_block();
    s.suspend();
}
inline void emu_wait_warp() {
    EmuScheduler& s = *emu_sched;
    const int w = s.current / 32;
    s.thr[s.current].state = EmuThreadState::AtWarpBarrier;
    if (++s.warp_waiting[w] == s.warp_live[w]) s.release_warp(w);
    s.suspend();
}
inline uint64_t* emu_exchange_slot(int tid, unsigned parity) { return &emu_sched->exchange[2 * (size_t)tid + parity]; }
inline unsigned emu_next_shuffle_parity() { return emu_sched->thr[emu_sched->current].shuffles++ & 1u; }

// The body of every runner: start the block's unstarted threads one after another, then park
// until the scheduler needs a runner again (in this launch or a later one). The scheduler sets
// `runner` before it switches here.
inline void emu_runner_entry() {
    for (;;) {
        EmuScheduler* s = emu_sched;  // re-read after every park: a later launch has its own
        while (s->next < s->threads) {
            const int t = s->next++;
            s->thr[t].state = EmuThreadState::Running;
            s->set_current(t);
            (*s->kernel)();
            s->finished(t);  // after a barrier `s->runner` is still this runner: it was resumed
        }
        const int r = s->runner;
        emu_idle_runners.push_back(r);
        emu_ctx_swap(emu_runners[r].ctx, s->main);
    }
}

inline void EmuScheduler::run_block() {
    for (int t = 0; t < threads; ++t) thr[t] = EmuThread{};
    ready.clear();
    ready_head = 0;
    next = 0;
    live = threads;
    at_block = 0;
    for (size_t w = 0; w < warp_live.size(); ++w) {
        warp_live[w] = lanes((int)w);
        warp_waiting[w] = 0;
    }
    for (;;) {
        if (ready_head < ready.size()) {
            // Resume a released thread on its runner.
            const int t = ready[ready_head++];
            if (ready_head == ready.size()) {
                ready.clear();
                ready_head = 0;
            }
            thr[t].state = EmuThreadState::Running;
            set_current(t);
            runner = thr[t].runner;
            emu_ctx_swap(main, emu_runners[runner].ctx);
        } else if (next < threads) {
            // Hand the unstarted threads to an idle runner, or a new one.
            if (emu_idle_runners.empty()) {
                EmuRunner& r = emu_runners.emplace_back();  // made in place: a ucontext_t must not move
                r.stack = emu_new_stack();
                emu_ctx_make(r.ctx, r.stack, EMU_STACK_BYTES);
                runner = (int)emu_runners.size() - 1;
            } else {
                runner = emu_idle_runners.back();
                emu_idle_runners.pop_back();
            }
            emu_ctx_swap(main, emu_runners[runner].ctx);
        } else {
            break;
        }
    }
    current = -1;
    if (live > 0) {
        int at_warp = 0;
        for (int t = 0; t < threads; ++t) at_warp += thr[t].state == EmuThreadState::AtWarpBarrier;
        std::fprintf(stderr,
                     "emu_launch: deadlock in block (%u, %u, %u) of %d threads: %d wait at __syncthreads and %d at a "
                     "warp barrier (shuffle or __syncwarp), and none can go on (a barrier in divergent code: threads "
                     "of one block or warp waiting at different barriers)\n",
                     blockIdx.x, blockIdx.y, blockIdx.z, threads, at_block, at_warp);
        std::abort();
    }
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
// blocks of `block` threads, in the block order `order` selects (see emu_block_order), on the
// calling OS thread. Returns when every block has finished.
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
    EmuScheduler s;
    s.block = block;
    s.threads = threads;
    s.kernel = &kernel;
    s.thr.resize(threads);
    s.warp_live.resize((threads + 31) / 32);
    s.warp_waiting.resize((threads + 31) / 32);
    s.exchange.assign(2 * (size_t)threads, 0);
    s.ready.reserve(threads);
    EmuScheduler* const outer = emu_sched;
    emu_sched = &s;
    blockDim = block;
    gridDim = grid;
    for (long i = 0; i < blocks; ++i) {
        const long b = sequence[i];
        blockIdx = dim3((unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y), (unsigned)(b / ((long)grid.x * grid.y)));
        s.run_block();
    }
    emu_sched = outer;
}

// ---- the kernel registry ------------------------------------------------------------------------
// Every `extern "C" __global__` kernel registers itself where it is defined (INCEPT_REGISTER,
// which INCEPT_INSTANTIATE_3 in common.cuh applies to each instantiation): its name, its
// parameter list derived from the function's type, and a launcher taking cuLaunchKernel-style
// arguments (args[i] points to the value of the i-th parameter).
enum EmuParamKind : int { EMU_PARAM_MUT_PTR = 0, EMU_PARAM_CONST_PTR = 1, EMU_PARAM_INT = 2, EMU_PARAM_FLOAT = 3 };
struct EmuParam {
    int kind;          // EmuParamKind
    const char* elem;  // the pointee type of a pointer, "int" or "float" otherwise
    int elem_size;     // its size in bytes
};

template <typename>
inline constexpr bool emu_unsupported = false;
// The pointee types a kernel parameter may point to.
template <typename E>
struct EmuElemName {
    static_assert(emu_unsupported<E>, "kernel parameter: pointer to a type the emulation's registry does not name");
};
#define EMU_ELEM_NAME(TYPE)                              \
    template <>                                          \
    struct EmuElemName<TYPE> {                           \
        static constexpr const char* name = #TYPE;       \
    };
EMU_ELEM_NAME(float)
EMU_ELEM_NAME(double)
EMU_ELEM_NAME(int)
EMU_ELEM_NAME(unsigned int)
EMU_ELEM_NAME(unsigned char)
EMU_ELEM_NAME(__half)
EMU_ELEM_NAME(__nv_bfloat16)
#undef EMU_ELEM_NAME

template <typename P>
struct EmuParamOf {
    static_assert(emu_unsupported<P>, "kernel parameter: only pointers, int and float are registered");
};
template <typename E>
struct EmuParamOf<E*> {
    using U = std::remove_cv_t<E>;
    static constexpr EmuParam value{std::is_const_v<E> ? EMU_PARAM_CONST_PTR : EMU_PARAM_MUT_PTR, EmuElemName<U>::name,
                                    (int)sizeof(U)};
};
template <>
struct EmuParamOf<int> {
    static constexpr EmuParam value{EMU_PARAM_INT, "int", (int)sizeof(int)};
};
template <>
struct EmuParamOf<float> {
    static constexpr EmuParam value{EMU_PARAM_FLOAT, "float", (int)sizeof(float)};
};

using EmuErasedKernel = void (*)();
struct EmuKernel {
    const char* name;
    const EmuParam* params;
    int n_params;
    EmuErasedKernel fn;
    // Runs `fn` (cast back to its type) with the values args[0..n_params) point to.
    void (*launch)(EmuErasedKernel fn, dim3 grid, dim3 block, uint64_t order, void** args);
};

template <typename... P>
struct EmuSignature {
    static constexpr EmuParam params[sizeof...(P) + 1] = {EmuParamOf<P>::value..., EmuParam{-1, nullptr, 0}};
    template <size_t... I>
    static void launch_with(EmuErasedKernel fn, dim3 grid, dim3 block, uint64_t order, void** args,
                            std::index_sequence<I...>) {
        const auto f = reinterpret_cast<void (*)(P...)>(fn);
        const std::tuple<P...> values{*static_cast<P*>(args[I])...};
        emu_launch(grid, block, [&] { std::apply(f, values); }, order);
    }
    static void launch(EmuErasedKernel fn, dim3 grid, dim3 block, uint64_t order, void** args) {
        launch_with(fn, grid, block, order, args, std::index_sequence_for<P...>{});
    }
};

// Filled by static initializers, before main; read only afterwards.
inline std::vector<EmuKernel>& emu_registry() {
    static std::vector<EmuKernel> r;
    return r;
}

template <typename... P>
inline bool emu_register(const char* name, void (*fn)(P...)) {
    emu_registry().push_back(EmuKernel{name, EmuSignature<P...>::params, (int)sizeof...(P),
                                       reinterpret_cast<EmuErasedKernel>(fn), &EmuSignature<P...>::launch});
    return true;
}

// After the definition of a non-template `extern "C" __global__` kernel: registers it (nothing
// for nvcc or NVRTC, see common.cuh).
#define INCEPT_REGISTER(name) [[maybe_unused]] static const bool incept_emu_registered_##name = emu_register(#name, &name);
