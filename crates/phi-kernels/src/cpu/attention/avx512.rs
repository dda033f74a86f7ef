//! AVX-512 attention pieces. Scores: groups of 8 rows × 32 keys (16 zmm accumulators, q
//! broadcast, two Kᵀ loads per head_dim step). P·V: groups of 8 rows × 32 head_dim columns (16
//! accumulators, p broadcast, two masked V loads per key). Decode dot products take four keys
//! at a time.

use std::arch::x86_64::*;

use super::{online_softmax_tile, AttnOps, BlockArgs, RowArgs, BK, BQ};
use half::bf16;

use crate::cpu::math::avx512::{exp, mask16, Lanes16};

pub(super) struct Avx512;

impl AttnOps for Avx512 {
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

/// Rows per register group: 8 rows × 32 keys (or head_dim columns) = 16 zmm accumulators.
const RG: usize = 8;

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn scores(a: &BlockArgs, j0: usize, bk: usize, s: &mut [f32; BQ * BK]) {
    let q: [*const f32; BQ] = std::array::from_fn(|i| a.q.wrapping_add(i.min(a.nq - 1) * a.q_rs));
    let scale = _mm512_set1_ps(a.scale);
    // Kᵀ rows are kv_pad long (a multiple of 32) and j0 + jc < kv_len, so 32 keys are readable.
    for jc in (0..bk).step_by(32) {
        // The 32-key slab of Kᵀ (d × 128 B) is fetched from L2 by the first group, from L1 after.
        for g in (0..a.nq).step_by(RG) {
            let mut acc = [[_mm512_setzero_ps(); 2]; RG];
            let mut kt = a.kt.add(j0 + jc);
            for e in 0..a.d {
                let k0 = _mm512_loadu_ps(kt);
                let k1 = _mm512_loadu_ps(kt.add(16));
                for (i, row) in acc.iter_mut().enumerate() {
                    let qi = _mm512_set1_ps(*q[g + i].add(e));
                    row[0] = _mm512_fmadd_ps(qi, k0, row[0]);
                    row[1] = _mm512_fmadd_ps(qi, k1, row[1]);
                }
                kt = kt.wrapping_add(a.kv_pad);
            }
            for (i, row) in acc.iter().enumerate() {
                let dst = s.as_mut_ptr().add((g + i) * BK + jc);
                _mm512_storeu_ps(dst, _mm512_mul_ps(row[0], scale));
                _mm512_storeu_ps(dst.add(16), _mm512_mul_ps(row[1], scale));
            }
        }
    }
}

/// Keys ahead to prefetch in the decode path: cache rows of one head are `row_stride` apart
/// (12 KiB for Phi-3's fused QKV), too far for the hardware prefetchers to follow.
const PF_KEYS: usize = 8;

/// `s[j] = scale · q · k_j` for `j < bk`, key `j` at `k + j·k_rs`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dots<E: Lanes16>(
    q: *const f32,
    k0: *const E,
    k_rs: usize,
    d: usize,
    scale: f32,
    bk: usize,
    s: &mut [f32],
) {
    let mut j = 0;
    while j < bk {
        let nk = (bk - j).min(4);
        let k: [*const E; 4] = std::array::from_fn(|r| k0.add((j + r.min(nk - 1)) * k_rs));
        for r in 0..4 {
            if j + PF_KEYS + r < bk {
                let row = k0.add((j + PF_KEYS + r) * k_rs) as *const i8;
                for byte in (0..d * size_of::<E>()).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(row.add(byte));
                }
            }
        }
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut e = 0;
        while e < d {
            let m = mask16(d - e);
            let qv = _mm512_maskz_loadu_ps(m, q.add(e));
            for r in 0..4 {
                acc[r] = _mm512_fmadd_ps(qv, E::load16(k[r].add(e), m), acc[r]);
            }
            e += 16;
        }
        for r in 0..nk {
            s[j + r] = _mm512_reduce_add_ps(acc[r]) * scale;
        }
        j += 4;
    }
}

/// [`online_softmax_tile`] with this ISA's pieces inlined (one call per tile instead of three
/// per row) and the rescale factor from the vector `exp`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
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
        |x| _mm512_cvtss_f32(exp(_mm512_set1_ps(x))),
    )
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn row_max(s: &[f32], valid: usize) -> f32 {
    let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut mx = neg_inf;
    let mut j = 0;
    while j < valid {
        mx = _mm512_max_ps(
            mx,
            _mm512_mask_loadu_ps(neg_inf, mask16(valid - j), s.as_ptr().add(j)),
        );
        j += 16;
    }
    _mm512_reduce_max_ps(mx)
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn exp_sum(s: &mut [f32], valid: usize, bk: usize, m: f32) -> f32 {
    debug_assert!(bk <= s.len());
    let vm = _mm512_set1_ps(m);
    let mut sum = _mm512_setzero_ps();
    let p = s.as_mut_ptr();
    let mut j = 0;
    while j < bk {
        let live = mask16(bk - j);
        let keep = mask16(valid.saturating_sub(j));
        let e = _mm512_maskz_mov_ps(
            keep,
            exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(keep, p.add(j)), vm)),
        );
        _mm512_mask_storeu_ps(p.add(j), live, e);
        sum = _mm512_add_ps(sum, e);
        j += 16;
    }
    _mm512_reduce_add_ps(sum)
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
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
    debug_assert!(o.len() >= BQ * d_pad && rows <= BQ);
    let op = o.as_mut_ptr();
    for e0 in (0..d).step_by(32) {
        let (m0, m1) = (mask16(d - e0), mask16((d - e0).saturating_sub(16)));
        // The bk × 32 slab of V is fetched from L2 by the first group, from L1 after.
        for g in (0..rows).step_by(RG) {
            let mut acc = [[_mm512_setzero_ps(); 2]; RG];
            for (i, row) in acc.iter_mut().enumerate() {
                let al = _mm512_set1_ps(alpha[g + i]);
                row[0] = _mm512_mul_ps(_mm512_loadu_ps(op.add((g + i) * d_pad + e0)), al);
                row[1] = _mm512_mul_ps(_mm512_loadu_ps(op.add((g + i) * d_pad + e0 + 16)), al);
            }
            let mut vr = v.add(j0 * v_rs + e0);
            let pg = p.as_ptr().add(g * BK);
            for j in 0..bk {
                // Lanes past d are masked off: never read (the row may end there), kept at 0.
                let v0 = _mm512_maskz_loadu_ps(m0, vr);
                let v1 = _mm512_maskz_loadu_ps(m1, vr.wrapping_add(16));
                for (i, row) in acc.iter_mut().enumerate() {
                    let pij = _mm512_set1_ps(*pg.add(i * BK + j));
                    row[0] = _mm512_fmadd_ps(pij, v0, row[0]);
                    row[1] = _mm512_fmadd_ps(pij, v1, row[1]);
                }
                vr = vr.wrapping_add(v_rs);
            }
            for (i, row) in acc.iter().enumerate() {
                _mm512_storeu_ps(op.add((g + i) * d_pad + e0), row[0]);
                _mm512_storeu_ps(op.add((g + i) * d_pad + e0 + 16), row[1]);
            }
        }
    }
}

/// Decode P·V: 64 head_dim columns (4 zmm) per pass over the tile's value rows (`v` is row 0 of
/// the tile), so each row is read as whole cache lines in `ceil(d/64)` passes, with rows
/// `PF_KEYS` ahead prefetched.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pv_row<E: Lanes16>(
    v: *const E,
    v_rs: usize,
    bk: usize,
    d: usize,
    p: &[f32],
    alpha: f32,
    o: &mut [f32],
) {
    debug_assert!(o.len() >= d && p.len() >= bk);
    let op = o.as_mut_ptr();
    let al = _mm512_set1_ps(alpha);
    for e0 in (0..d).step_by(64) {
        let m: [__mmask16; 4] = std::array::from_fn(|c| mask16(d.saturating_sub(e0 + 16 * c)));
        let mut acc: [__m512; 4] = std::array::from_fn(|c| {
            _mm512_mul_ps(
                _mm512_maskz_loadu_ps(m[c], op.wrapping_add(e0 + 16 * c)),
                al,
            )
        });
        let chunk_bytes = (d - e0).min(64) * size_of::<E>();
        for (j, &pj) in p.iter().enumerate().take(bk) {
            if j + PF_KEYS < bk {
                let ahead = v.add((j + PF_KEYS) * v_rs + e0) as *const i8;
                for byte in (0..chunk_bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.add(byte));
                }
            }
            let row = v.add(j * v_rs + e0);
            let pj = _mm512_set1_ps(pj);
            for c in 0..4 {
                // Masked-off chunks (past d) are never read.
                acc[c] = _mm512_fmadd_ps(pj, E::load16(row.wrapping_add(16 * c), m[c]), acc[c]);
            }
        }
        for c in 0..4 {
            _mm512_mask_storeu_ps(op.wrapping_add(e0 + 16 * c), m[c], acc[c]);
        }
    }
}
