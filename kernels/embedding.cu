// Token embedding gather and image-feature scatter on bf16 rows.
//
// embedding_bf16: out[t] = table[ids[t]]; ids are checked on the host (< vocab; image
// placeholders are replaced by the host before the launch). scatter_rows_bf16:
// dst[rows[i]] = src[i], which puts projected image features at their placeholder positions.
// Both are row copies with 16-byte accesses, one CTA per row.
//
// LAUNCH embedding_bf16: block=256 grid=tokens
// LAUNCH scatter_rows_bf16: block=256 grid=count
// Requirements: width % 8 == 0, 16-byte aligned buffers.
// Measured % of ceiling: not yet run on a GPU (written 2026-11-26, compile-checked only).

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

__device__ __forceinline__ void copy_row(const bf16* from, bf16* to, int width) {
  const uint4* f = reinterpret_cast<const uint4*>(from);
  uint4* d = reinterpret_cast<uint4*>(to);
  for (int k = threadIdx.x; k < width / 8; k += blockDim.x) d[k] = f[k];
}

extern "C" __global__ void embedding_bf16(const unsigned* __restrict__ ids, const bf16* __restrict__ table,
                                          bf16* __restrict__ out, int width) {
  copy_row(table + (long long)ids[blockIdx.x] * width, out + (long long)blockIdx.x * width, width);
}

extern "C" __global__ void scatter_rows_bf16(bf16* __restrict__ dst, const int* __restrict__ rows,
                                             const bf16* __restrict__ src, int width) {
  copy_row(src + (long long)blockIdx.x * width, dst + (long long)rows[blockIdx.x] * width, width);
}
