//! AVX2 LayerNorm: three 8-lane sweeps per row, scalar tails.

use std::arch::x86_64::*;

use crate::cpu::math::avx2::hsum;

/// # Safety
/// The CPU supports AVX2+FMA; `x`/`out` hold `rows·cols`, `weight`/`bias` `cols`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn layer_norm(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
    rows: usize,
    cols: usize,
) {
    debug_assert!(
        x.len() >= rows * cols
            && out.len() >= rows * cols
            && weight.len() >= cols
            && bias.len() >= cols
    );
    let body = cols / 8 * 8;
    let (w, b) = (weight.as_ptr(), bias.as_ptr());
    for r in 0..rows {
        let xs = &x[r * cols..(r + 1) * cols];
        let xr = xs.as_ptr();
        let or = out.as_mut_ptr().add(r * cols);
        let mut s = [_mm256_setzero_ps(); 2];
        for j in (0..body).step_by(8) {
            s[(j / 8) & 1] = _mm256_add_ps(s[(j / 8) & 1], _mm256_loadu_ps(xr.add(j)));
        }
        let mean = (hsum(_mm256_add_ps(s[0], s[1])) + xs[body..].iter().sum::<f32>()) / cols as f32;
        let vmean = _mm256_set1_ps(mean);
        let mut s = [_mm256_setzero_ps(); 2];
        for j in (0..body).step_by(8) {
            let d = _mm256_sub_ps(_mm256_loadu_ps(xr.add(j)), vmean);
            s[(j / 8) & 1] = _mm256_fmadd_ps(d, d, s[(j / 8) & 1]);
        }
        let tail: f32 = xs[body..].iter().map(|&v| (v - mean) * (v - mean)).sum();
        let var = (hsum(_mm256_add_ps(s[0], s[1])) + tail) / cols as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        let vrstd = _mm256_set1_ps(rstd);
        for j in (0..body).step_by(8) {
            let d = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr.add(j)), vmean), vrstd);
            _mm256_storeu_ps(
                or.add(j),
                _mm256_fmadd_ps(d, _mm256_loadu_ps(w.add(j)), _mm256_loadu_ps(b.add(j))),
            );
        }
        for j in body..cols {
            *or.add(j) = (xs[j] - mean) * rstd * weight[j] + bias[j];
        }
    }
}
