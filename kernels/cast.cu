// Casts between f32 and bf16 (round to nearest even, as torch's .to(bfloat16)).
//
// LAUNCH cast_f32_bf16 / cast_bf16_f32: block=256 grid=ceil(n/256)
// Measured % of ceiling: not yet run on a GPU (written 2026-11-26, compile-checked only).

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

extern "C" __global__ void cast_f32_bf16(const float* __restrict__ x, bf16* __restrict__ y, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __float2bfloat16_rn(x[i]);
}

extern "C" __global__ void cast_bf16_f32(const bf16* __restrict__ x, float* __restrict__ y, long long n) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = __bfloat162float(x[i]);
}
