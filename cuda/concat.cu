// The Inception join: each branch's NHWC output [P, C] (P = N·H·W pixels) is a block of
// columns of the joined tensor [P, ld] (ld = Σ C over the branches). One launch per part, so a
// branch can copy its part on its own stream as soon as it is done; the parts are disjoint, so
// the launches need no ordering between them. (Where the branch ends in BN+ReLU,
// batch_norm_relu_apply_* writes straight into the slice and no copy is needed at all.)
#include "common.cuh"

namespace incept {

// dst[p·ld_dst + off_dst + c] = src[p·ld_src + off_src + c] for p < P, c < C.
// Copies 16-byte vectors (8 halves or 4 floats) when every row start of both sides is 16-byte
// aligned, element by element otherwise. Grid-stride loop over the P·C (or P·C/V) elements,
// so any grid works; consecutive threads copy consecutive elements of a row (coalesced).
template <typename T>
__device__ __forceinline__ void copy_columns(T* dst, int ld_dst, int off_dst, const T* src, int ld_src,
                                             int off_src, int P, int C) {
    constexpr int V = 16 / (int)sizeof(T);
    const int first = blockIdx.x * blockDim.x + threadIdx.x;
    const int stride = gridDim.x * blockDim.x;
    const bool aligned = C % V == 0 && ld_dst % V == 0 && off_dst % V == 0 && ld_src % V == 0 &&
                         off_src % V == 0 && ((unsigned long long)dst & 15ull) == 0 &&
                         ((unsigned long long)src & 15ull) == 0;
    if (aligned) {
        const int cv = C / V;
        const int total = P * cv;
        for (int i = first; i < total; i += stride) {
            const int p = i / cv;
            const int c = (i - p * cv) * V;
            const uint4 v = *reinterpret_cast<const uint4*>(src + (size_t)p * ld_src + off_src + c);
            *reinterpret_cast<uint4*>(dst + (size_t)p * ld_dst + off_dst + c) = v;
        }
    } else {
        const int total = P * C;
        for (int i = first; i < total; i += stride) {
            const int p = i / C;
            const int c = i - p * C;
            dst[(size_t)p * ld_dst + off_dst + c] = src[(size_t)p * ld_src + off_src + c];
        }
    }
}

template <typename T>
__device__ __forceinline__ void concat_forward_impl(T* __restrict__ y, int ldy, int y_off,
                                                    const T* __restrict__ x, int P, int C) {
    copy_columns<T>(y, ldy, y_off, x, C, 0, P, C);
}

template <typename T>
__device__ __forceinline__ void concat_backward_impl(T* __restrict__ dx, const T* __restrict__ dy,
                                                     int ldy, int dy_off, int P, int C) {
    copy_columns<T>(dx, C, 0, dy, ldy, dy_off, P, C);
}

}  // namespace incept

// concat_forward_{f32,f16,bf16}(T* y, int ldy, int y_off, const T* x, int P, int C)
//   y[p·ldy + y_off + c] = x[p·C + c]: part x [P, C] into columns y_off..y_off+C of y [P, ldy].
//   Launch: block = 256 (any multiple of 32), grid = min(ceil(P·C / V / 256), 8·SMs) with
//   V = 16 / sizeof(T) (grid-stride, so a smaller grid is correct too). P·ldy < 2^31.
INCEPT_INSTANTIATE_3(concat_forward, (T* __restrict__ y, int ldy, int y_off, const T* __restrict__ x, int P, int C),
                     (y, ldy, y_off, x, P, C))

// concat_backward_{f32,f16,bf16}(T* dx, const T* dy, int ldy, int dy_off, int P, int C)
//   dx[p·C + c] = dy[p·ldy + dy_off + c]: the part's gradient out of the joined gradient.
//   Launch: as concat_forward.
INCEPT_INSTANTIATE_3(concat_backward, (T* __restrict__ dx, const T* __restrict__ dy, int ldy, int dy_off, int P, int C),
                     (dx, dy, ldy, dy_off, P, C))
