// Scaled dot-product attention for Phi-3-vision on NVIDIA GPUs (sm_80+), bf16 in/out, f32 softmax.
//
// Semantics (the CPU oracle is crates/phi-kernels/src/cpu/attention): for batch b, head h, query
// row i:  O[i] = sum_j softmax_j(scale * Q[i].K[j]) V[j]  over the visible keys j; non-causal: all
// kv_len keys; causal: keys j <= (kv_len - q_len) + i (the queries are the last q_len positions).
// A row that sees no key (causal with q_len > kv_len, or kv_len == 0) is written as 0.
//
// measured % of ceiling: not yet run on a GPU (written 2026-11-26, compile-checked only).
//
// ---------------------------------------------------------------------------------------------
// 1) flash_attn_d64_bf16 / flash_attn_d96_bf16  (prefill, CLIP; FlashAttention-2)
//
//   extern "C" __global__ void flash_attn_d{64,96}_bf16(
//       const bf16* Q, const bf16* K, const bf16* V, bf16* O,
//       int heads, int q_len, int kv_len,
//       long long q_batch_stride, int q_row_stride,
//       long long kv_batch_stride, int kv_row_stride,
//       long long o_batch_stride, int o_row_stride,
//       float scale, int causal)
//
//   Element (b, row, h, c) of Q is Q[b*q_batch_stride + row*q_row_stride + h*D + c]; K and V share
//   kv_batch_stride / kv_row_stride; O uses o_batch_stride / o_row_stride. Strides in elements,
//   so Q/K/V may be column ranges of one fused qkv buffer (row stride 3*heads*D).
//
// LAUNCH flash_attn_d64_bf16: block=128 grid=(ceil(q_len/64), heads, batch) smem=32768 B static, 0 dynamic, no cuFuncSetAttribute
// LAUNCH flash_attn_d96_bf16: block=128 grid=(ceil(q_len/64), heads, batch) smem=49152 B static, 0 dynamic, no cuFuncSetAttribute
//   ptxas (nvcc 13.0, sm_80..sm_90a): d64 128 registers (launch bounds 128 x 4 CTAs/SM), d96 168
//   registers (128 x 3), 0 spills.
//
//   Tiling: Br = 64 query rows per CTA, 4 warps, each warp owns 16 query rows for the whole
//   kernel (m16 of mma.m16n8k16); key/value blocks of Bc = 64 keys. Per key block:
//   S = Q K^T (D/16 k-steps x 8 n8-tiles of mma), online softmax in registers (exp2f with
//   scale*log2(e) folded into one FFMA), P packed in registers into bf16 A fragments (the C
//   layout of two adjacent n8 tiles is exactly the A layout of one k16 step), O += P V
//   (4 k-steps x D/8 n8-tiles; V fetched with ldmatrix.trans). Normalisation by 1/l at the end.
//   K/V blocks stream through shared memory with cp.async, double-buffered (block n+1 is in
//   flight while block n is computed). The Q tile is staged through the second K buffer (it is
//   read into registers before that buffer is first needed), which keeps d=96 at exactly 48 KiB
//   of static shared memory. Shared tiles are XOR-swizzled per 16-byte chunk so that every
//   ldmatrix phase (8 rows x 16 B) and every cp.async quarter-warp hits 8 distinct bank groups.
//   Causal: key blocks past the last key visible to the CTA's last row are never loaded;
//   element masks are only evaluated in blocks that straddle the diagonal or kv_len. CTAs are
//   scheduled last query block first (blockIdx.x is reversed) so the longest causal CTAs start
//   first. Query rows >= q_len are zero-filled on load and never stored; key rows >= kv_len are
//   zero-filled in shared memory (cp.async src-size 0) and masked to -inf.
//
//   Requirements: sm_80 or newer; Q, K, V, O base pointers 16-byte aligned; q_row_stride,
//   kv_row_stride, o_row_stride, and all three batch strides multiples of 8 elements
//   (16-byte cp.async / vector stores); scale > 0 (the row max is taken on raw dot products);
//   batch and heads <= 65535 (grid y/z).
//
// ---------------------------------------------------------------------------------------------
// 2) flash_decode_bf16 + flash_decode_combine_bf16  (decode, q_len = 1, flash-decoding)
//
//   extern "C" __global__ void flash_decode_bf16(
//       const bf16* q, const bf16* Kc, const bf16* Vc, float* part_o, float* part_ml,
//       int heads, int kv_len, int head_dim, long long head_stride, int splits, float scale)
//   extern "C" __global__ void flash_decode_combine_bf16(
//       const float* part_o, const float* part_ml, bf16* o, int heads, int head_dim, int splits)
//
// LAUNCH flash_decode_bf16: block=128 grid=(splits, heads) smem=2080 B static, 0 dynamic; scratch part_o = heads*splits*head_dim f32, part_ml = heads*splits*2 f32
// LAUNCH flash_decode_combine_bf16: block=128 grid=(heads) smem=0 (launch after flash_decode_bf16 on the same stream)
//   ptxas (nvcc 13.0, sm_80..sm_90a): flash_decode_bf16 64 registers (launch bounds 128 x 8),
//   combine 28-31 registers, 0 spills.
//
//   KV cache is head-major: element (h, j, c) at Kc[h*head_stride + j*head_dim + c] (same for
//   Vc); q and o are [heads*head_dim], element (h, c) at q[h*head_dim + c]. Split s of head h
//   covers keys [s*chunk, min(kv_len, (s+1)*chunk)), chunk = ceil(kv_len/splits), and writes
//   part_o[(h*splits+s)*head_dim + c] = sum_j exp(x_j - m) v_j[c] (unnormalised, f32) and
//   part_ml[(h*splits+s)*2 + {0,1}] = {m, l}: m = max_j x_j (x_j = scale*q.k_j, natural units),
//   l = sum_j exp(x_j - m). An empty split writes m = -inf, l = 0, part_o = 0.
//   The combine kernel computes O = sum_s e^(m_s-M) part_o_s / sum_s e^(m_s-M) l_s, M = max m_s,
//   skipping splits with l = 0 (O = 0 when every split is empty).
//
//   Algorithm: CUDA cores only (one query row gives no mma M dimension). A key is handled by a
//   group of LPK lanes (LPK = 8 for head_dim <= 64, 16 for head_dim <= 128), each lane owning
//   one 16-byte chunk (8 dims) of K and V, so a warp reads 4 (d=64) or 2 (d=96) consecutive key
//   rows per load instruction and the dot product finishes with log2(LPK) xor-shuffles. Each
//   lane group is an independent online-softmax stream over every NG-th key of the split
//   (NG = groups per CTA), taking U = 4 keys per step so 8 x 16 B loads per lane are in flight;
//   streams are merged with shuffles inside the warp, then across the 4 warps in shared memory.
//   Host picks splits so that splits*heads covers the SMs a few times (e.g. ~2*SMs/heads,
//   and at least ~64 keys per split).
//
//   Requirements: head_dim % 8 == 0 and 8 <= head_dim <= 128; q, Kc, Vc 16-byte aligned;
//   head_stride % 8 == 0; splits >= 1.
// ---------------------------------------------------------------------------------------------

#include <cuda_bf16.h>
#include <float.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

namespace {

constexpr float kLog2e = 1.4426950408889634f;

// ---- PTX wrappers ---------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; src_bytes = 0 writes 16 zero bytes and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes)
                 : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a * b, m16n8k16, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats -> bf16x2 with `lo` in the low half (the lower k / column index of a fragment).
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float bf16_lo(uint32_t x) { return __uint_as_float(x << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t x) { return __uint_as_float(x & 0xffff0000u); }

// ---- prefill --------------------------------------------------------------------------------

constexpr int kBr = 64;       // query rows per CTA (4 warps x 16)
constexpr int kBc = 64;       // keys per K/V block
constexpr int kThreads = 128;

// Byte offset of 16-byte chunk `c` of row `r` in a [64][D] bf16 shared tile.
// D = 64: rows are 128 B, so the 8 rows of one ldmatrix phase would all hit the same bank group;
//   chunk ^= r & 7 spreads them over all 8.
// D = 96: rows are 192 B, so row r starts at bank group 4*(r&1); chunk ^= (r>>1)&3 permutes the
//   low two bits, which covers the remaining 4 groups, and keeps chunks 8..11 inside 8..11.
// The XOR term depends only on r & 7, and every ldmatrix phase reads 8 rows r0..r0+7 with
// r0 % 8 == 0, so the term is a per-lane constant.
template <int D>
__device__ __forceinline__ uint32_t tile_off(int r, int c) {
    static_assert(D == 64 || D == 96, "tile_off: D must be 64 or 96");
    const int x = (D == 64) ? (r & 7) : ((r >> 1) & 3);
    return static_cast<uint32_t>(r * (D * 2) + ((c ^ x) << 4));
}

// Rows row0..row0+63 of one head (g points at row 0, column 0 of the head) into a swizzled tile;
// rows >= limit are zero-filled.
template <int D>
__device__ __forceinline__ void load_tile_async(uint32_t s_tile, const bf16* g, int row_stride,
                                                int row0, int limit, int tid) {
    constexpr int kChunks = D / 8;                        // 16-byte chunks per row
    constexpr int kIters = kBr * kChunks / kThreads;      // 4 (d64) or 6 (d96)
    static_assert(kBr * kChunks % kThreads == 0, "tile must split evenly over the CTA");
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
        const int idx = tid + i * kThreads;
        const int r = idx / kChunks;
        const int c = idx % kChunks;
        const int row = row0 + r;
        const bool ok = row < limit;
        // A zero-byte copy reads nothing, but keep the address inside the tensor anyway.
        const bf16* src = g + static_cast<long long>(ok ? row : 0) * row_stride + c * 8;
        cp_async_16(s_tile + tile_off<D>(r, c), src, ok ? 16 : 0);
    }
}

template <int D>
__device__ __forceinline__ void flash_attn_impl(
    unsigned char* smem, const bf16* __restrict__ Q, const bf16* __restrict__ K,
    const bf16* __restrict__ V, bf16* __restrict__ O, int q_len, int kv_len,
    long long q_batch_stride, int q_row_stride, long long kv_batch_stride, int kv_row_stride,
    long long o_batch_stride, int o_row_stride, float scale, int causal) {
    constexpr int KS = D / 16;         // k16 steps of S = Q K^T
    constexpr int DT = D / 8;          // n8 tiles of O
    constexpr int NT = kBc / 8;        // n8 tiles of S (8)
    constexpr int kChunks = D / 8;
    constexpr uint32_t kTile = kBr * D * 2;  // bytes of one [64][D] tile (kBr == kBc)
    static_assert(kBr == kBc, "Q and K/V tiles share one size");

    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int g = lane >> 2;  // fragment row group
    const int t = lane & 3;   // thread in quad

    // Reversed so the query blocks with the most (causal) work are dispatched first.
    const int q0 = (gridDim.x - 1 - blockIdx.x) * kBr;
    const int h = blockIdx.y;
    const int b = blockIdx.z;

    const bf16* Qg = Q + b * q_batch_stride + static_cast<long long>(h) * D;
    const bf16* Kg = K + b * kv_batch_stride + static_cast<long long>(h) * D;
    const bf16* Vg = V + b * kv_batch_stride + static_cast<long long>(h) * D;
    bf16* Og = O + b * o_batch_stride + static_cast<long long>(h) * D;

    // Query row i sees keys j < i + diag + 1 (causal).
    const int diag = kv_len - q_len;
    int kv_end = kv_len;
    if (causal) {
        const int last_row = min(q0 + kBr, q_len) - 1;
        kv_end = min(kv_len, last_row + diag + 1);
    }
    const int nblocks = kv_end > 0 ? (kv_end + kBc - 1) / kBc : 0;

    const uint32_t s_base = smem_addr(smem);
    // Tiles: K stage 0, K stage 1 (also the Q staging tile), V stage 0, V stage 1.
    const uint32_t sK0 = s_base, sK1 = s_base + kTile;
    const uint32_t sV0 = s_base + 2 * kTile, sV1 = s_base + 3 * kTile;
    const uint32_t sQ = sK1;

    load_tile_async<D>(sQ, Qg, q_row_stride, q0, q_len, tid);
    cp_async_commit();
    if (nblocks > 0) {
        load_tile_async<D>(sK0, Kg, kv_row_stride, 0, kv_len, tid);
        load_tile_async<D>(sV0, Vg, kv_row_stride, 0, kv_len, tid);
    }
    cp_async_commit();  // possibly empty group: keeps the group count uniform
    cp_async_wait<1>();  // Q has landed; block 0 may still be in flight
    __syncthreads();

    // Per-lane ldmatrix coordinates. Lane l supplies the row address for matrix l>>3, row l&7.
    const int lrow = lane & 7;
    const int lmat = lane >> 3;
    const int swz = (D == 64) ? lrow : ((lrow >> 1) & 3);  // tile_off's XOR term for every row with (row & 7) == lrow

    // Q A fragment (16 rows x 16 k): matrices {rows 0-7,k 0-7}, {rows 8-15,k 0-7},
    // {rows 0-7,k 8-15}, {rows 8-15,k 8-15} -> a0..a3 as mma expects.
    uint32_t qf[KS][4];
    {
        const int row = warp * 16 + (lmat & 1) * 8 + lrow;
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            const int chunk = 2 * ks + (lmat >> 1);
            ldmatrix_x4(qf[ks], sQ + row * (D * 2) + ((chunk ^ swz) << 4));
        }
    }
    __syncthreads();  // sQ is K stage 1: every warp must hold its Q fragments before block 1 lands

    // K B fragments for two n8 tiles (keys 0-7 and 8-15 of a 16-key pair) at one k16 step:
    // matrices {keys 0-7, k 0-7}, {keys 0-7, k 8-15}, {keys 8-15, k 0-7}, {keys 8-15, k 8-15}
    // -> (b0,b1) of tile 2p, (b0,b1) of tile 2p+1. K rows are keys with d contiguous, which is
    // already the "col" B layout, so no transpose.
    const uint32_t k_lane_row = static_cast<uint32_t>(((lmat >> 1) * 8 + lrow) * (D * 2));
    const int k_lane_chunk = lmat & 1;
    // V B fragments (k = key, n = dim) need the transpose: matrices {keys 0-7, dims 0-7},
    // {keys 8-15, dims 0-7}, {keys 0-7, dims 8-15}, {keys 8-15, dims 8-15} -> (b0,b1) of dim
    // tile 2p, (b0,b1) of dim tile 2p+1.
    const uint32_t v_lane_row = static_cast<uint32_t>(((lmat & 1) * 8 + lrow) * (D * 2));
    const int v_lane_chunk = lmat >> 1;

    // Softmax state for this thread's two rows: r0 = warp*16 + g (C regs 0,1) and r0 + 8
    // (C regs 2,3). m is the running max of raw dot products; l is this thread's partial sum
    // (its 2 columns of each n8 tile), reduced over the quad only at the end since the rescale
    // factors are quad-uniform.
    float acc[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[dt][r] = 0.f;
    }
    float m_run[2] = {-INFINITY, -INFINITY};
    float l_run[2] = {0.f, 0.f};
    const float sl2e = scale * kLog2e;

    const int row0 = q0 + warp * 16 + g;
    // Exclusive key limit of each of this thread's rows.
    const int lim0 = causal ? min(kv_len, row0 + diag + 1) : kv_len;
    const int lim1 = causal ? min(kv_len, row0 + 8 + diag + 1) : kv_len;

    for (int it = 0; it < nblocks; ++it) {
        const int kv0 = it * kBc;
        const uint32_t sK = (it & 1) ? sK1 : sK0;
        const uint32_t sV = (it & 1) ? sV1 : sV0;
        if (it + 1 < nblocks) {
            const uint32_t nK = (it & 1) ? sK0 : sK1;
            const uint32_t nV = (it & 1) ? sV0 : sV1;
            load_tile_async<D>(nK, Kg, kv_row_stride, kv0 + kBc, kv_len, tid);
            load_tile_async<D>(nV, Vg, kv_row_stride, kv0 + kBc, kv_len, tid);
            cp_async_commit();
            cp_async_wait<1>();  // block it has landed, block it+1 stays in flight
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();

        // ---- S = Q K^T (raw dot products, f32) ----
        float s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
            for (int r = 0; r < 4; ++r) s[nt][r] = 0.f;
        }
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            const uint32_t coff = static_cast<uint32_t>(((2 * ks + k_lane_chunk) ^ swz) << 4);
#pragma unroll
            for (int p = 0; p < NT / 2; ++p) {
                uint32_t kb[4];
                ldmatrix_x4(kb, sK + p * 16 * (D * 2) + k_lane_row + coff);
                mma_16816(s[2 * p], qf[ks], kb[0], kb[1]);
                mma_16816(s[2 * p + 1], qf[ks], kb[2], kb[3]);
            }
        }

        // ---- mask: only blocks that cross kv_len or the causal diagonal of the CTA's first row
        if (kv0 + kBc > kv_len || (causal && kv0 + kBc - 1 > q0 + diag)) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int key = kv0 + nt * 8 + 2 * t;
                if (key >= lim0) s[nt][0] = -INFINITY;
                if (key + 1 >= lim0) s[nt][1] = -INFINITY;
                if (key >= lim1) s[nt][2] = -INFINITY;
                if (key + 1 >= lim1) s[nt][3] = -INFINITY;
            }
        }

        // ---- online softmax ----
        float mx[2] = {m_run[0], m_run[1]};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
            mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
        }
        float me[2], alpha[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            // A row's 64 columns live in the 4 lanes of its quad.
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
            mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
            // A row with no visible key yet keeps max -inf; exponentiate against 0 instead so
            // that -inf - -inf never produces NaN (its p are exp2(-inf) = 0).
            me[i] = (mx[i] == -INFINITY) ? 0.f : mx[i] * sl2e;
            // m_run = -inf (nothing accumulated yet) gives alpha = 0 on an all-zero state.
            alpha[i] = exp2f(fmaf(m_run[i], sl2e, -me[i]));
            m_run[i] = mx[i];
            l_run[i] *= alpha[i];
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            s[nt][0] = exp2f(fmaf(s[nt][0], sl2e, -me[0]));
            s[nt][1] = exp2f(fmaf(s[nt][1], sl2e, -me[0]));
            s[nt][2] = exp2f(fmaf(s[nt][2], sl2e, -me[1]));
            s[nt][3] = exp2f(fmaf(s[nt][3], sl2e, -me[1]));
            l_run[0] += s[nt][0] + s[nt][1];
            l_run[1] += s[nt][2] + s[nt][3];
        }
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            acc[dt][0] *= alpha[0];
            acc[dt][1] *= alpha[0];
            acc[dt][2] *= alpha[1];
            acc[dt][3] *= alpha[1];
        }

        // ---- O += P V ----
        // The C fragments of S tiles 2kk and 2kk+1 (keys kk*16 + 2t(+1) and kk*16 + 8 + 2t(+1),
        // rows g and g+8) are exactly the A fragment of k-step kk: a0 = (g, 2t), a1 = (g+8, 2t),
        // a2 = (g, 2t+8), a3 = (g+8, 2t+8).
#pragma unroll
        for (int kk = 0; kk < NT / 2; ++kk) {
            const uint32_t pa[4] = {
                pack_bf16(s[2 * kk][0], s[2 * kk][1]),
                pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3]),
            };
            const uint32_t vrow = sV + kk * 16 * (D * 2) + v_lane_row;
#pragma unroll
            for (int p = 0; p < DT / 2; ++p) {
                uint32_t vb[4];
                ldmatrix_x4_trans(vb, vrow + (((2 * p + v_lane_chunk) ^ swz) << 4));
                mma_16816(acc[2 * p], pa, vb[0], vb[1]);
                mma_16816(acc[2 * p + 1], pa, vb[2], vb[3]);
            }
        }
        __syncthreads();  // this stage is refilled by the prefetch of the next iteration
    }

    // ---- epilogue: O = acc / l, staged through shared memory for 16-byte row stores ----
    cp_async_wait<0>();  // nothing may still be writing shared memory (nblocks == 0 path)
    float inv[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        float l = l_run[i];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        inv[i] = l > 0.f ? 1.f / l : 0.f;  // no visible key -> 0, as the CPU reference
    }
    // All warps passed the loop's final barrier (or the one after the Q fragments), so any
    // tile may be overwritten; use K stage 0.
    unsigned char* sO = smem;
    {
        const int r_lo = warp * 16 + g;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            *reinterpret_cast<uint32_t*>(sO + tile_off<D>(r_lo, dt) + 4 * t) =
                pack_bf16(acc[dt][0] * inv[0], acc[dt][1] * inv[0]);
            *reinterpret_cast<uint32_t*>(sO + tile_off<D>(r_lo + 8, dt) + 4 * t) =
                pack_bf16(acc[dt][2] * inv[1], acc[dt][3] * inv[1]);
        }
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < kBr * kChunks / kThreads; ++i) {
        const int idx = tid + i * kThreads;
        const int r = idx / kChunks;
        const int c = idx % kChunks;
        const int row = q0 + r;
        if (row < q_len) {
            const uint4 v = *reinterpret_cast<const uint4*>(sO + tile_off<D>(r, c));
            *reinterpret_cast<uint4*>(Og + static_cast<long long>(row) * o_row_stride + c * 8) = v;
        }
    }
}

// ---- decode ---------------------------------------------------------------------------------

constexpr int kDecThreads = 128;
constexpr int kDecWarps = kDecThreads / 32;
constexpr int kDecMaxD = 128;

// Merge online-softmax state (om, ol, oacc) into (m, l, acc); -inf maxima stay NaN-free.
__device__ __forceinline__ void merge_state(float& m, float& l, float (&acc)[8], float om, float ol,
                                            const float (&oacc)[8]) {
    const float M = fmaxf(m, om);
    const float me = (M == -INFINITY) ? 0.f : M * kLog2e;
    const float fa = exp2f(fmaf(m, kLog2e, -me));
    const float fb = exp2f(fmaf(om, kLog2e, -me));
    l = l * fa + ol * fb;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = acc[e] * fa + oacc[e] * fb;
    m = M;
}

// LPK lanes per key (8 or 16); each lane owns dims [8c, 8c+8) with c = lane % LPK.
struct DecodeSmem {
    float m[kDecWarps];
    float l[kDecWarps];
    float acc[kDecWarps][kDecMaxD];
};

template <int LPK>
__device__ __forceinline__ void flash_decode_impl(DecodeSmem& sm, const bf16* __restrict__ q,
                                                  const bf16* __restrict__ Kc,
                                                  const bf16* __restrict__ Vc,
                                                  float* __restrict__ part_o,
                                                  float* __restrict__ part_ml, int kv_len,
                                                  int head_dim, long long head_stride, int splits,
                                                  float scale) {
    constexpr int KPW = 32 / LPK;          // keys per warp per load
    constexpr int NG = kDecWarps * KPW;    // independent key streams per CTA
    constexpr int U = 4;                   // keys per stream per step

    const int split = blockIdx.x;
    const int h = blockIdx.y;
    const int tid = threadIdx.x;
    const int warp = tid >> 5;
    const int lane = tid & 31;
    const int c = lane % LPK;
    const int stream = warp * KPW + lane / LPK;
    const bool active = c * 8 < head_dim;  // head_dim < 8*LPK leaves the top lanes idle

    const int chunk = (kv_len + splits - 1) / splits;
    const int start = split * chunk;
    const int end = min(kv_len, start + chunk);

    float qv[8];
    if (active) {
        const uint4 x = __ldg(reinterpret_cast<const uint4*>(q + h * head_dim + c * 8));
        qv[0] = bf16_lo(x.x); qv[1] = bf16_hi(x.x);
        qv[2] = bf16_lo(x.y); qv[3] = bf16_hi(x.y);
        qv[4] = bf16_lo(x.z); qv[5] = bf16_hi(x.z);
        qv[6] = bf16_lo(x.w); qv[7] = bf16_hi(x.w);
    } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) qv[e] = 0.f;
    }
    const bf16* Kh = Kc + h * head_stride + c * 8;
    const bf16* Vh = Vc + h * head_stride + c * 8;

    float m = -INFINITY, l = 0.f;
    float acc[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = 0.f;

    // The trip count is uniform across the CTA (start/end are), so the shuffles below are
    // executed by full warps.
    for (int base = start; base < end; base += NG * U) {
        uint4 kr[U], vr[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = base + stream + NG * u;
            if (active && j < end) {
                const long long off = static_cast<long long>(j) * head_dim;
                kr[u] = __ldg(reinterpret_cast<const uint4*>(Kh + off));
                vr[u] = __ldg(reinterpret_cast<const uint4*>(Vh + off));
            } else {
                // Zero, not skipped: cache slots past kv_len may hold NaN bit patterns and
                // 0 * NaN would poison acc.
                kr[u] = make_uint4(0u, 0u, 0u, 0u);
                vr[u] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
        float sc[U];
        float mx = m;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            float d = qv[0] * bf16_lo(kr[u].x);
            d = fmaf(qv[1], bf16_hi(kr[u].x), d);
            d = fmaf(qv[2], bf16_lo(kr[u].y), d);
            d = fmaf(qv[3], bf16_hi(kr[u].y), d);
            d = fmaf(qv[4], bf16_lo(kr[u].z), d);
            d = fmaf(qv[5], bf16_hi(kr[u].z), d);
            d = fmaf(qv[6], bf16_lo(kr[u].w), d);
            d = fmaf(qv[7], bf16_hi(kr[u].w), d);
#pragma unroll
            for (int off = LPK / 2; off > 0; off >>= 1) d += __shfl_xor_sync(0xffffffffu, d, off);
            const int j = base + stream + NG * u;
            sc[u] = (j < end) ? d * scale : -INFINITY;
            mx = fmaxf(mx, sc[u]);
        }
        const float me = (mx == -INFINITY) ? 0.f : mx * kLog2e;
        const float alpha = exp2f(fmaf(m, kLog2e, -me));
        m = mx;
        l *= alpha;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] *= alpha;
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const float p = exp2f(fmaf(sc[u], kLog2e, -me));
            l += p;
            acc[0] = fmaf(p, bf16_lo(vr[u].x), acc[0]);
            acc[1] = fmaf(p, bf16_hi(vr[u].x), acc[1]);
            acc[2] = fmaf(p, bf16_lo(vr[u].y), acc[2]);
            acc[3] = fmaf(p, bf16_hi(vr[u].y), acc[3]);
            acc[4] = fmaf(p, bf16_lo(vr[u].z), acc[4]);
            acc[5] = fmaf(p, bf16_hi(vr[u].z), acc[5]);
            acc[6] = fmaf(p, bf16_lo(vr[u].w), acc[6]);
            acc[7] = fmaf(p, bf16_hi(vr[u].w), acc[7]);
        }
    }

    // Merge the KPW streams of this warp: lanes with the same c differ in the bits >= log2(LPK).
#pragma unroll
    for (int off = LPK; off < 32; off <<= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m, off);
        const float ol = __shfl_xor_sync(0xffffffffu, l, off);
        float oacc[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) oacc[e] = __shfl_xor_sync(0xffffffffu, acc[e], off);
        merge_state(m, l, acc, om, ol, oacc);
    }
    if (lane == 0) {
        sm.m[warp] = m;
        sm.l[warp] = l;
    }
    if (lane < LPK && active) {
#pragma unroll
        for (int e = 0; e < 8; ++e) sm.acc[warp][c * 8 + e] = acc[e];
    }
    __syncthreads();

    float M = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecWarps; ++w) M = fmaxf(M, sm.m[w]);
    const float me = (M == -INFINITY) ? 0.f : M * kLog2e;
    float f[kDecWarps];
#pragma unroll
    for (int w = 0; w < kDecWarps; ++w) f[w] = exp2f(fmaf(sm.m[w], kLog2e, -me));  // -inf -> 0

    const long long slot = static_cast<long long>(h) * splits + split;
    for (int d = tid; d < head_dim; d += kDecThreads) {
        float o = 0.f;
#pragma unroll
        for (int w = 0; w < kDecWarps; ++w) o = fmaf(f[w], sm.acc[w][d], o);
        part_o[slot * head_dim + d] = o;
    }
    if (tid == 0) {
        float L = 0.f;
#pragma unroll
        for (int w = 0; w < kDecWarps; ++w) L = fmaf(f[w], sm.l[w], L);
        part_ml[slot * 2 + 0] = M;
        part_ml[slot * 2 + 1] = L;
    }
}

}  // namespace

// ---- entry points ---------------------------------------------------------------------------

// 4 CTAs/SM caps d=64 at 128 registers, which ptxas meets without spills on sm_80..sm_90a.
extern "C" __global__ void __launch_bounds__(kThreads, 4)
flash_attn_d64_bf16(const bf16* __restrict__ Q, const bf16* __restrict__ K,
                    const bf16* __restrict__ V, bf16* __restrict__ O, int heads, int q_len,
                    int kv_len, long long q_batch_stride, int q_row_stride,
                    long long kv_batch_stride, int kv_row_stride, long long o_batch_stride,
                    int o_row_stride, float scale, int causal) {
    (void)heads;  // the grid's y extent
    __shared__ __align__(128) unsigned char smem[4 * kBr * 64 * 2];
    flash_attn_impl<64>(smem, Q, K, V, O, q_len, kv_len, q_batch_stride, q_row_stride,
                        kv_batch_stride, kv_row_stride, o_batch_stride, o_row_stride, scale,
                        causal);
}

// 3 CTAs/SM (168 registers); at 4 (128 registers) d=96 spills.
extern "C" __global__ void __launch_bounds__(kThreads, 3)
flash_attn_d96_bf16(const bf16* __restrict__ Q, const bf16* __restrict__ K,
                    const bf16* __restrict__ V, bf16* __restrict__ O, int heads, int q_len,
                    int kv_len, long long q_batch_stride, int q_row_stride,
                    long long kv_batch_stride, int kv_row_stride, long long o_batch_stride,
                    int o_row_stride, float scale, int causal) {
    (void)heads;
    __shared__ __align__(128) unsigned char smem[4 * kBr * 96 * 2];
    flash_attn_impl<96>(smem, Q, K, V, O, q_len, kv_len, q_batch_stride, q_row_stride,
                        kv_batch_stride, kv_row_stride, o_batch_stride, o_row_stride, scale,
                        causal);
}

// An explicit minimum of 8 CTAs/SM (64 registers) also steers ptxas on sm_80 off a 48-register
// allocation that spilled.
extern "C" __global__ void __launch_bounds__(kDecThreads, 8)
flash_decode_bf16(const bf16* __restrict__ q, const bf16* __restrict__ Kc,
                  const bf16* __restrict__ Vc, float* __restrict__ part_o,
                  float* __restrict__ part_ml, int heads, int kv_len, int head_dim,
                  long long head_stride, int splits, float scale) {
    (void)heads;
    __shared__ DecodeSmem sm;
    // Block-uniform branch: 8 lanes per key fill a warp with 4 keys at d <= 64; d in (64, 128]
    // needs 16 lanes (d = 96 leaves 4 of them idle, which a bandwidth-bound loop tolerates).
    if (head_dim <= 64) {
        flash_decode_impl<8>(sm, q, Kc, Vc, part_o, part_ml, kv_len, head_dim, head_stride, splits,
                             scale);
    } else {
        flash_decode_impl<16>(sm, q, Kc, Vc, part_o, part_ml, kv_len, head_dim, head_stride, splits,
                              scale);
    }
}

extern "C" __global__ void __launch_bounds__(128)
flash_decode_combine_bf16(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                          bf16* __restrict__ o, int heads, int head_dim, int splits) {
    (void)heads;
    const int h = blockIdx.x;
    const float* ml = part_ml + static_cast<long long>(h) * splits * 2;

    // Every thread derives M and L itself: splits is small and ml is a broadcast read.
    float M = -INFINITY;
    for (int s = 0; s < splits; ++s) {
        if (ml[2 * s + 1] > 0.f) M = fmaxf(M, ml[2 * s]);
    }
    const float me = M * kLog2e;  // only used when some split has l > 0, i.e. M is finite
    float L = 0.f;
    for (int s = 0; s < splits; ++s) {
        const float l = ml[2 * s + 1];
        if (l > 0.f) L = fmaf(exp2f(fmaf(ml[2 * s], kLog2e, -me)), l, L);
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;

    const float* po = part_o + static_cast<long long>(h) * splits * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float acc = 0.f;
        for (int s = 0; s < splits; ++s) {
            const float l = ml[2 * s + 1];
            if (l > 0.f) {
                acc = fmaf(exp2f(fmaf(ml[2 * s], kLog2e, -me)),
                           po[static_cast<long long>(s) * head_dim + d], acc);
            }
        }
        o[static_cast<long long>(h) * head_dim + d] = __float2bfloat16_rn(acc * inv);
    }
}
