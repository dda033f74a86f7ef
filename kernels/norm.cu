// LayerNorm (CLIP) and RMSNorm (Phi-3) over rows of bf16, statistics in f32.
//
// One CTA of 256 threads per row. The row (at most 4096 wide here) is read from global memory
// once into registers-by-stride and kept in shared memory as f32, so the two passes of the
// LayerNorm (mean, then sum of squared deviations) cost one global read: two-pass because CLIP's
// residual stream has large means, where E[x^2] - mean^2 cancels badly.
//
// RMSNorm rounds like the reference (spec §5.5): y = bf16(x * rsqrt(mean(x^2) + eps)), then
// out = bf16(weight * y), two roundings, not one fused f32 product.
//
// LAUNCH layer_norm_bf16: block=256 grid=rows smem=width*4 (dynamic; width <= 12288 fits 48 KiB)
// LAUNCH rms_norm_bf16:   block=256 grid=rows smem=width*4 (dynamic)
// Requirements: none beyond width >= 1; rows are `ld` elements apart (in and out alike).
// Measured % of ceiling: not yet run on a GPU (written 2026-11-26, compile-checked only).

#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

// Sum over the CTA: warp shuffles, then one value per warp through shared memory.
__device__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < (int)(blockDim.x / 32); ++w) s += scratch[w];
  return s;
}

extern "C" __global__ void layer_norm_bf16(const bf16* __restrict__ x, const bf16* __restrict__ weight,
                                           const bf16* __restrict__ bias, bf16* __restrict__ out,
                                           int width, int ld, float eps) {
  extern __shared__ float row[];
  __shared__ float scratch[32];
  const bf16* xr = x + (long long)blockIdx.x * ld;
  bf16* yr = out + (long long)blockIdx.x * ld;
  float s = 0.f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float v = __bfloat162float(xr[i]);
    row[i] = v;
    s += v;
  }
  const float mean = block_sum(s, scratch) / width;
  float q = 0.f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float d = row[i] - mean;
    q += d * d;
  }
  const float rstd = rsqrtf(block_sum(q, scratch) / width + eps);
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float y = (row[i] - mean) * rstd * __bfloat162float(weight[i]) + __bfloat162float(bias[i]);
    yr[i] = __float2bfloat16(y);
  }
}

extern "C" __global__ void rms_norm_bf16(const bf16* __restrict__ x, const bf16* __restrict__ weight,
                                         bf16* __restrict__ out, int width, int ld, float eps) {
  extern __shared__ float row[];
  __shared__ float scratch[32];
  const bf16* xr = x + (long long)blockIdx.x * ld;
  bf16* yr = out + (long long)blockIdx.x * ld;
  float q = 0.f;
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    float v = __bfloat162float(xr[i]);
    row[i] = v;
    q += v * v;
  }
  const float r = rsqrtf(block_sum(q, scratch) / width + eps);
  for (int i = threadIdx.x; i < width; i += blockDim.x) {
    const float y = __bfloat162float(__float2bfloat16(row[i] * r));
    yr[i] = __float2bfloat16(__bfloat162float(weight[i]) * y);
  }
}
