//! AVX2 attention pieces. Scores: 6 rows × 16 keys per pass (12 ymm accumulators); P·V: 6 rows ×
//! 16 head_dim columns; head_dim tails (d % 16, d % 8) in scalar code. Decode reads f32 or bf16
//! keys and values where they are: dot products 8 keys at a time, P·V over up to 12 column
//! vectors. Before that, a bf16 cache went through the default `dots_bf16`/`pv_row_bf16`
//! (every row widened by a scalar copy) into a two-chain P·V. One decode row of Phi-3 (32 heads
//! × 96, 2 threads, `timing attn` with KV=bf16 Q_LEN=1 LAYERS=32: separate K and V caches for
//! 32 layers read in turn from DRAM, 2 alternating rounds) took 0.49-0.67 ms at 350 keys,
//! 2.16-2.58 at 1939 and 4.58-4.72 at 4096; now 0.27-0.29, 0.98-1.21 and 1.94-2.28 (20-26 GB/s
//! of K and V, against a DRAM probe of about 30).
//!
//! On a Zen 3 VM (`timing attn`, one thread, best of 10 calls, 3 alternating pairs; FMA peak
//! about 111 GFLOP/s) the 6-row groups and the fused softmax tile took CLIP's 577×577, 16 heads
//! × 64 from 57.2-60.7 to 61.6-62.4 GFLOP/s and a causal 757×757, 32 heads × 96 from 50.0-51.0
//! to 58.1-58.3 against 4-row groups (8 accumulators). `perf` then puts 37% of the time in P·V,
//! 36% in the scores and 15% in the softmax tile.

use std::arch::x86_64::*;

use half::bf16;

use super::{online_softmax_tile, AttnOps, BlockArgs, RowArgs, BK, BQ};
use crate::cpu::math::avx2::{exp, hmax, hsum, Lanes8};

pub(super) struct Avx2;

impl AttnOps for Avx2 {
    unsafe fn scores(a: &BlockArgs, j0: usize, bk: usize, s: &mut [f32; BQ * BK]) {
        scores(a, j0, bk, s)
    }
    unsafe fn dots(a: &RowArgs, j0: usize, bk: usize, s: &mut [f32]) {
        dots(a.q, a.k.add(j0 * a.k_rs), a.k_rs, a.d, a.scale, bk, s)
    }
    unsafe fn dots_bf16(
        a: &RowArgs,
        k: *const bf16,
        k_rs: usize,
        bk: usize,
        s: &mut [f32],
        _scratch: &mut [f32],
    ) {
        dots(a.q, k, k_rs, a.d, a.scale, bk, s)
    }
    unsafe fn row_max(s: &[f32], valid: usize) -> f32 {
        row_max(s, valid)
    }
    unsafe fn exp_sum(s: &mut [f32], valid: usize, bk: usize, m: f32) -> f32 {
        exp_sum(s, valid, bk, m)
    }
    unsafe fn softmax_tile(
        s: &mut [f32; BQ * BK],
        vis: &[usize; BQ],
        j0: usize,
        bk: usize,
        m: &mut [f32; BQ],
        l: &mut [f32; BQ],
        alpha: &mut [f32; BQ],
    ) {
        softmax_tile(s, vis, j0, bk, m, l, alpha)
    }
    unsafe fn pv(
        v: *const f32,
        v_rs: usize,
        j0: usize,
        bk: usize,
        d: usize,
        rows: usize,
        p: &[f32; BQ * BK],
        alpha: &[f32; BQ],
        o: &mut [f32],
    ) {
        pv(v, v_rs, j0, bk, d, rows, p, alpha, o)
    }
    unsafe fn pv_row(
        v: *const f32,
        v_rs: usize,
        j0: usize,
        bk: usize,
        d: usize,
        p: &[f32],
        alpha: f32,
        o: &mut [f32],
    ) {
        pv_row(v.add(j0 * v_rs), v_rs, bk, d, p, alpha, o)
    }
    unsafe fn pv_row_bf16(
        v: *const bf16,
        v_rs: usize,
        bk: usize,
        d: usize,
        p: &[f32],
        alpha: f32,
        o: &mut [f32],
        _scratch: &mut [f32],
    ) {
        pv_row(v, v_rs, bk, d, p, alpha, o)
    }
}

/// Rows per register group: 6 rows × 16 keys (or head_dim columns) = 12 ymm accumulators, with
/// the two K (or V) vectors and a broadcast 15 of the 16 registers. Zen 3 and Skylake retire two
/// FMAs a cycle at 4 cycles' latency, so 8 independent accumulators are the bare minimum.
const RG: usize = 6;
/// The last group of a 32-row block (32 = 5·6 + 2).
const RG_TAIL: usize = BQ % RG;

/// Calls `f(g, rows)` for the register groups covering query rows `0..nq` of a block: groups
/// of `RG` while a whole one fits in the block, then one of `RG_TAIL`.
#[inline(always)]
fn for_groups(nq: usize, mut f: impl FnMut(usize, usize)) {
    let mut g = 0;
    while g < nq {
        let rows = if g + RG <= BQ { RG } else { RG_TAIL };
        f(g, rows);
        g += rows;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn scores(a: &BlockArgs, j0: usize, bk: usize, s: &mut [f32; BQ * BK]) {
    let q: [*const f32; BQ] = std::array::from_fn(|i| a.q.wrapping_add(i.min(a.nq - 1) * a.q_rs));
    // Kᵀ rows are kv_pad long (a multiple of 32) and j0 + jc < kv_len, so 16 keys are readable.
    for jc in (0..bk).step_by(16) {
        for_groups(a.nq, |g, rows| {
            let dst = s.as_mut_ptr().add(g * BK + jc);
            let kt = a.kt.add(j0 + jc);
            if rows == RG {
                score_group::<RG>(a, &q[g..], kt, dst);
            } else {
                score_group::<RG_TAIL>(a, &q[g..], kt, dst);
            }
        });
    }
}

/// Scores of `R` query rows against the 16 keys of Kᵀ starting at `kt`, into `dst` (rows `BK`
/// apart).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_group<const R: usize>(
    a: &BlockArgs,
    q: &[*const f32],
    kt: *const f32,
    dst: *mut f32,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut kt = kt;
    for e in 0..a.d {
        let k0 = _mm256_loadu_ps(kt);
        let k1 = _mm256_loadu_ps(kt.add(8));
        for (i, row) in acc.iter_mut().enumerate() {
            let qi = _mm256_set1_ps(*q[i].add(e));
            row[0] = _mm256_fmadd_ps(qi, k0, row[0]);
            row[1] = _mm256_fmadd_ps(qi, k1, row[1]);
        }
        kt = kt.wrapping_add(a.kv_pad);
    }
    let scale = _mm256_set1_ps(a.scale);
    for (i, row) in acc.iter().enumerate() {
        let dst = dst.add(i * BK);
        _mm256_storeu_ps(dst, _mm256_mul_ps(row[0], scale));
        _mm256_storeu_ps(dst.add(8), _mm256_mul_ps(row[1], scale));
    }
}

/// Keys ahead to prefetch in the decode path: cache rows of one head are `row_stride` apart
/// (12 KiB for Phi-3's fused QKV), too far for the hardware prefetchers to follow.
const PF_KEYS: usize = 8;

/// `s[j] = scale · q · k_j` for `j < bk`, key `j` at `k0 + j·k_rs`, read (and widened) in
/// place: 8 keys at a time, one accumulator each (8 independent FMA chains), the 8 sums
/// reduced together by a tree of horizontal adds.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn dots<E: Lanes8>(
    q: *const f32,
    k0: *const E,
    k_rs: usize,
    d: usize,
    scale: f32,
    bk: usize,
    s: &mut [f32],
) {
    debug_assert!(s.len() >= bk);
    let body = d / 8 * 8;
    let row_bytes = d * size_of::<E>();
    let mut j = 0;
    while j < bk {
        let nk = (bk - j).min(8);
        let k: [*const E; 8] = std::array::from_fn(|r| k0.add((j + r.min(nk - 1)) * k_rs));
        for r in 0..8 {
            if j + PF_KEYS + r < bk {
                let row = k0.add((j + PF_KEYS + r) * k_rs) as *const i8;
                for byte in (0..row_bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(row.add(byte));
                }
            }
        }
        let mut acc = [_mm256_setzero_ps(); 8];
        for e in (0..body).step_by(8) {
            let qv = _mm256_loadu_ps(q.add(e));
            for r in 0..8 {
                acc[r] = _mm256_fmadd_ps(qv, E::load8(k[r].add(e)), acc[r]);
            }
        }
        let mut sums = [0f32; 8];
        _mm256_storeu_ps(sums.as_mut_ptr(), hsum8(acc));
        for (r, sum) in sums.iter_mut().enumerate().take(nk) {
            for e in body..d {
                *sum += *q.add(e) * (*k[r].add(e)).to_f32();
            }
            s[j + r] = *sum * scale;
        }
        j += 8;
    }
}

/// Lane `r` of the result is the sum of the 8 lanes of `v[r]`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum8(v: [__m256; 8]) -> __m256 {
    // Pairwise sums within each 128-bit half, twice: lanes [r0..r3 | r0..r3] of the low and
    // the high halves of each input, then the two halves added.
    let h01 = _mm256_hadd_ps(v[0], v[1]);
    let h23 = _mm256_hadd_ps(v[2], v[3]);
    let h45 = _mm256_hadd_ps(v[4], v[5]);
    let h67 = _mm256_hadd_ps(v[6], v[7]);
    let h0123 = _mm256_hadd_ps(h01, h23);
    let h4567 = _mm256_hadd_ps(h45, h67);
    _mm256_add_ps(
        _mm256_permute2f128_ps::<0x20>(h0123, h4567),
        _mm256_permute2f128_ps::<0x31>(h0123, h4567),
    )
}

/// [`online_softmax_tile`] with this ISA's pieces inlined (one call per tile instead of three
/// per row) and the rescale factor from the vector `exp`.
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_tile(
    s: &mut [f32; BQ * BK],
    vis: &[usize; BQ],
    j0: usize,
    bk: usize,
    m: &mut [f32; BQ],
    l: &mut [f32; BQ],
    alpha: &mut [f32; BQ],
) {
    // SAFETY (closures): the caller's CPU has this ISA; rows and lengths as the helper passes.
    online_softmax_tile(
        s,
        vis,
        j0,
        bk,
        m,
        l,
        alpha,
        |row, valid| unsafe { row_max(row, valid) },
        |row, valid, bk, m| unsafe { exp_sum(row, valid, bk, m) },
        |x| _mm256_cvtss_f32(exp(_mm256_set1_ps(x))),
    )
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_max(s: &[f32], valid: usize) -> f32 {
    let body = valid / 8 * 8;
    let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
    for j in (0..body).step_by(8) {
        mx = _mm256_max_ps(mx, _mm256_loadu_ps(s.as_ptr().add(j)));
    }
    s[body..valid].iter().fold(hmax(mx), |m, &x| m.max(x))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_sum(s: &mut [f32], valid: usize, bk: usize, m: f32) -> f32 {
    let body = valid / 8 * 8;
    let vm = _mm256_set1_ps(m);
    let mut sum = _mm256_setzero_ps();
    let p = s.as_mut_ptr();
    for j in (0..body).step_by(8) {
        let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(j)), vm));
        _mm256_storeu_ps(p.add(j), e);
        sum = _mm256_add_ps(sum, e);
    }
    let mut total = hsum(sum);
    for x in &mut s[body..valid] {
        *x = (*x - m).exp();
        total += *x;
    }
    s[valid..bk].fill(0.0);
    total
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv(
    v: *const f32,
    v_rs: usize,
    j0: usize,
    bk: usize,
    d: usize,
    rows: usize,
    p: &[f32; BQ * BK],
    alpha: &[f32; BQ],
    o: &mut [f32],
) {
    let d_pad = d.next_multiple_of(32);
    debug_assert!(o.len() >= BQ * d_pad);
    let body = d / 16 * 16;
    let op = o.as_mut_ptr();
    for e0 in (0..body).step_by(16) {
        let v = v.add(j0 * v_rs + e0);
        for_groups(rows, |g, n| {
            let (p, alpha, o) = (&p[g * BK..], &alpha[g..], op.add(g * d_pad + e0));
            if n == RG {
                pv_group::<RG>(v, v_rs, bk, p, alpha, o, d_pad);
            } else {
                pv_group::<RG_TAIL>(v, v_rs, bk, p, alpha, o, d_pad);
            }
        });
    }
    if body < d {
        for i in 0..rows {
            let orow = &mut o[i * d_pad + body..i * d_pad + d];
            for y in orow.iter_mut() {
                *y *= alpha[i];
            }
            for j in 0..bk {
                let pij = p[i * BK + j];
                let vr = v.add((j0 + j) * v_rs);
                for (e, y) in orow.iter_mut().enumerate() {
                    *y += pij * *vr.add(body + e);
                }
            }
        }
    }
}

/// `o_i = alpha_i · o_i + Σ_j p[i·BK + j] · v_j` for `R` rows `d_pad` apart, over the 16 value
/// columns starting at `v` (value rows `v_rs` apart, `bk` of them).
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv_group<const R: usize>(
    v: *const f32,
    v_rs: usize,
    bk: usize,
    p: &[f32],
    alpha: &[f32],
    o: *mut f32,
    d_pad: usize,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    for (i, row) in acc.iter_mut().enumerate() {
        let al = _mm256_set1_ps(alpha[i]);
        row[0] = _mm256_mul_ps(_mm256_loadu_ps(o.add(i * d_pad)), al);
        row[1] = _mm256_mul_ps(_mm256_loadu_ps(o.add(i * d_pad + 8)), al);
    }
    let pp = p.as_ptr();
    for j in 0..bk {
        let vr = v.add(j * v_rs);
        let v0 = _mm256_loadu_ps(vr);
        let v1 = _mm256_loadu_ps(vr.add(8));
        for (i, row) in acc.iter_mut().enumerate() {
            let pij = _mm256_set1_ps(*pp.add(i * BK + j));
            row[0] = _mm256_fmadd_ps(pij, v0, row[0]);
            row[1] = _mm256_fmadd_ps(pij, v1, row[1]);
        }
    }
    for (i, row) in acc.iter().enumerate() {
        _mm256_storeu_ps(o.add(i * d_pad), row[0]);
        _mm256_storeu_ps(o.add(i * d_pad + 8), row[1]);
    }
}

/// `o = alpha · o + Σ_{j<bk} p[j] · v_j` over `d` columns, value row `j` at `v + j·v_rs`, read
/// (and widened) in place: blocks of 12, 8 or 4 vectors of columns (one accumulator each, so
/// each key's FMAs are independent), then single vectors and a scalar tail.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv_row<E: Lanes8>(
    v: *const E,
    v_rs: usize,
    bk: usize,
    d: usize,
    p: &[f32],
    alpha: f32,
    o: &mut [f32],
) {
    debug_assert!(o.len() >= d && p.len() >= bk);
    let mut e0 = 0;
    while e0 + 8 <= d {
        let left = (d - e0) / 8;
        e0 += 8 * if left >= 12 {
            pv_cols::<E, 12>(v.add(e0), v_rs, bk, p, alpha, o.as_mut_ptr().add(e0))
        } else if left >= 8 {
            pv_cols::<E, 8>(v.add(e0), v_rs, bk, p, alpha, o.as_mut_ptr().add(e0))
        } else if left >= 4 {
            pv_cols::<E, 4>(v.add(e0), v_rs, bk, p, alpha, o.as_mut_ptr().add(e0))
        } else {
            pv_cols::<E, 1>(v.add(e0), v_rs, bk, p, alpha, o.as_mut_ptr().add(e0))
        };
    }
    for (e, y) in o.iter_mut().enumerate().take(d).skip(e0) {
        let mut acc = *y * alpha;
        for (j, &pj) in p.iter().enumerate().take(bk) {
            acc += pj * (*v.add(j * v_rs + e)).to_f32();
        }
        *y = acc;
    }
}

/// [`pv_row`] over `NV` vectors of columns from `v` and `o`; returns `NV`.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn pv_cols<E: Lanes8, const NV: usize>(
    v: *const E,
    v_rs: usize,
    bk: usize,
    p: &[f32],
    alpha: f32,
    o: *mut f32,
) -> usize {
    let al = _mm256_set1_ps(alpha);
    let mut acc: [__m256; NV] =
        std::array::from_fn(|c| _mm256_mul_ps(_mm256_loadu_ps(o.add(8 * c)), al));
    for (j, &pj) in p.iter().enumerate().take(bk) {
        let row = v.add(j * v_rs);
        let pj = _mm256_set1_ps(pj);
        for (c, a) in acc.iter_mut().enumerate() {
            *a = _mm256_fmadd_ps(pj, E::load8(row.add(8 * c)), *a);
        }
    }
    for (c, a) in acc.iter().enumerate() {
        _mm256_storeu_ps(o.add(8 * c), *a);
    }
    NV
}
