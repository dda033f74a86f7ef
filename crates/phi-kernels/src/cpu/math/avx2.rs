//! AVX2 + FMA forms of the shared numerics (8 f32 lanes). See `math/mod.rs` for the polynomials.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::{ERF_A, ERF_B, ERF_B_CENTER, ERF_CLAMP, EXP_P, LN2_HI, LN2_LO, LOG2E};

/// `e^x`, ~1 ulp on `[-87.3, 88.3]`. Inputs are clamped to that range because `2^n` is built
/// in the exponent bits, which only hold normal numbers: below -87.3 the result is ~1e-38
/// instead of 0 (callers that need exact zeros, like masked attention scores, select them).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn exp(x: __m256) -> __m256 {
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(-87.3)),
        _mm256_set1_ps(88.3),
    );
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(LOG2E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
    let mut p = _mm256_set1_ps(EXP_P[0]);
    for &c in &EXP_P[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    }
    let r2 = _mm256_mul_ps(r, r);
    let y = _mm256_add_ps(_mm256_fmadd_ps(p, r2, r), _mm256_set1_ps(1.0));
    let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
        _mm256_cvtps_epi32(n),
        _mm256_set1_epi32(127),
    ));
    _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
}

/// `erf(x)`, |error| < 2e-7 (see `math/mod.rs`).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn erf(x: __m256) -> __m256 {
    let sign_bit = _mm256_set1_ps(-0.0);
    let ax = _mm256_min_ps(_mm256_andnot_ps(sign_bit, x), _mm256_set1_ps(ERF_CLAMP));
    let x2 = _mm256_mul_ps(ax, ax);
    let mut a = _mm256_set1_ps(ERF_A[0]);
    for &c in &ERF_A[1..] {
        a = _mm256_fmadd_ps(a, x2, _mm256_set1_ps(c));
    }
    let small = _mm256_mul_ps(a, ax);
    let s = _mm256_sub_ps(ax, _mm256_set1_ps(ERF_B_CENTER));
    let mut b = _mm256_set1_ps(ERF_B[0]);
    for &c in &ERF_B[1..] {
        b = _mm256_fmadd_ps(b, s, _mm256_set1_ps(c));
    }
    let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), x2));
    let large = _mm256_fnmadd_ps(e, b, _mm256_set1_ps(1.0));
    let is_small = _mm256_cmp_ps::<_CMP_LT_OQ>(ax, _mm256_set1_ps(1.0));
    let r = _mm256_blendv_ps(large, small, is_small);
    _mm256_or_ps(r, _mm256_and_ps(x, sign_bit))
}

/// Sum of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Max of the 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) fn hmax(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_max_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// 8 bf16 values at `p`.
///
/// # Safety
/// `p..p+8` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn load_bf16(p: *const u16) -> __m256 {
    let h = _mm_loadu_si128(p as *const __m128i);
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
}

/// 8 f16 values at `p` (`vcvtph2ps`; F16C ships with every AVX2 CPU, but is checked by the
/// caller through [`has_f16c`]).
///
/// # Safety
/// `p..p+8` must be readable and the CPU must have F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load_f16(p: *const u16) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
}

/// A weight element type that loads as 8 widened f32 lanes.
pub(crate) trait Lanes8: Copy {
    /// # Safety
    /// `p..p+8` readable, and the CPU has what the type needs (F16C for f16).
    unsafe fn load8(p: *const Self) -> __m256;
    fn to_f32(self) -> f32;
}

impl Lanes8 for f32 {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Lanes8 for bf16 {
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const bf16) -> __m256 {
        load_bf16(p as *const u16)
    }
    fn to_f32(self) -> f32 {
        super::bf16_bits_to_f32(self.to_bits())
    }
}

impl Lanes8 for f16 {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f16) -> __m256 {
        load_f16(p as *const u16)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Whether F16C is present (`Isa::Avx2` only promises AVX2 and FMA).
#[inline]
pub(crate) fn has_f16c() -> bool {
    is_x86_feature_detected!("f16c")
}

/// Widens `len` weights starting at element `start` of `w` into `out[..len]`.
///
/// # Safety
/// `start + len <= w.len()` and `len <= out.len()`.
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn widen(w: crate::Weight<'_>, start: usize, len: usize, out: &mut [f32]) {
    debug_assert!(start + len <= w.len() && len <= out.len());
    let o = out.as_mut_ptr();
    let body = len / 8 * 8;
    match w {
        crate::Weight::F32(s) => std::ptr::copy_nonoverlapping(s.as_ptr().add(start), o, len),
        crate::Weight::Bf16(s) => {
            let p = s.as_ptr().add(start) as *const u16;
            for i in (0..body).step_by(8) {
                _mm256_storeu_ps(o.add(i), load_bf16(p.add(i)));
            }
            for i in body..len {
                *o.add(i) = super::bf16_bits_to_f32(*p.add(i));
            }
        }
        crate::Weight::F16(s) => {
            let p = s.as_ptr().add(start) as *const u16;
            let mut i = 0;
            if has_f16c() {
                while i < body {
                    // SAFETY: F16C was just detected.
                    _mm256_storeu_ps(o.add(i), load_f16(p.add(i)));
                    i += 8;
                }
            }
            for j in i..len {
                *o.add(j) = s[start + j].to_f32();
            }
        }
    }
}
