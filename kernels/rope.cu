// Rotary position embedding, rotate-half form (Phi-3): x' = x*cos + rotate_half(x)*sin with
// rotate_half(x) = cat(-x[d/2:], x[:d/2]), in place on bf16, f32 math.
//
// cos/sin are f32 tables [rows, head_dim] that already hold LongRoPE's per-frequency factors and
// mscale (the host builds them once per step, as the CPU path does), so this kernel is a pure
// element-wise pass and exact to the table. One thread per (row, head, pair i < d/2): it owns
// x[i] and x[i + d/2], so the in-place update needs no synchronisation.
//
// LAUNCH rope_bf16: block=128 grid=(ceil(heads*head_dim/2 / 128), rows)
// Measured % of ceiling: not yet run on a GPU (written 2026-11-26, compile-checked only).

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

extern "C" __global__ void rope_bf16(bf16* x, int row_stride, int heads, int head_dim,
                                     const float* __restrict__ cos, const float* __restrict__ sin) {
  const int half = head_dim / 2;
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= heads * half) return;
  const int h = t / half, i = t % half;
  const long long r = blockIdx.y;
  bf16* xh = x + r * row_stride + h * head_dim;
  const float* c = cos + r * head_dim;
  const float* s = sin + r * head_dim;
  const float a = __bfloat162float(xh[i]), b = __bfloat162float(xh[i + half]);
  xh[i] = __float2bfloat16(a * c[i] - b * s[i]);
  xh[i + half] = __float2bfloat16(b * c[i + half] + a * s[i + half]);
}
