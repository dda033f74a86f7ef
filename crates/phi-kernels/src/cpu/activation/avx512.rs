//! AVX-512 activations: 16 lanes, masked tails, polynomial `exp`/`erf` from `cpu/math`.

use std::arch::x86_64::*;

use super::QUICK_GELU_SCALE;
use crate::cpu::math::avx512::{erf, exp, mask16};

/// `x / (1 + e^{-s·x})`: at large |x| the clamped `exp` keeps the quotient finite (x or ~0).
#[inline]
#[target_feature(enable = "avx512f")]
fn x_sigmoid(x: __m512, s: f32) -> __m512 {
    let e = exp(_mm512_mul_ps(x, _mm512_set1_ps(-s)));
    _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e))
}

/// # Safety
/// The CPU supports AVX-512F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn quick_gelu(xs: &mut [f32]) {
    let (p, n) = (xs.as_mut_ptr(), xs.len());
    let mut i = 0;
    while i < n {
        let m = mask16(n - i);
        _mm512_mask_storeu_ps(
            p.add(i),
            m,
            x_sigmoid(_mm512_maskz_loadu_ps(m, p.add(i)), QUICK_GELU_SCALE),
        );
        i += 16;
    }
}

/// # Safety
/// The CPU supports AVX-512F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn gelu_erf(xs: &mut [f32]) {
    let (p, n) = (xs.as_mut_ptr(), xs.len());
    let (half, one, rsqrt2) = (
        _mm512_set1_ps(0.5),
        _mm512_set1_ps(1.0),
        _mm512_set1_ps(std::f32::consts::FRAC_1_SQRT_2),
    );
    let mut i = 0;
    while i < n {
        let m = mask16(n - i);
        let x = _mm512_maskz_loadu_ps(m, p.add(i));
        let y = _mm512_mul_ps(
            _mm512_mul_ps(half, x),
            _mm512_add_ps(one, erf(_mm512_mul_ps(x, rsqrt2))),
        );
        _mm512_mask_storeu_ps(p.add(i), m, y);
        i += 16;
    }
}

/// `out = silu(gate) · up`, element-wise.
///
/// # Safety
/// The CPU supports AVX-512F/BW/VL; `up` and `out` are at least as long as `gate`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    let n = gate.len();
    debug_assert!(up.len() >= n && out.len() >= n);
    let (g, u, o) = (gate.as_ptr(), up.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i < n {
        let m = mask16(n - i);
        let y = _mm512_mul_ps(
            x_sigmoid(_mm512_maskz_loadu_ps(m, g.add(i)), 1.0),
            _mm512_maskz_loadu_ps(m, u.add(i)),
        );
        _mm512_mask_storeu_ps(o.add(i), m, y);
        i += 16;
    }
}
