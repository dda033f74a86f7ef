// Appends keys and values to the decoder's head-major KV cache.
//
// src rows (the fused qkv projection's output, `src_row_stride` apart) hold heads * head_dim
// values per position; cache element (h, pos, c) lives at cache[h * head_stride + pos * head_dim
// + c], so decode streams each head's keys contiguously (flash_decode_bf16). One CTA per
// (position, head), 16-byte copies of one head's row.
//
// LAUNCH kv_cache_write_bf16: block=32 grid=(rows, heads)
// Requirements: head_dim % 8 == 0, src_row_stride % 8 == 0, head_stride % 8 == 0, 16-byte
// aligned base pointers.
// Measured % of ceiling: not yet run on a GPU (written 2026-11-26, compile-checked only).

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

extern "C" __global__ void kv_cache_write_bf16(const bf16* __restrict__ src, int src_row_stride,
                                               bf16* __restrict__ cache, long long head_stride,
                                               int head_dim, int pos0) {
  const int r = blockIdx.x, h = blockIdx.y;
  const uint4* from = reinterpret_cast<const uint4*>(src + (long long)r * src_row_stride + (long long)h * head_dim);
  uint4* to = reinterpret_cast<uint4*>(cache + h * head_stride + (long long)(pos0 + r) * head_dim);
  for (int k = threadIdx.x; k < head_dim / 8; k += blockDim.x) to[k] = from[k];
}
