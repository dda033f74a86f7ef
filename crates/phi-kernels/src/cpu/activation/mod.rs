//! Element-wise activations, in place over f32:
//! - `quick_gelu`: `x * sigmoid(1.702 x)` (CLIP's `quick_gelu`; 1.702 from Hendrycks & Gimpel).
//! - `gelu_erf`: `0.5 x (1 + erf(x / √2))` (`nn.GELU()` default, the projector's activation).
//! - `silu_mul`: `silu(gate) * up` over the two halves of a fused `gate_up` row (gate first).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;

use super::{check_isa, dispatch, for_elem_chunks, for_row_chunks};
use crate::{isa, Isa};

/// An element-wise activation that a GEMM applies to its output tiles (see
/// [`GemmOpts`](crate::cpu::gemm::GemmOpts)).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Activation {
    #[default]
    Identity,
    QuickGelu,
    GeluErf,
}

impl Activation {
    /// In place on one small piece (a GEMM tile row), on the calling thread.
    pub(crate) fn apply_with(self, isa: Isa, xs: &mut [f32]) {
        match self {
            Activation::Identity => {}
            Activation::QuickGelu => dispatch!(isa, quick_gelu(xs)),
            Activation::GeluErf => dispatch!(isa, gelu_erf(xs)),
        }
    }

    /// The `_ref` twin of [`Activation::apply_with`].
    pub fn apply_ref(self, xs: &mut [f32]) {
        match self {
            Activation::Identity => {}
            Activation::QuickGelu => quick_gelu_ref(xs),
            Activation::GeluErf => gelu_erf_ref(xs),
        }
    }
}

/// `1.702`: the sigmoid scale of QuickGELU (Hendrycks & Gimpel 2016, as in OpenAI CLIP).
pub(crate) const QUICK_GELU_SCALE: f32 = 1.702;

pub fn quick_gelu(xs: &mut [f32]) {
    quick_gelu_with(isa::active(), xs)
}

pub fn quick_gelu_with(isa: Isa, xs: &mut [f32]) {
    check_isa(isa);
    for_elem_chunks(xs, |xs| dispatch!(isa, quick_gelu(xs)));
}

pub fn quick_gelu_ref(xs: &mut [f32]) {
    for x in xs {
        let v = *x as f64;
        *x = (v / (1.0 + (-1.702 * v).exp())) as f32;
    }
}

pub fn gelu_erf(xs: &mut [f32]) {
    gelu_erf_with(isa::active(), xs)
}

pub fn gelu_erf_with(isa: Isa, xs: &mut [f32]) {
    check_isa(isa);
    for_elem_chunks(xs, |xs| dispatch!(isa, gelu_erf(xs)));
}

pub fn gelu_erf_ref(xs: &mut [f32]) {
    for x in xs {
        let v = *x as f64;
        *x = (0.5 * v * (1.0 + erf_f64(v / std::f64::consts::SQRT_2))) as f32;
    }
}

/// `gate_up` is `[rows, 2*inter]` (gate in columns `0..inter`, up in `inter..2*inter`);
/// `out` is `[rows, inter]`.
pub fn silu_mul(gate_up: &[f32], out: &mut [f32], rows: usize, inter: usize) {
    silu_mul_with(isa::active(), gate_up, out, rows, inter)
}

pub fn silu_mul_with(isa: Isa, gate_up: &[f32], out: &mut [f32], rows: usize, inter: usize) {
    check_isa(isa);
    assert!(
        gate_up.len() >= rows * 2 * inter,
        "silu_mul: gate_up shorter than [{rows}, 2*{inter}]"
    );
    assert!(
        out.len() >= rows * inter,
        "silu_mul: out shorter than [{rows}, {inter}]"
    );
    for_row_chunks(out, rows, inter, inter, |r0, out| {
        for (r, out) in out.chunks_mut(inter).enumerate() {
            let row = &gate_up[(r0 + r) * 2 * inter..(r0 + r + 1) * 2 * inter];
            let (gate, up) = row.split_at(inter);
            dispatch!(isa, silu_mul(gate, up, out))
        }
    });
}

/// `out = silu(gate) · up` over one row piece on the calling thread (a GEMM's fused SwiGLU
/// epilogue, see [`gemm_fused_with`](crate::cpu::gemm::gemm_fused_with)).
pub(crate) fn silu_mul_seq(isa: Isa, gate: &[f32], up: &[f32], out: &mut [f32]) {
    assert!(up.len() >= gate.len() && out.len() >= gate.len());
    dispatch!(isa, silu_mul(gate, up, out))
}

pub fn silu_mul_ref(gate_up: &[f32], out: &mut [f32], rows: usize, inter: usize) {
    for r in 0..rows {
        let row = &gate_up[r * 2 * inter..(r + 1) * 2 * inter];
        for i in 0..inter {
            let g = row[i] as f64;
            let u = row[inter + i] as f64;
            out[r * inter + i] = (g / (1.0 + (-g).exp()) * u) as f32;
        }
    }
}

/// erf in f64 to ~1e-15 (Abramowitz–Stegun 7.1.26 is too coarse for a reference; this is the
/// series / continued-fraction split used by many libms).
pub fn erf_f64(x: f64) -> f64 {
    let ax = x.abs();
    let r = if ax < 2.5 {
        // Maclaurin series: erf(x) = 2/√π Σ (-1)^n x^(2n+1) / (n! (2n+1))
        let mut sum = 0.0;
        let mut term = ax;
        let x2 = ax * ax;
        let mut n = 0.0;
        loop {
            let t = term / (2.0 * n + 1.0);
            sum += t;
            if t.abs() <= 1e-17 * sum.abs() {
                break;
            }
            n += 1.0;
            term *= -x2 / n;
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else {
        // erfc continued fraction (Lentz), converges fast for x >= 2.5.
        let x2 = ax * ax;
        let mut f = ax;
        let mut c = ax;
        let mut d = 0.0;
        for i in 1..200 {
            let a = i as f64 * 0.5;
            d = ax + a * d;
            d = if d == 0.0 { 1e-300 } else { 1.0 / d };
            c = ax + a / c;
            let delta = c * d;
            f *= delta;
            if (delta - 1.0).abs() < 1e-16 {
                break;
            }
        }
        1.0 - (-x2).exp() / (f * std::f64::consts::PI.sqrt())
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}
