//! AVX2 merge: 8-lane copies per half token, scalar tails.

use std::arch::x86_64::*;

use super::merge_src;

/// # Safety
/// The CPU supports AVX2+FMA; shapes as checked by `merge_2x2_with`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn merge_tokens(feat: &[f32], out: &mut [f32], t0: usize, g: usize, c: usize) {
    let len = 2 * c;
    let body = len / 8 * 8;
    for (t, tok) in out.chunks_exact_mut(4 * c).enumerate() {
        for dy in 0..2 {
            let src = &feat[merge_src(t0 + t, dy, g, c)..][..len];
            let dst = &mut tok[dy * len..(dy + 1) * len];
            for e in (0..body).step_by(8) {
                _mm256_storeu_ps(
                    dst.as_mut_ptr().add(e),
                    _mm256_loadu_ps(src.as_ptr().add(e)),
                );
            }
            dst[body..].copy_from_slice(&src[body..]);
        }
    }
}
