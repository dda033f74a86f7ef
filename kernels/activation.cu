// Element-wise activations on bf16, computed in f32: QuickGELU (CLIP), GELU with erf (the
// projector), SiLU-and-multiply (the decoder MLP), and the residual add.
//
// Memory-bound: each thread handles 8 consecutive values through one 16-byte load and store
// (the host guarantees 16-byte aligned rows and n % 8 == 0 for the vector path; a scalar tail
// loop covers the rest), so a warp moves whole 512-byte segments.
//
// LAUNCH quick_gelu_bf16 / gelu_bf16 / add_bf16: block=256 grid=ceil(ceil(n/8)/256)
// LAUNCH silu_mul_bf16: block=256 grid=(ceil(ceil(inter/8)/256), rows)
// Measured % of ceiling: not yet run on a GPU (written 2026-11-26, compile-checked only).

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

struct __align__(16) Pack8 { bf16 v[8]; };

__device__ __forceinline__ float quick_gelu(float x) { return x / (1.f + expf(-1.702f * x)); }
__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.f + erff(x * 0.70710678118654752f)); }
__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

// y = f(x) in place or out of place over n values; x and y may alias.
template <float (*F)(float)>
__device__ void map_bf16(const bf16* x, bf16* y, long long n) {
  const long long i8 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  if (i8 + 8 <= n) {
    Pack8 p = *reinterpret_cast<const Pack8*>(x + i8);
#pragma unroll
    for (int j = 0; j < 8; ++j) p.v[j] = __float2bfloat16(F(__bfloat162float(p.v[j])));
    *reinterpret_cast<Pack8*>(y + i8) = p;
  } else {
    for (long long i = i8; i < n; ++i) y[i] = __float2bfloat16(F(__bfloat162float(x[i])));
  }
}

extern "C" __global__ void quick_gelu_bf16(const bf16* x, bf16* y, long long n) { map_bf16<quick_gelu>(x, y, n); }
extern "C" __global__ void gelu_bf16(const bf16* x, bf16* y, long long n) { map_bf16<gelu_erf>(x, y, n); }

// out[r, i] = silu(gu[r, i]) * gu[r, inter + i]: gate first, then up (Phi-3's gate_up_proj).
// gu rows are 2*inter wide, out rows inter wide; out may not alias gu.
extern "C" __global__ void silu_mul_bf16(const bf16* __restrict__ gu, bf16* __restrict__ out, int inter) {
  const long long r = blockIdx.y;
  const int i8 = (blockIdx.x * blockDim.x + threadIdx.x) * 8;
  const bf16* g = gu + r * 2 * inter;
  const bf16* u = g + inter;
  bf16* o = out + r * inter;
  for (int i = i8; i < min(i8 + 8, inter); ++i)
    o[i] = __float2bfloat16(silu(__bfloat162float(g[i])) * __bfloat162float(u[i]));
}

// y += x (the residual add, where it is not fused into a GEMM epilogue).
extern "C" __global__ void add_bf16(const bf16* x, bf16* y, long long n) {
  const long long i8 = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
  for (long long i = i8; i < min(i8 + 8, n); ++i)
    y[i] = __float2bfloat16(__bfloat162float(y[i]) + __bfloat162float(x[i]));
}
