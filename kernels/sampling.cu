// Token choice on the device: greedy argmax and temperature / top-k / top-p sampling over one
// row of f32 logits, so decode never copies the 32064 logits back to the host.
//
// argmax_f32: first index of the largest value (torch.argmax's tie rule), one CTA per row.
//
// sample_f32: the CPU sampler's rule (phi3v::sampling::Sampler) without a sort. Logits map to
// order-preserving u32 keys; "the k best" and "the smallest prefix of the sorted probabilities
// holding top_p" are both {key >= K} for some K, found by bisection on the key bits (32 steps,
// each a CTA-wide count or mass reduction). The draw u in [0,1) comes from the host's seeded RNG;
// the chosen token is where the mass, walked from the most probable token down, first exceeds
// u * kept mass: again a bisection, then the lowest index holding that key. Equal logits at the
// cut are all kept (the CPU keeps them in index order until the mass is reached), the one place
// the two can differ.
//
// LAUNCH argmax_f32: block=1024 grid=rows
// LAUNCH sample_f32: block=1024 grid=1
// Measured % of ceiling: not yet run on a GPU (written 2026-11-26, compile-checked only).

#include <float.h>
#include <stdint.h>

#define SAMPLE_THREADS 1024

__device__ __forceinline__ unsigned order_key(float f) {
  unsigned b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T* scratch) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = scratch[0];
  for (int w = 1; w < warps; ++w) r = op(r, scratch[w]);
  return r;
}

struct Sum { template <typename T> __device__ T operator()(T a, T b) const { return a + b; } };
struct Max { template <typename T> __device__ T operator()(T a, T b) const { return a > b ? a : b; } };
struct Min { template <typename T> __device__ T operator()(T a, T b) const { return a < b ? a : b; } };

extern "C" __global__ void argmax_f32(const float* __restrict__ logits, int vocab, int* __restrict__ out) {
  __shared__ unsigned long long scratch[32];
  const float* row = logits + (long long)blockIdx.x * vocab;
  // (key, inverted index) packed so that one max picks the largest value, then the lowest index.
  unsigned long long best = 0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const unsigned long long v = ((unsigned long long)order_key(row[i]) << 32) | (0xffffffffu - (unsigned)i);
    best = v > best ? v : best;
  }
  best = block_reduce(best, Max(), scratch);
  if (threadIdx.x == 0) out[blockIdx.x] = (int)(0xffffffffu - (unsigned)(best & 0xffffffffu));
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)
sample_f32(const float* __restrict__ logits, int vocab, float inv_temp, int top_k, float top_p, float u,
           int* __restrict__ out) {
  __shared__ float fscratch[32];
  __shared__ unsigned uscratch[32];
  float mx = -FLT_MAX;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, logits[i]);
  mx = block_reduce(mx, Max(), fscratch);

  // Each pass re-reads the row (128 KB, L1/L2-resident) instead of holding it in registers,
  // which would spill at 1024 threads.
  auto count_at_least = [&](unsigned k) {
    unsigned c = 0;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) c += order_key(logits[i]) >= k;
    return block_reduce(c, Sum(), uscratch);
  };
  auto mass_at_least = [&](unsigned k) {
    float m = 0.f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
      const float l = logits[i];
      if (order_key(l) >= k) m += __expf((l - mx) * inv_temp);
    }
    return block_reduce(m, Sum(), fscratch);
  };
  // Largest K in [lo, 2^32) with pred(K), for pred monotone and true at lo: bisection.
  auto largest_key = [&](unsigned lo, auto pred) {
    unsigned hi = 0xffffffffu;
    while (lo < hi) {
      const unsigned mid = lo + (hi - lo) / 2 + 1;
      if (pred(mid)) lo = mid; else hi = mid - 1;
    }
    return lo;
  };

  // The k best: the largest K that still has at least k keys at or above it.
  const unsigned kk = (top_k > 0 && top_k < vocab)
                          ? largest_key(0u, [&](unsigned k) { return count_at_least(k) >= (unsigned)top_k; })
                          : 0u;
  // The smallest prefix of those holding top_p of their mass.
  const float total = mass_at_least(kk);
  const unsigned cut =
      top_p < 1.f ? largest_key(kk, [&](unsigned k) { return mass_at_least(k) >= top_p * total; }) : kk;
  // Walk from the top: the token where the mass at or above it first exceeds u * kept.
  const float target = u * mass_at_least(cut);
  const unsigned pick = largest_key(cut, [&](unsigned k) { return mass_at_least(k) > target; });
  int idx = 0x7fffffff;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x)
    if (order_key(logits[i]) == pick) idx = min(idx, i);
  idx = block_reduce(idx, Min(), (int*)uscratch);
  if (threadIdx.x == 0) out[0] = idx;
}
