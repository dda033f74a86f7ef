//! Portable attention pieces: plain loops, libm `expf`.

use super::{AttnOps, BlockArgs, RowArgs, BK, BQ};

pub(super) struct Scalar;

impl AttnOps for Scalar {
    unsafe fn scores(a: &BlockArgs, j0: usize, bk: usize, s: &mut [f32; BQ * BK]) {
        for i in 0..a.nq {
            let qi = std::slice::from_raw_parts(a.q.add(i * a.q_rs), a.d);
            let row = &mut s[i * BK..i * BK + bk];
            row.fill(0.0);
            for (e, &x) in qi.iter().enumerate() {
                let kt = std::slice::from_raw_parts(a.kt.add(e * a.kv_pad + j0), bk);
                for (y, &kv) in row.iter_mut().zip(kt) {
                    *y += x * kv;
                }
            }
            for y in row.iter_mut() {
                *y *= a.scale;
            }
        }
    }

    unsafe fn dots(a: &RowArgs, j0: usize, bk: usize, s: &mut [f32]) {
        let q = std::slice::from_raw_parts(a.q, a.d);
        for (j, y) in s.iter_mut().enumerate().take(bk) {
            let kr = std::slice::from_raw_parts(a.k.add((j0 + j) * a.k_rs), a.d);
            let mut acc = [0f32; 4];
            for (e, (&x, &kv)) in q.iter().zip(kr).enumerate() {
                acc[e & 3] += x * kv;
            }
            *y = ((acc[0] + acc[1]) + (acc[2] + acc[3])) * a.scale;
        }
    }

    unsafe fn row_max(s: &[f32], valid: usize) -> f32 {
        s[..valid].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x))
    }

    unsafe fn exp_sum(s: &mut [f32], valid: usize, bk: usize, m: f32) -> f32 {
        let mut sum = 0f32;
        for x in &mut s[..valid] {
            *x = (*x - m).exp();
            sum += *x;
        }
        s[valid..bk].fill(0.0);
        sum
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
        let d_pad = d.next_multiple_of(32);
        for i in 0..rows {
            Self::pv_row(
                v,
                v_rs,
                j0,
                bk,
                d,
                &p[i * BK..(i + 1) * BK],
                alpha[i],
                &mut o[i * d_pad..(i + 1) * d_pad],
            );
        }
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
        let o = &mut o[..d];
        for y in o.iter_mut() {
            *y *= alpha;
        }
        for (j, &pj) in p.iter().enumerate().take(bk) {
            let vr = std::slice::from_raw_parts(v.add((j0 + j) * v_rs), d);
            for (y, &x) in o.iter_mut().zip(vr) {
                *y += pj * x;
            }
        }
    }
}
