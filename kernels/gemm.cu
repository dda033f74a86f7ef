// Tensor-core GEMM with fused epilogue, for prefill and the vision tower:
//   C[m, n] = epi( sum_k A[m, k] * B[n, k] )
//   epi(v)  = act(v + bias[n]) + residual[m, n]      (bias, residual nullable; act 0 = identity,
//                                                     1 = QuickGELU x*sigmoid(1.702x), 2 = GELU erf)
// A is [M, K] row-major (leading dim lda), B is an nn.Linear weight [N, K] row-major (ldb = K),
// C and residual are [M, N] row-major (leading dim ldc). bf16 storage, f32 accumulation.
// gemm_bf16 writes bf16 C (bf16 residual); gemm_bf16_f32 writes f32 C (f32 residual) for logits.
// residual may alias C: each element is read and then written by the same thread.
//
// Algorithm: CTA tile 128x128x32, 8 warps as a 2 (M) x 4 (N) grid, each warp owning 64x32 of C
// (4 x 4 mma.sync.m16n8k16 bf16 tiles, 64 f32 accumulators per thread). A and B tiles stream into
// shared memory through a 3-stage cp.async.cg (16-byte) pipeline with one __syncthreads per
// k-tile; fragments come out with ldmatrix.x4. B needs no transpose: its rows are k-contiguous per
// n, which is exactly the "col" operand layout of mma, so plain ldmatrix serves both operands.
// Shared tiles are [rows][32] bf16 (64-byte rows) with the 16-byte chunk index XOR-swizzled by
// (row >> 1) & 3, so the 8 row addresses of every ldmatrix phase and of every cp.async phase hit
// 8 distinct 16-byte bank groups (no conflicts, no padding, smem stays at exactly 48 KiB).
// Edges: out-of-range rows of A/B and k >= K chunks are zero-filled (cp.async src-size 0), so the
// tail contributes 0; out-of-range C elements are not stored.
//
// Requirements (host-guaranteed): K % 8 == 0, lda % 8 == 0, A and B 16-byte aligned (every
// 16-byte cp.async source is then aligned). M, N arbitrary (>= 1). gridDim.y = ceil(M/128) must be
// <= 65535, i.e. M <= 8388480. Offsets are computed in 64 bits.
//
// LAUNCH gemm_bf16:     block=256 grid=(ceil(N/128), ceil(M/128)) smem=49152 (dynamic)
// LAUNCH gemm_bf16_f32: block=256 grid=(ceil(N/128), ceil(M/128)) smem=49152 (dynamic)
// 49152 bytes is exactly the default dynamic shared memory limit, so no
// cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES) is needed (setting it is harmless).
// Measured % of ceiling: not yet run on a GPU (written 2026-11-26, compile-checked only).

#include <cuda_bf16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

// Dynamic shared memory, declared outside the anonymous namespace: a symbol inside it is
// mangled with a hash of the source's path, which would make the PTX differ per checkout.
extern __shared__ __align__(128) unsigned char gemm_smem[];

namespace {

constexpr int BM = 128;
constexpr int BN = 128;
constexpr int BK = 32;  // 64-byte smem rows: 4 chunks of 16 bytes
constexpr int STAGES = 3;
constexpr int THREADS = 256;
constexpr int WM = 64;  // warp tile rows
constexpr int WN = 32;  // warp tile cols
constexpr int MT = WM / 16;  // m16 tiles per warp
constexpr int NT = WN / 8;   // n8 tiles per warp
constexpr int A_TILE = BM * BK;  // elements
constexpr int B_TILE = BN * BK;
constexpr int STAGE_ELEMS = A_TILE + B_TILE;
constexpr int SMEM_BYTES = STAGES * STAGE_ELEMS * 2;
constexpr int CHUNKS_PER_THREAD = BM * (BK / 8) / THREADS;  // per operand per stage

static_assert(SMEM_BYTES == 49152, "LAUNCH comment says smem=49152");
static_assert(BM == BN, "loader shares row/chunk indices between A and B");
static_assert(CHUNKS_PER_THREAD * THREADS == BM * (BK / 8), "loader must cover the tile exactly");
static_assert((BM / WM) * (BN / WN) * 32 == THREADS, "warp grid must match the block");
static_assert(BK == 32, "swizzle below assumes 4 chunks per row");

// Element offset of logical (row, 16-byte chunk) inside a [rows][BK] tile. Two 64-byte rows make a
// 128-byte bank line; XOR with (row >> 1) & 3 places rows r..r+7 (r % 8 == 0) of one logical chunk
// in 8 distinct 16-byte bank groups.
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * BK + ((chunk ^ ((row >> 1) & 3)) << 3);
}

// 16-byte async copy; when !pred nothing is read (src-size 0) and the destination is zero-filled.
// src must still be a valid address, so callers pass the matrix base pointer in that case.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool pred) {
  const int src_size = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_size)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                            uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// d += a * b for one m16n8k16 tile (A row-major, B "col" = k-contiguous per n).
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
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

// Issues the cp.asyncs for k-tile kt into pipeline slot `stage` (does not commit).
__device__ __forceinline__ void load_tile(uint32_t smem_base, int stage, int kt, const bf16* __restrict__ A,
                                          const bf16* __restrict__ B, int M, int N, int K, int lda, int m0,
                                          int n0, int tid) {
  const uint32_t a_smem = smem_base + (uint32_t)(stage * STAGE_ELEMS) * 2u;
  const uint32_t b_smem = a_smem + (uint32_t)A_TILE * 2u;
  const int k0 = kt * BK;
#pragma unroll
  for (int i = 0; i < CHUNKS_PER_THREAD; ++i) {
    // 4 consecutive threads fetch one 64-byte row segment; 8 threads = 2 rows = one 128-byte
    // smem line (permuted by the swizzle), so the shared-memory writes are conflict-free.
    const int idx = tid + i * THREADS;
    const int row = idx >> 2;
    const int chunk = idx & 3;
    const int kc = k0 + chunk * 8;  // K % 8 == 0: a chunk is entirely inside or outside K
    const uint32_t off = (uint32_t)swz(row, chunk) * 2u;

    const int gm = m0 + row;
    const bool a_ok = gm < M && kc < K;
    const bf16* a_src = a_ok ? A + ((size_t)gm * (size_t)lda + (size_t)kc) : A;
    cp_async16(a_smem + off, a_src, a_ok);

    const int gn = n0 + row;
    const bool b_ok = gn < N && kc < K;
    const bf16* b_src = b_ok ? B + ((size_t)gn * (size_t)K + (size_t)kc) : B;
    cp_async16(b_smem + off, b_src, b_ok);
  }
}

template <typename OutT>
__device__ __forceinline__ void gemm_body(const bf16* __restrict__ A, const bf16* __restrict__ B,
                                          const float* __restrict__ bias, const OutT* residual, OutT* C,
                                          int M, int N, int K, int lda, int ldc, int act) {
  const uint32_t smem_base = (uint32_t)__cvta_generic_to_shared(gemm_smem);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warp_m = warp >> 2;  // 0..1
  const int warp_n = warp & 3;   // 0..3
  const int m0 = blockIdx.y * BM;
  const int n0 = blockIdx.x * BN;
  const int ktiles = (K + BK - 1) / BK;

  float acc[MT][NT][4];
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.f;

  // ldmatrix.x4 row addresses: lanes 8i..8i+7 address the 8 rows of matrix i.
  // A (m16 x k16): matrices {rows 0-7,k 0-7}, {rows 8-15,k 0-7}, {rows 0-7,k 8-15}, {rows 8-15,k 8-15}
  //   -> regs a0..a3 exactly as mma expects (a_r: row g + 8*(r&1), k 2t + 8*(r>>1)).
  const int a_row = lane & 15;
  const int a_chunk = lane >> 4;
  // B (two n8 tiles x k16): matrices {n 0-7,k 0-7}, {n 0-7,k 8-15}, {n 8-15,k 0-7}, {n 8-15,k 8-15}
  //   -> b0,b1 of n-tile 2jj then b0,b1 of n-tile 2jj+1 (b_r: n g, k 2t + 8r).
  const int b_row = (lane & 7) + ((lane >> 4) << 3);
  const int b_chunk = (lane >> 3) & 1;

  // Prologue: fill STAGES-1 slots. Always commit (possibly empty groups) so that the group count,
  // and hence wait_group<STAGES-2>, stays in lock-step with kt.
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load_tile(smem_base, s, s, A, B, M, N, K, lda, m0, n0, tid);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    // Groups committed so far: STAGES-1+kt; allowing STAGES-2 pending means groups 0..kt are done,
    // i.e. this thread's copies of tile kt landed. The barrier then makes every thread's copies
    // visible, and also guarantees all warps finished computing on tile kt-1, whose slot
    // ((kt-1) % STAGES == (kt+STAGES-1) % STAGES) the prefetch below overwrites.
    cp_async_wait<STAGES - 2>();
    __syncthreads();

    const int pf = kt + STAGES - 1;
    if (pf < ktiles) load_tile(smem_base, pf % STAGES, pf, A, B, M, N, K, lda, m0, n0, tid);
    cp_async_commit();

    const int stage = kt % STAGES;
    const uint32_t a_smem = smem_base + (uint32_t)(stage * STAGE_ELEMS) * 2u;
    const uint32_t b_smem = a_smem + (uint32_t)A_TILE * 2u;

#pragma unroll
    for (int ks = 0; ks < BK / 16; ++ks) {
      uint32_t af[MT][4];
      uint32_t bfr[NT][2];
#pragma unroll
      for (int i = 0; i < MT; ++i) {
        const int row = warp_m * WM + i * 16 + a_row;
        const uint32_t addr = a_smem + (uint32_t)swz(row, ks * 2 + a_chunk) * 2u;
        ldmatrix_x4(af[i][0], af[i][1], af[i][2], af[i][3], addr);
      }
#pragma unroll
      for (int jj = 0; jj < NT / 2; ++jj) {
        const int row = warp_n * WN + jj * 16 + b_row;
        const uint32_t addr = b_smem + (uint32_t)swz(row, ks * 2 + b_chunk) * 2u;
        ldmatrix_x4(bfr[2 * jj][0], bfr[2 * jj][1], bfr[2 * jj + 1][0], bfr[2 * jj + 1][1], addr);
      }
#pragma unroll
      for (int i = 0; i < MT; ++i)
#pragma unroll
        for (int j = 0; j < NT; ++j) mma_bf16(acc[i][j], af[i], bfr[j]);
    }
  }
  cp_async_wait<0>();  // only empty groups can remain; drain anyway before the CTA exits

  // Epilogue. Accumulator reg r of tile (i, j) holds row g + 8*(r>>1), col 2t + (r&1).
  const int g = lane >> 2;
  const int t = lane & 3;
#pragma unroll
  for (int i = 0; i < MT; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + warp_m * WM + i * 16 + g + 8 * h;
      if (row >= M) continue;
      const size_t row_off = (size_t)row * (size_t)ldc;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n0 + warp_n * WN + j * 8 + 2 * t + e;
          if (col >= N) continue;
          float v = acc[i][j][2 * h + e];
          if (bias) v += bias[col];
          v = apply_act(v, act);
          if (residual) v += to_f32(residual[row_off + col]);
          store_out(C + row_off + col, v);
        }
      }
    }
  }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS, 2)
    gemm_bf16(const bf16* __restrict__ A, const bf16* __restrict__ B, const float* __restrict__ bias,
              const bf16* residual, bf16* C, int M, int N, int K, int lda, int ldc, int act) {
  gemm_body<bf16>(A, B, bias, residual, C, M, N, K, lda, ldc, act);
}

extern "C" __global__ void __launch_bounds__(THREADS, 2)
    gemm_bf16_f32(const bf16* __restrict__ A, const bf16* __restrict__ B, const float* __restrict__ bias,
                  const float* residual, float* C, int M, int N, int K, int lda, int ldc, int act) {
  gemm_body<float>(A, B, bias, residual, C, M, N, K, lda, ldc, act);
}
