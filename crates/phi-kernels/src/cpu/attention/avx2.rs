//! AVX2 attention pieces. Scores: 4 rows × 16 keys per pass (8 ymm accumulators); P·V: 4 rows ×
//! 16 head_dim columns; head_dim tails (d % 16, d % 8) in scalar code.

use std::arch::x86_64::*;

use super::{AttnOps, BlockArgs, RowArgs, BK, BQ};
use crate::cpu::math::avx2::{exp, hmax, hsum};

pub(super) struct Avx2;

impl AttnOps for Avx2 {
    unsafe fn scores(a: &BlockArgs, j0: usize, bk: usize, s: &mut [f32; BQ * BK]) {
        scores(a, j0, bk, s)
    }
    unsafe fn dots(a: &RowArgs, j0: usize, bk: usize, s: &mut [f32]) {
        dots(a, j0, bk, s)
    }
    unsafe fn row_max(s: &[f32], valid: usize) -> f32 {
        row_max(s, valid)
    }
    unsafe fn exp_sum(s: &mut [f32], valid: usize, bk: usize, m: f32) -> f32 {
        exp_sum(s, valid, bk, m)
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
        pv_row(v, v_rs, j0, bk, d, p, alpha, o)
    }
}

const RG: usize = 4;

#[target_feature(enable = "avx2,fma")]
unsafe fn scores(a: &BlockArgs, j0: usize, bk: usize, s: &mut [f32; BQ * BK]) {
    let q: [*const f32; BQ] = std::array::from_fn(|i| a.q.wrapping_add(i.min(a.nq - 1) * a.q_rs));
    let scale = _mm256_set1_ps(a.scale);
    // Kᵀ rows are kv_pad long (a multiple of 32) and j0 + jc < kv_len, so 16 keys are readable.
    for jc in (0..bk).step_by(16) {
        for g in (0..a.nq).step_by(RG) {
            let mut acc = [[_mm256_setzero_ps(); 2]; RG];
            let mut kt = a.kt.add(j0 + jc);
            for e in 0..a.d {
                let k0 = _mm256_loadu_ps(kt);
                let k1 = _mm256_loadu_ps(kt.add(8));
                for (i, row) in acc.iter_mut().enumerate() {
                    let qi = _mm256_set1_ps(*q[g + i].add(e));
                    row[0] = _mm256_fmadd_ps(qi, k0, row[0]);
                    row[1] = _mm256_fmadd_ps(qi, k1, row[1]);
                }
                kt = kt.wrapping_add(a.kv_pad);
            }
            for (i, row) in acc.iter().enumerate() {
                let dst = s.as_mut_ptr().add((g + i) * BK + jc);
                _mm256_storeu_ps(dst, _mm256_mul_ps(row[0], scale));
                _mm256_storeu_ps(dst.add(8), _mm256_mul_ps(row[1], scale));
            }
        }
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dots(a: &RowArgs, j0: usize, bk: usize, s: &mut [f32]) {
    let body = a.d / 8 * 8;
    let mut j = 0;
    while j < bk {
        let nk = (bk - j).min(4);
        let k: [*const f32; 4] =
            std::array::from_fn(|r| a.k.add((j0 + j + r.min(nk - 1)) * a.k_rs));
        let mut acc = [_mm256_setzero_ps(); 4];
        for e in (0..body).step_by(8) {
            let qv = _mm256_loadu_ps(a.q.add(e));
            for r in 0..4 {
                acc[r] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[r].add(e)), acc[r]);
            }
        }
        for r in 0..nk {
            let mut t = hsum(acc[r]);
            for e in body..a.d {
                t += *a.q.add(e) * *k[r].add(e);
            }
            s[j + r] = t * a.scale;
        }
        j += 4;
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn row_max(s: &[f32], valid: usize) -> f32 {
    let body = valid / 8 * 8;
    let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
    for j in (0..body).step_by(8) {
        mx = _mm256_max_ps(mx, _mm256_loadu_ps(s.as_ptr().add(j)));
    }
    s[body..valid].iter().fold(hmax(mx), |m, &x| m.max(x))
}

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
        for g in (0..rows).step_by(RG) {
            let mut acc = [[_mm256_setzero_ps(); 2]; RG];
            for (i, row) in acc.iter_mut().enumerate() {
                let al = _mm256_set1_ps(alpha[g + i]);
                row[0] = _mm256_mul_ps(_mm256_loadu_ps(op.add((g + i) * d_pad + e0)), al);
                row[1] = _mm256_mul_ps(_mm256_loadu_ps(op.add((g + i) * d_pad + e0 + 8)), al);
            }
            for j in 0..bk {
                let vr = v.add((j0 + j) * v_rs + e0);
                let v0 = _mm256_loadu_ps(vr);
                let v1 = _mm256_loadu_ps(vr.add(8));
                for (i, row) in acc.iter_mut().enumerate() {
                    let pij = _mm256_set1_ps(p[(g + i) * BK + j]);
                    row[0] = _mm256_fmadd_ps(pij, v0, row[0]);
                    row[1] = _mm256_fmadd_ps(pij, v1, row[1]);
                }
            }
            for (i, row) in acc.iter().enumerate() {
                _mm256_storeu_ps(op.add((g + i) * d_pad + e0), row[0]);
                _mm256_storeu_ps(op.add((g + i) * d_pad + e0 + 8), row[1]);
            }
        }
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

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
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
    debug_assert!(o.len() >= d && p.len() >= bk);
    let body = d / 8 * 8;
    let op = o.as_mut_ptr();
    let al = _mm256_set1_ps(alpha);
    for e0 in (0..body).step_by(8) {
        let mut acc = [
            _mm256_mul_ps(_mm256_loadu_ps(op.add(e0)), al),
            _mm256_setzero_ps(),
        ];
        for j in 0..bk {
            let vj = _mm256_loadu_ps(v.add((j0 + j) * v_rs + e0));
            acc[j & 1] = _mm256_fmadd_ps(_mm256_set1_ps(p[j]), vj, acc[j & 1]);
        }
        _mm256_storeu_ps(op.add(e0), _mm256_add_ps(acc[0], acc[1]));
    }
    for (e, y) in o.iter_mut().enumerate().take(d).skip(body) {
        let mut acc = *y * alpha;
        for (j, &pj) in p.iter().enumerate().take(bk) {
            acc += pj * *v.add((j0 + j) * v_rs + e);
        }
        *y = acc;
    }
}
