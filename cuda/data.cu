// The input pipeline on the device: CIFAR-10 records (uint8, resident in GPU memory) →
// normalised, randomly cropped and flipped NHWC batch, exactly as src/data.rs `make_batch`
// builds it on the CPU. The crop offsets and flips are drawn on the host by the same code as
// the CPU path (`View::draw`) and passed per image.
//
// Record layout: 1 label byte, then the R, G and B planes, each 32×32 row-major (3073 bytes).
// Output pixel (oy, ox) of image b shows source pixel (oy + dy[b], cx + dx[b]) with
// cx = 31 − ox when flip[b] and ox otherwise; a source outside the 32×32 image is padding,
// byte 0, normalised like a black pixel. Value of channel c for byte v:
//   (v / 255 − mean[c]) / std[c]
// in float, with IEEE round-to-nearest division and subtraction (the __f*_rn intrinsics, so
// neither FMA contraction nor fast-math flags can change a bit): the same float as make_batch.
#include "common.cuh"

namespace incept {

constexpr int CIFAR_SIDE = 32;
constexpr int CIFAR_PLANE = CIFAR_SIDE * CIFAR_SIDE;
constexpr int CIFAR_PIXELS = 3 * CIFAR_PLANE;  // values per image
constexpr int CIFAR_RECORD = 1 + CIFAR_PIXELS;

template <typename T>
__device__ __forceinline__ void augment_batch_impl(T* __restrict__ out, const unsigned char* __restrict__ records,
                                                   int n_records,
                                                   const int* __restrict__ indices, const int* __restrict__ dy,
                                                   const int* __restrict__ dx, const int* __restrict__ flip,
                                                   const float* __restrict__ mean, const float* __restrict__ stdev,
                                                   int batch) {
    for (int b = blockIdx.y; b < batch; b += gridDim.y) {
        const int index = indices[b];
        const bool valid = index >= 0 && index < n_records;
        const unsigned char* rec = records + (size_t)(valid ? index : 0) * CIFAR_RECORD;
        const int oy_shift = dy[b], ox_shift = dx[b];
        const bool mirrored = flip[b] != 0;
        T* img = out + (size_t)b * CIFAR_PIXELS;
        // One output value per thread: consecutive threads write consecutive NHWC values.
        for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < CIFAR_PIXELS; e += gridDim.x * blockDim.x) {
            const int pixel = e / 3;
            const int c = e - pixel * 3;
            const int oy = pixel / CIFAR_SIDE, ox = pixel - oy * CIFAR_SIDE;
            const int sy = oy + oy_shift;
            const int sx = (mirrored ? CIFAR_SIDE - 1 - ox : ox) + ox_shift;
            const bool inside = sy >= 0 && sy < CIFAR_SIDE && sx >= 0 && sx < CIFAR_SIDE;
            const int byte = inside && valid ? (int)rec[1 + c * CIFAR_PLANE + sy * CIFAR_SIDE + sx] : 0;
            float v = __fdiv_rn(__fsub_rn(__fdiv_rn((float)byte, 255.0f), mean[c]), stdev[c]);
            if (!valid) v = __int_as_float(0x7fc00000);  // a bad index shows as NaN, not as data
            img[e] = from_float<T>(v);
        }
    }
}

}  // namespace incept

// augment_batch_{f32,f16,bf16}(T* out, const unsigned char* records, int n_records,
//     const int* indices, const int* dy, const int* dx, const int* flip, const float* mean,
//     const float* stdev, int batch)
//   out [batch, 32, 32, 3] NHWC; records [n_records, 3073]; indices, dy, dx, flip [batch]
//   (offsets in −4..=4, flip 0 or 1); mean, stdev [3]. An index outside 0..n_records gives
//   NaN values. The labels stay with the host, which stages them for the loss.
//   Launch: block 256, grid (12, batch) (3072 values per image; grid-stride on both axes, so
//   grid.y may be smaller than batch).
INCEPT_INSTANTIATE_3(augment_batch,
                     (T* __restrict__ out, const unsigned char* __restrict__ records, int n_records, const int* __restrict__ indices, const int* __restrict__ dy,
                      const int* __restrict__ dx, const int* __restrict__ flip, const float* __restrict__ mean,
                      const float* __restrict__ stdev, int batch),
                     (out, records, n_records, indices, dy, dx, flip, mean, stdev, batch))
