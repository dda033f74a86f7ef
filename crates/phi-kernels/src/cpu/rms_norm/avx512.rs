//! AVX-512 RMSNorm: a masked sum-of-squares sweep, then a scale sweep.

use std::arch::x86_64::*;

use crate::cpu::math::avx512::mask16;

/// # Safety
/// The CPU supports AVX-512F/BW/VL; `x`/`out` hold `rows·cols`, `weight` `cols`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn rms_norm(
    x: &[f32],
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
    rows: usize,
    cols: usize,
) {
    debug_assert!(x.len() >= rows * cols && out.len() >= rows * cols && weight.len() >= cols);
    let w = weight.as_ptr();
    for r in 0..rows {
        let xr = x.as_ptr().add(r * cols);
        let or = out.as_mut_ptr().add(r * cols);
        let mut s = [_mm512_setzero_ps(); 2];
        let mut j = 0;
        while j < cols {
            let v = _mm512_maskz_loadu_ps(mask16(cols - j), xr.add(j));
            s[(j / 16) & 1] = _mm512_fmadd_ps(v, v, s[(j / 16) & 1]);
            j += 16;
        }
        let ms = _mm512_reduce_add_ps(_mm512_add_ps(s[0], s[1])) / cols as f32;
        let rs = _mm512_set1_ps(1.0 / (ms + eps).sqrt());
        let mut j = 0;
        while j < cols {
            let m = mask16(cols - j);
            let y = _mm512_mul_ps(
                _mm512_maskz_loadu_ps(m, w.add(j)),
                _mm512_mul_ps(_mm512_maskz_loadu_ps(m, xr.add(j)), rs),
            );
            _mm512_mask_storeu_ps(or.add(j), m, y);
            j += 16;
        }
    }
}
