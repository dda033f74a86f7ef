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

/// `out = silu(gate) · up`, element-wise. The tail goes through the same vector code (masked
/// loads and stores), so each element's result does not depend on where it sits: a GEMM tile's
/// fused SwiGLU matches this pass over the whole row bit for bit. Whole vectors use plain
/// loads and stores (`vmaskmovps` stores are slow on AMD Zen).
///
/// # Safety
/// The CPU supports AVX2+FMA; `up` and `out` are at least as long as `gate`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = gate.len();
    debug_assert!(up.len() >= n && out.len() >= n);
    let (g, u, o) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
    let body = n / 8 * 8;
    for i in (0..body).step_by(8) {
        let y = _mm256_mul_ps(
            x_sigmoid(_mm256_loadu_ps(g.add(i)), 1.0),
            _mm256_loadu_ps(u.add(i)),
        );
        _mm256_storeu_ps(o.add(i), y);
    }
    if body < n {
        let m = tail_mask(n - body);
        let y = _mm256_mul_ps(
            x_sigmoid(_mm256_maskload_ps(g.add(body), m), 1.0),
            _mm256_maskload_ps(u.add(body), m),
        );
        _mm256_maskstore_ps(o.add(body), m, y);
    }
}

/// Lanes `0..min(left, 8)` set, as `_mm256_maskload_ps` reads a mask.
#[inline(always)]
unsafe fn tail_mask(left: usize) -> __m256i {
    let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _mm256_cmpgt_epi32(_mm256_set1_epi32(left.min(8) as i32), idx)
}
