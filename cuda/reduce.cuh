// Grid-wide deterministic per-channel reductions over [P, C] (channel fastest), shared by the
// BatchNorm statistics and gradients (batch_norm.cu) and the bias gradient (conv.cu):
// block (bx, by) of the grid owns channels [bx·blockDim.x, +blockDim.x) and a share of the
// rows; each thread accumulates its rows in float, the block combines its threads in double in
// a fixed order and writes its partial to a workspace; the last block of each channel group to
// finish (int atomic on a counter) merges the partials in a fixed order, in double. No float
// atomics.
#pragma once
#include "common.cuh"

namespace incept {

constexpr int REDUCE_MAX_BX = 32;
constexpr int REDUCE_MAX_BY = 32;

// Rows [r0, r1) of chunk `b` of `G` over P rows (trailing chunks may be empty).
__device__ __forceinline__ void reduce_chunk(int P, int G, int b, int& r0, int& r1) {
    const int per = (P + G - 1) / G;
    r0 = min(P, b * per);
    r1 = min(P, r0 + per);
}

// After every thread has written its block's partial to global memory: true in exactly one
// block per channel group (blockIdx.x), the last to arrive, which then sees every partial.
// Resets the group's counter for the next launch.
__device__ __forceinline__ bool reduce_last_block(int* counters) {
    __shared__ int last;
    __threadfence();  // this thread's partial is visible device-wide before the count
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) {
        const int done = atomicAdd(&counters[blockIdx.x], 1);
        last = done == (int)gridDim.y - 1;
        if (last) counters[blockIdx.x] = 0;
    }
    __syncthreads();
    if (last) __threadfence();  // order the reads of the partials after the count
    return last != 0;
}

}  // namespace incept
