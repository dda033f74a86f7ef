//! AVX-512 softmax: masked 16-lane max, exp-and-sum, and scale sweeps.

use std::arch::x86_64::*;

use crate::cpu::math::avx512::{exp, mask16};

/// # Safety
/// The CPU supports AVX-512F/BW/VL; `xs` holds `rows·cols`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn softmax(xs: &mut [f32], rows: usize, cols: usize) {
    debug_assert!(xs.len() >= rows * cols);
    for r in 0..rows {
        let p = xs.as_mut_ptr().add(r * cols);
        let neg_inf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut mx = neg_inf;
        let mut j = 0;
        while j < cols {
            mx = _mm512_max_ps(
                mx,
                _mm512_mask_loadu_ps(neg_inf, mask16(cols - j), p.add(j)),
            );
            j += 16;
        }
        let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let mut sum = _mm512_setzero_ps();
        let mut j = 0;
        while j < cols {
            let m = mask16(cols - j);
            let e = _mm512_maskz_mov_ps(
                m,
                exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, p.add(j)), mx)),
            );
            _mm512_mask_storeu_ps(p.add(j), m, e);
            sum = _mm512_add_ps(sum, e);
            j += 16;
        }
        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        let mut j = 0;
        while j < cols {
            let m = mask16(cols - j);
            _mm512_mask_storeu_ps(
                p.add(j),
                m,
                _mm512_mul_ps(_mm512_maskz_loadu_ps(m, p.add(j)), inv),
            );
            j += 16;
        }
    }
}
