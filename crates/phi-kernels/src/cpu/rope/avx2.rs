//! AVX2 RoPE: both halves of a head rotated 8 pairs at a time, scalar tails.

use std::arch::x86_64::*;

use super::scalar::rope_head;

/// # Safety
/// The CPU supports AVX2+FMA; shapes as checked by `rope_with`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
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
    let body = half / 8 * 8;
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
            for e in (0..body).step_by(8) {
                let a = _mm256_loadu_ps(p.add(e));
                let b = _mm256_loadu_ps(p.add(half + e));
                let lo = _mm256_fmsub_ps(
                    a,
                    _mm256_loadu_ps(c.add(e)),
                    _mm256_mul_ps(b, _mm256_loadu_ps(s.add(e))),
                );
                let hi = _mm256_fmadd_ps(
                    a,
                    _mm256_loadu_ps(s.add(half + e)),
                    _mm256_mul_ps(b, _mm256_loadu_ps(c.add(half + e))),
                );
                _mm256_storeu_ps(p.add(e), lo);
                _mm256_storeu_ps(p.add(half + e), hi);
            }
            for e in body..half {
                let (a, b) = (head[e], head[half + e]);
                head[e] = a * cs[e] - b * sn[e];
                head[half + e] = b * cs[half + e] + a * sn[half + e];
            }
        }
    }
}
