// Skinny GEMM for decode (M = 1..4 rows of A) with the same fused epilogue as gemm.cu:
//   C[m, n] = epi( sum_k A[m, k] * B[n, k] )
//   epi(v)  = act(v + bias[n]) + residual[m, n]      (bias, residual nullable; act 0 = identity,
//                                                     1 = QuickGELU x*sigmoid(1.702x), 2 = GELU erf)
// A is [M, K] row-major (lda), B an nn.Linear weight [N, K] row-major (ldb = K), C and residual
// [M, N] row-major (ldc). gemv_bf16 writes bf16 (bf16 residual), gemv_bf16_f32 writes f32
// (f32 residual, for logits). residual may alias C (same thread reads then writes an element).
//
// Memory-bound on B (N*K*2 bytes, read exactly once), so the design is about keeping enough
// bytes of B in flight: each warp owns 2 adjacent output columns; each lane loads 16 bytes
// (8 bf16) of each of the 2 B rows per 256-element k step, 4 steps unrolled with all 8 B loads
// issued before any math (8 x 16 B in flight per lane, 512-byte coalesced segments per warp).
// B goes through ld.global.nc.L1::no_allocate: it is streamed once, and keeping it out of L1
// leaves L1 to A.
// A is NOT staged in shared memory: it is at most 4 x 16384 x 2 = 128 KiB, read by every warp of
// the grid, so it lives in L1/L2; each lane reads its 16-byte slice of each A row with __ldg (L1
// cached) and reuses it for both columns, so A traffic from L1 is M/2 times the B traffic, well
// below L1 bandwidth. Staging A in smem would need either > 48 KiB or per-chunk block barriers
// that stall the B stream. Math in f32 (bf16 -> f32 is an exact shift), then a warp xor-shuffle
// reduction; lane m*2+c applies the epilogue for (row m, column c).
// M > 4 is still correct (rows are processed in groups of 4, re-reading B per group), just slow.
//
// Requirements (host-guaranteed): K % 8 == 0, lda % 8 == 0, A and B 16-byte aligned. N >= 1, any
// M >= 1 (fast path M <= 4). Offsets are computed in 64 bits.
//
// LAUNCH gemv_bf16:     block=256 grid=(ceil(N/16), 1, 1) smem=0
// LAUNCH gemv_bf16_f32: block=256 grid=(ceil(N/16), 1, 1) smem=0
// (8 warps per block x 2 columns per warp = 16 columns per block; no dynamic smem, no attribute.)
// Measured % of ceiling: not yet run on a GPU (written 2026-11-26, compile-checked only).

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

namespace {

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int COLS = 2;      // output columns per warp
constexpr int UNROLL = 4;    // 256-element k steps per loop iteration
constexpr int MAX_ROWS = 4;  // rows of A per pass
constexpr int KSTEP = 32 * 8;  // elements of one B row covered by a warp per step

static_assert(MAX_ROWS * COLS <= 32, "one lane per (row, column) result in the epilogue");
static_assert(WARPS * COLS == 16, "LAUNCH comment says grid = ceil(N/16)");

// Streaming 16-byte read-only load that does not allocate in L1.
__device__ __forceinline__ uint4 ld_stream(const bf16* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// A packed pair of bf16 holds element k in the low half and k+1 in the high half.
__device__ __forceinline__ float bf_lo(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf_hi(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

__device__ __forceinline__ float dot2(uint32_t a, uint32_t b, float acc) {
  acc = fmaf(bf_lo(a), bf_lo(b), acc);
  return fmaf(bf_hi(a), bf_hi(b), acc);
}

__device__ __forceinline__ float dot8(const uint4& a, const uint4& b, float acc) {
  acc = dot2(a.x, b.x, acc);
  acc = dot2(a.y, b.y, acc);
  acc = dot2(a.z, b.z, acc);
  return dot2(a.w, b.w, acc);
}

__device__ __forceinline__ float apply_act(float v, int act) {
  if (act == 1) return v / (1.f + expf(-1.702f * v));  // -inf exponent side gives v/inf = -0, fine
  if (act == 2) return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
  return v;
}

__device__ __forceinline__ float to_f32(bf16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ void store_out(bf16* p, float v) { *p = __float2bfloat16_rn(v); }
__device__ __forceinline__ void store_out(float* p, float v) { *p = v; }

// One warp: rows m0..m0+MR-1 of C, columns n0..n0+COLS-1 (n0 < N; columns >= N are computed
// from a clamped, valid B row and simply not stored).
template <int MR, typename OutT>
__device__ __forceinline__ void gemv_rows(const bf16* __restrict__ A, const bf16* __restrict__ B,
                                          const float* __restrict__ bias, const OutT* residual, OutT* C,
                                          int m0, int n0, int N, int K, int lda, int ldc, int act, int lane) {
  const bf16* brow[COLS];
#pragma unroll
  for (int c = 0; c < COLS; ++c) brow[c] = B + (size_t)min(n0 + c, N - 1) * (size_t)K;
  const bf16* arow[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) arow[m] = A + (size_t)(m0 + m) * (size_t)lda;

  float acc[MR][COLS];
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int c = 0; c < COLS; ++c) acc[m][c] = 0.f;

  // Warp-uniform trip count; per-lane k guards only bite in the last iteration.
  for (int kb = 0; kb < K; kb += KSTEP * UNROLL) {
    uint4 bv[UNROLL][COLS];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k = kb + u * KSTEP + lane * 8;
#pragma unroll
      for (int c = 0; c < COLS; ++c) bv[u][c] = (k < K) ? ld_stream(brow[c] + k) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int k = kb + u * KSTEP + lane * 8;
      if (k < K) {
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          const uint4 av = __ldg(reinterpret_cast<const uint4*>(arow[m] + k));
#pragma unroll
          for (int c = 0; c < COLS; ++c) acc[m][c] = dot8(av, bv[u][c], acc[m][c]);
        }
      }
    }
  }

  // Butterfly reduction: afterwards every lane holds every total.
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int c = 0; c < COLS; ++c)
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) acc[m][c] += __shfl_xor_sync(0xffffffffu, acc[m][c], off);

  // Lane m*COLS+c finishes (m, c); selecting with static indices keeps acc in registers.
  float v = 0.f;
  int my_m = 0, my_c = 0;
#pragma unroll
  for (int m = 0; m < MR; ++m)
#pragma unroll
    for (int c = 0; c < COLS; ++c)
      if (lane == m * COLS + c) {
        v = acc[m][c];
        my_m = m;
        my_c = c;
      }
  const int n = n0 + my_c;
  if (lane < MR * COLS && n < N) {
    const size_t off = (size_t)(m0 + my_m) * (size_t)ldc + (size_t)n;
    if (bias) v += bias[n];
    v = apply_act(v, act);
    if (residual) v += to_f32(residual[off]);
    store_out(C + off, v);
  }
}

template <typename OutT>
__device__ __forceinline__ void gemv_body(const bf16* __restrict__ A, const bf16* __restrict__ B,
                                          const float* __restrict__ bias, const OutT* residual, OutT* C,
                                          int M, int N, int K, int lda, int ldc, int act) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int n0 = (blockIdx.x * WARPS + warp) * COLS;
  if (n0 >= N) return;  // warp-uniform; no block-level barriers follow

  for (int m0 = 0; m0 < M; m0 += MAX_ROWS) {
    const int rows = min(M - m0, MAX_ROWS);
    switch (rows) {
      case 1: gemv_rows<1, OutT>(A, B, bias, residual, C, m0, n0, N, K, lda, ldc, act, lane); break;
      case 2: gemv_rows<2, OutT>(A, B, bias, residual, C, m0, n0, N, K, lda, ldc, act, lane); break;
      case 3: gemv_rows<3, OutT>(A, B, bias, residual, C, m0, n0, N, K, lda, ldc, act, lane); break;
      default: gemv_rows<4, OutT>(A, B, bias, residual, C, m0, n0, N, K, lda, ldc, act, lane); break;
    }
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS)
    gemv_bf16(const bf16* __restrict__ A, const bf16* __restrict__ B, const float* __restrict__ bias,
              const bf16* residual, bf16* C, int M, int N, int K, int lda, int ldc, int act) {
  gemv_body<bf16>(A, B, bias, residual, C, M, N, K, lda, ldc, act);
}

extern "C" __global__ void __launch_bounds__(THREADS)
    gemv_bf16_f32(const bf16* __restrict__ A, const bf16* __restrict__ B, const float* __restrict__ bias,
                  const float* residual, float* C, int M, int N, int K, int lda, int ldc, int act) {
  gemv_body<float>(A, B, bias, residual, C, M, N, K, lda, ldc, act);
}
