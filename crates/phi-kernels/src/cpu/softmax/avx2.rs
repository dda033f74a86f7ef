//! AVX2 softmax: 8-lane max, exp-and-sum and scale sweeps; scalar tails with libm `expf`.

use std::arch::x86_64::*;

use crate::cpu::math::avx2::{exp, hmax, hsum};

/// # Safety
/// The CPU supports AVX2+FMA; `xs` holds `rows·cols`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn softmax(xs: &mut [f32], rows: usize, cols: usize) {
    debug_assert!(xs.len() >= rows * cols);
    let body = cols / 8 * 8;
    for row in xs.chunks_exact_mut(cols).take(rows) {
        let p = row.as_mut_ptr();
        let mut mx = _mm256_set1_ps(f32::NEG_INFINITY);
        for j in (0..body).step_by(8) {
            mx = _mm256_max_ps(mx, _mm256_loadu_ps(p.add(j)));
        }
        let max = row[body..].iter().fold(hmax(mx), |m, &v| m.max(v));
        let vmax = _mm256_set1_ps(max);
        let mut sum = _mm256_setzero_ps();
        for j in (0..body).step_by(8) {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(j)), vmax));
            _mm256_storeu_ps(p.add(j), e);
            sum = _mm256_add_ps(sum, e);
        }
        let mut total = hsum(sum);
        for v in row[body..].iter_mut() {
            *v = (*v - max).exp();
            total += *v;
        }
        let inv = 1.0 / total;
        let vinv = _mm256_set1_ps(inv);
        for j in (0..body).step_by(8) {
            _mm256_storeu_ps(p.add(j), _mm256_mul_ps(_mm256_loadu_ps(p.add(j)), vinv));
        }
        for v in row[body..].iter_mut() {
            *v *= inv;
        }
    }
}
