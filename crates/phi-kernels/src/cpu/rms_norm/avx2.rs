//! AVX2 RMSNorm: an 8-lane sum-of-squares sweep, then a scale sweep; scalar tails.

use std::arch::x86_64::*;

use crate::cpu::math::avx2::hsum;

/// # Safety
/// The CPU supports AVX2+FMA; `x`/`out` hold `rows·cols`, `weight` `cols`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn rms_norm(
    x: &[f32],
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
    rows: usize,
    cols: usize,
) {
    debug_assert!(x.len() >= rows * cols && out.len() >= rows * cols && weight.len() >= cols);
    let body = cols / 8 * 8;
    let w = weight.as_ptr();
    for r in 0..rows {
        let xs = &x[r * cols..(r + 1) * cols];
        let xr = xs.as_ptr();
        let or = out.as_mut_ptr().add(r * cols);
        let mut s = [_mm256_setzero_ps(); 2];
        for j in (0..body).step_by(8) {
            let v = _mm256_loadu_ps(xr.add(j));
            s[(j / 8) & 1] = _mm256_fmadd_ps(v, v, s[(j / 8) & 1]);
        }
        let tail: f32 = xs[body..].iter().map(|&v| v * v).sum();
        let ms = (hsum(_mm256_add_ps(s[0], s[1])) + tail) / cols as f32;
        let rs = 1.0 / (ms + eps).sqrt();
        let vrs = _mm256_set1_ps(rs);
        for j in (0..body).step_by(8) {
            let y = _mm256_mul_ps(
                _mm256_loadu_ps(w.add(j)),
                _mm256_mul_ps(_mm256_loadu_ps(xr.add(j)), vrs),
            );
            _mm256_storeu_ps(or.add(j), y);
        }
        for j in body..cols {
            *or.add(j) = weight[j] * (xs[j] * rs);
        }
    }
}
