//! AVX-512 RoPE: both halves of a head rotated 16 pairs at a time, masked tails.

use std::arch::x86_64::*;

use super::scalar::rope_head;
use crate::cpu::math::avx512::mask16;

/// # Safety
/// The CPU supports AVX-512F/BW/VL; shapes as checked by `rope_with`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn rope(
    x: &mut [f32],
    rows: usize,
    row_stride: usize,
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
) {
    let half = head_dim / 2;
    for r in 0..rows {
        let (cs, sn) = (
            &cos[r * head_dim..(r + 1) * head_dim],
            &sin[r * head_dim..(r + 1) * head_dim],
        );
        for h in 0..heads {
            let o = r * row_stride + h * head_dim;
            let head = &mut x[o..o + head_dim];
            if head_dim % 2 == 1 {
                rope_head(head, cs, sn);
                continue;
            }
            let (p, c, s) = (head.as_mut_ptr(), cs.as_ptr(), sn.as_ptr());
            let mut e = 0;
            while e < half {
                let m = mask16(half - e);
                let a = _mm512_maskz_loadu_ps(m, p.add(e));
                let b = _mm512_maskz_loadu_ps(m, p.add(half + e));
                let lo = _mm512_fmsub_ps(
                    a,
                    _mm512_maskz_loadu_ps(m, c.add(e)),
                    _mm512_mul_ps(b, _mm512_maskz_loadu_ps(m, s.add(e))),
                );
                let hi = _mm512_fmadd_ps(
                    a,
                    _mm512_maskz_loadu_ps(m, s.add(half + e)),
                    _mm512_mul_ps(b, _mm512_maskz_loadu_ps(m, c.add(half + e))),
                );
                _mm512_mask_storeu_ps(p.add(e), m, lo);
                _mm512_mask_storeu_ps(p.add(half + e), m, hi);
                e += 16;
            }
        }
    }
}
