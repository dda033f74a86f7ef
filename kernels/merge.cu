// The 2x2 merge of Phi-3-vision's image embedding and the separator layout, as one gather.
//
// feat: n crops of g*g patch rows of c (row-major g x g grid), crop_stride elements apart (so
// CLIP's output with its CLS row can be read in place: base past the first CLS, stride 577c)
// -> out [tokens, 4c]. Output
// token t takes src[t]: src[t] >= 0 is merged token (crop, i, j) = crop*(g/2)^2 + i*(g/2) + j,
// out[t][(dy*2 + dx)*c + ch] = feat[crop][(2i+dy)*g + 2j+dx][ch]; src[t] < 0 is separator row
// -src[t]-1 of sep [nsep, 4c] (sub_GN, glb_GN). The host computes src from the crop grid (the
// order of spec §4), so every layout rule lives in one place on the CPU side and the kernel is
// a copy: patches 2j and 2j+1 are adjacent, so each quarter pair is one contiguous 2c copy.
//
// LAUNCH merge_2x2_bf16: block=256 grid=tokens (one CTA per output token, 16-byte copies)
// Requirements: c % 8 == 0, crop_stride % 8 == 0, 16-byte aligned buffers.
// Measured % of ceiling: not yet run on a GPU (written 2026-11-26, compile-checked only).

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

extern "C" __global__ void merge_2x2_bf16(const bf16* __restrict__ feat, const bf16* __restrict__ sep,
                                          const int* __restrict__ src, bf16* __restrict__ out,
                                          long long crop_stride, int g, int c) {
  const long long t = blockIdx.x;
  const int s = src[t];
  const int width8 = 4 * c / 8;  // 16-byte chunks per output row
  uint4* dst = reinterpret_cast<uint4*>(out + t * 4 * c);
  if (s < 0) {
    const uint4* from = reinterpret_cast<const uint4*>(sep + (long long)(-s - 1) * 4 * c);
    for (int k = threadIdx.x; k < width8; k += blockDim.x) dst[k] = from[k];
    return;
  }
  const int h = g / 2;
  const int crop = s / (h * h), i = (s % (h * h)) / h, j = s % h;
  const int pair8 = 2 * c / 8;  // chunks of one (dy) row pair: patches 2j, 2j+1
  for (int k = threadIdx.x; k < width8; k += blockDim.x) {
    const int dy = k / pair8, off = k % pair8;
    const long long patch = (long long)((2 * i + dy) * g + 2 * j);
    dst[k] = reinterpret_cast<const uint4*>(feat + crop * crop_stride + patch * c)[off];
  }
}
