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

pub(super) fn silu_mul(gate_up: &[f32], out: &mut [f32], rows: usize, inter: usize) {
    for (gu, o) in gate_up
        .chunks_exact(2 * inter)
        .zip(out.chunks_exact_mut(inter))
        .take(rows)
    {
        let (g, u) = gu.split_at(inter);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = silu(g) * u;
        }
    }
}
