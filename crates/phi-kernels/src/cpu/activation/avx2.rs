//! AVX2 activations: 8 lanes, polynomial `exp`/`erf` from `cpu/math`; tails through the scalar
//! module.

use std::arch::x86_64::*;

use super::{scalar, QUICK_GELU_SCALE};
use crate::cpu::math::avx2::{erf, exp};

/// `x / (1 + e^{-s·x})`.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn x_sigmoid(x: __m256, s: f32) -> __m256 {
    let e = exp(_mm256_mul_ps(x, _mm256_set1_ps(-s)));
    _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e))
}

/// # Safety
/// The CPU supports AVX2+FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn quick_gelu(xs: &mut [f32]) {
    let body = xs.len() / 8 * 8;
    let p = xs.as_mut_ptr();
    for i in (0..body).step_by(8) {
        _mm256_storeu_ps(
            p.add(i),
            x_sigmoid(_mm256_loadu_ps(p.add(i)), QUICK_GELU_SCALE),
        );
    }
    scalar::quick_gelu(&mut xs[body..]);
}

/// # Safety
/// The CPU supports AVX2+FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn gelu_erf(xs: &mut [f32]) {
    let body = xs.len() / 8 * 8;
    let p = xs.as_mut_ptr();
    let (half, one, rsqrt2) = (
        _mm256_set1_ps(0.5),
        _mm256_set1_ps(1.0),
        _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
    );
    for i in (0..body).step_by(8) {
        let x = _mm256_loadu_ps(p.add(i));
        let y = _mm256_mul_ps(
            _mm256_mul_ps(half, x),
            _mm256_add_ps(one, erf(_mm256_mul_ps(x, rsqrt2))),
        );
        _mm256_storeu_ps(p.add(i), y);
    }
    scalar::gelu_erf(&mut xs[body..]);
}

/// # Safety
/// The CPU supports AVX2+FMA; `gate_up` holds `rows·2·inter`, `out` `rows·inter`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn silu_mul(gate_up: &[f32], out: &mut [f32], rows: usize, inter: usize) {
    let body = inter / 8 * 8;
    for (gu, o) in gate_up
        .chunks_exact(2 * inter)
        .zip(out.chunks_exact_mut(inter))
        .take(rows)
    {
        let (g, u) = (gu.as_ptr(), gu.as_ptr().add(inter));
        let op = o.as_mut_ptr();
        for i in (0..body).step_by(8) {
            let y = _mm256_mul_ps(
                x_sigmoid(_mm256_loadu_ps(g.add(i)), 1.0),
                _mm256_loadu_ps(u.add(i)),
            );
            _mm256_storeu_ps(op.add(i), y);
        }
        for i in body..inter {
            o[i] = crate::cpu::math::silu(gu[i]) * gu[inter + i];
        }
    }
}
