//! Portable activations: libm `expf`, the crate's polynomial `erf`.

use super::QUICK_GELU_SCALE;
use crate::cpu::math::{erf, silu};

pub(super) fn quick_gelu(xs: &mut [f32]) {
    for x in xs {
        *x /= 1.0 + (-QUICK_GELU_SCALE * *x).exp();
    }
}

pub(super) fn gelu_erf(xs: &mut [f32]) {
    for x in xs {
        *x = 0.5 * *x * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// `out = silu(gate) · up`, element-wise.
pub(super) fn silu_mul(gate: &[f32], up: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = silu(g) * u;
    }
}
