//! AVX-512 merge: 16-lane masked copies per half token.

use std::arch::x86_64::*;

use super::merge_src;
use crate::cpu::math::avx512::mask16;

/// # Safety
/// The CPU supports AVX-512F/BW/VL; shapes as checked by `merge_2x2_with`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn merge_tokens(feat: &[f32], out: &mut [f32], t0: usize, g: usize, c: usize) {
    for (t, tok) in out.chunks_exact_mut(4 * c).enumerate() {
        for dy in 0..2 {
            let src = &feat[merge_src(t0 + t, dy, g, c)..][..2 * c];
            let dst = &mut tok[dy * 2 * c..(dy + 1) * 2 * c];
            let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
            let mut e = 0;
            while e < 2 * c {
                let m = mask16(2 * c - e);
                _mm512_mask_storeu_ps(d.add(e), m, _mm512_maskz_loadu_ps(m, s.add(e)));
                e += 16;
            }
        }
    }
}
