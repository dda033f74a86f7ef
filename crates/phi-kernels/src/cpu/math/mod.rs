//! Shared numerics for the element-wise kernels: `exp` and `erf` polynomials, horizontal sums and
//! weight-widening loads, once per instruction set (`avx2.rs`, `avx512.rs`; the scalar forms
//! are here). Every vector form evaluates the same polynomials, so the paths differ only by
//! rounding.
//!
//! - `exp`: Cephes `expf` (S. Moshier): `x = n·ln2 + r`, `|r| <= ln2/2`, `e^r` by a degree-5
//!   minimax polynomial, then scaled by `2^n`. Relative error about 1–2 ulp (~1.2e-7).
//! - `erf`: two Chebyshev fits made for this crate with `mpmath.chebyfit` (40 digits):
//!   `|x| < 1`: `erf(x) = x·A(x²)`, A of degree 6 (fit error 1.5e-9 relative);
//!   `1 <= |x| <= 4`: `erf(x) = 1 - e^{-x²}·B(|x| - 2.5)`, B of degree 11 fitting
//!   `erfc(x)·e^{x²}` (fit error 7e-8 relative on erfc, so < 1.2e-8 on erf);
//!   `|x| > 4`: `erf(x) = ±1` (`erfc(4)` = 1.5e-8 is below half an f32 ulp of 1).

// The fitted coefficients keep every printed digit (more than f32 holds): the literal rounds to
// the nearest f32 either way, and the full value documents the fit.
#![allow(clippy::excessive_precision)]
// The constants below are shared with the vector forms, which only exist on x86-64.
#![cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;

/// Cephes `expf` range reduction: ln 2 split in a part exact in f32 and a correction.
pub(crate) const LOG2E: f32 = std::f32::consts::LOG2_E;
pub(crate) const LN2_HI: f32 = 0.693_359_375;
pub(crate) const LN2_LO: f32 = -2.121_944_4e-4;
/// Cephes `expf` polynomial for `(e^r - 1 - r) / r²`, highest degree first.
pub(crate) const EXP_P: [f32; 6] = [
    1.987_569_15e-4,
    1.398_199_950_7e-3,
    8.333_451_907_3e-3,
    4.166_579_589_4e-2,
    1.666_666_545_9e-1,
    5.000_000_120_1e-1,
];

/// `erf(x) / x` as a polynomial in `x²` on `[0, 1]`, highest degree first.
pub(crate) const ERF_A: [f32; 7] = [
    7.875_875_062_685_488e-5,
    -8.016_864_287_165_87e-4,
    5.189_087_423_433_974e-3,
    -2.685_421_201_062_641e-2,
    1.128_359_471_516_021_8e-1,
    -3.761_262_666_672_033e-1,
    1.128_379_165_848_350_9,
];
/// `erfc(x)·e^{x²}` as a polynomial in `x - 2.5` on `[1, 4]`, highest degree first.
pub(crate) const ERF_B: [f32; 12] = [
    -4.123_142_820_307_557e-7,
    1.669_836_759_327_866_7e-6,
    -3.834_632_179_188_718e-6,
    1.436_468_237_334_064_8e-5,
    -5.932_730_341_120_816e-5,
    2.129_504_691_759_945_8e-4,
    -7.333_448_751_368_135e-4,
    2.465_999_634_278_243_7e-3,
    -8.001_617_248_247_285e-3,
    2.493_819_891_420_978_6e-2,
    -7.434_734_529_148_741e-2,
    2.108_063_577_431_363_9e-1,
];
pub(crate) const ERF_B_CENTER: f32 = 2.5;
pub(crate) const ERF_CLAMP: f32 = 4.0;

/// `erf` in f32 by the polynomials above (the scalar twin of the vector forms).
#[inline]
pub(crate) fn erf(x: f32) -> f32 {
    let ax = x.abs().min(ERF_CLAMP);
    let x2 = ax * ax;
    let r = if ax < 1.0 {
        ax * horner(x2, &ERF_A)
    } else {
        1.0 - (-x2).exp() * horner(ax - ERF_B_CENTER, &ERF_B)
    };
    r.copysign(x)
}

#[inline]
fn horner(x: f32, coeffs: &[f32]) -> f32 {
    coeffs.iter().fold(0.0, |acc, &c| acc * x + c)
}

/// `x / (1 + e^{-x})`.
#[inline]
pub(crate) fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// bf16 bits → f32: bf16 is the top half of an f32.
#[inline]
pub(crate) fn bf16_bits_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}
