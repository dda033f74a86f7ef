//! AVX-512 LayerNorm: three masked 16-lane sweeps per row (sum, centred squares, normalise).

use std::arch::x86_64::*;

use crate::cpu::math::avx512::mask16;

/// # Safety
/// The CPU supports AVX-512F/BW/VL; `x`/`out` hold `rows·cols`, `weight`/`bias` `cols`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
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
    let (w, b) = (weight.as_ptr(), bias.as_ptr());
    for r in 0..rows {
        let xr = x.as_ptr().add(r * cols);
        let or = out.as_mut_ptr().add(r * cols);
        let mut s = [_mm512_setzero_ps(); 2];
        let mut j = 0;
        while j < cols {
            let v = _mm512_maskz_loadu_ps(mask16(cols - j), xr.add(j));
            s[(j / 16) & 1] = _mm512_add_ps(s[(j / 16) & 1], v);
            j += 16;
        }
        let mean = _mm512_reduce_add_ps(_mm512_add_ps(s[0], s[1])) / cols as f32;
        let vmean = _mm512_set1_ps(mean);
        let mut s = [_mm512_setzero_ps(); 2];
        let mut j = 0;
        while j < cols {
            let m = mask16(cols - j);
            let d = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, xr.add(j)), vmean);
            s[(j / 16) & 1] = _mm512_fmadd_ps(d, d, s[(j / 16) & 1]);
            j += 16;
        }
        let var = _mm512_reduce_add_ps(_mm512_add_ps(s[0], s[1])) / cols as f32;
        let rstd = _mm512_set1_ps(1.0 / (var + eps).sqrt());
        let mut j = 0;
        while j < cols {
            let m = mask16(cols - j);
            let d = _mm512_mul_ps(
                _mm512_sub_ps(_mm512_maskz_loadu_ps(m, xr.add(j)), vmean),
                rstd,
            );
            let y = _mm512_fmadd_ps(
                d,
                _mm512_maskz_loadu_ps(m, w.add(j)),
                _mm512_maskz_loadu_ps(m, b.add(j)),
            );
            _mm512_mask_storeu_ps(or.add(j), m, y);
            j += 16;
        }
    }
}
