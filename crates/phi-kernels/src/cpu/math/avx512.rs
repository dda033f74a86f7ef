//! AVX-512 forms of the shared numerics (16 f32 lanes). See `math/mod.rs` for the polynomials.

use std::arch::x86_64::*;

use half::{bf16, f16};

use super::{ERF_A, ERF_B, ERF_B_CENTER, ERF_CLAMP, EXP_P, LN2_HI, LN2_LO, LOG2E};

/// `e^x`, ~1 ulp. Inputs are clamped to `[-104, 88.7]`; `vscalefps` applies `2^n` with correct
/// underflow, so large negative inputs (masked scores, -inf) give 0 or a denormal, never NaN.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp(x: __m512) -> __m512 {
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(-104.0)),
        _mm512_set1_ps(88.7),
    );
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(EXP_P[0]);
    for &c in &EXP_P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    _mm512_scalef_ps(y, n)
}

/// `erf(x)`, |error| < 2e-7 (see `math/mod.rs`).
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn erf(x: __m512) -> __m512 {
    let ax = _mm512_min_ps(_mm512_abs_ps(x), _mm512_set1_ps(ERF_CLAMP));
    let x2 = _mm512_mul_ps(ax, ax);
    let mut a = _mm512_set1_ps(ERF_A[0]);
    for &c in &ERF_A[1..] {
        a = _mm512_fmadd_ps(a, x2, _mm512_set1_ps(c));
    }
    let small = _mm512_mul_ps(a, ax);
    let s = _mm512_sub_ps(ax, _mm512_set1_ps(ERF_B_CENTER));
    let mut b = _mm512_set1_ps(ERF_B[0]);
    for &c in &ERF_B[1..] {
        b = _mm512_fmadd_ps(b, s, _mm512_set1_ps(c));
    }
    let e = exp(_mm512_sub_ps(_mm512_setzero_ps(), x2));
    let large = _mm512_fnmadd_ps(e, b, _mm512_set1_ps(1.0));
    let is_small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(ax, _mm512_set1_ps(1.0));
    let r = _mm512_mask_blend_ps(is_small, large, small);
    let sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(i32::MIN));
    _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), sign))
}

/// Lanes `0..n` set, `n <= 16`.
#[inline]
pub(crate) fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xffff
    } else {
        ((1u32 << n) - 1) as __mmask16
    }
}

/// 16 bf16 values at `p` (lanes outside `mask` read as 0 and are not touched in memory).
///
/// # Safety
/// `p + i` must be readable for every lane `i` set in `mask`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn load_bf16(p: *const u16, mask: __mmask16) -> __m512 {
    let h = _mm256_maskz_loadu_epi16(mask, p as *const i16);
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
}

/// 16 f16 values at `p`, widened exactly (`vcvtph2ps`).
///
/// # Safety
/// As [`load_bf16`].
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn load_f16(p: *const u16, mask: __mmask16) -> __m512 {
    _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, p as *const i16))
}

/// Each lane rounded to the nearest bf16 (ties to even), kept as f32; a NaN stays a quiet NaN.
/// The vector form of `gemm::round_bf16`, bit for bit.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn round_bf16(x: __m512) -> __m512 {
    let b = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    let quiet = _mm512_or_si512(b, _mm512_set1_epi32(0x0040_0000));
    let r = _mm512_mask_mov_epi32(rounded, nan, quiet);
    _mm512_castsi512_ps(_mm512_and_si512(
        r,
        _mm512_set1_epi32(0xFFFF_0000_u32 as i32),
    ))
}

/// 16 f32 values at `p`, masked.
///
/// # Safety
/// As [`load_bf16`].
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn load_f32(p: *const f32, mask: __mmask16) -> __m512 {
    _mm512_maskz_loadu_ps(mask, p)
}

/// Widens `len` weights starting at element `start` of `w` into `out[..len]`.
///
/// # Safety
/// `start + len <= w.len()` and `len <= out.len()` (checked by the callers' shape asserts).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn widen(w: crate::Weight<'_>, start: usize, len: usize, out: &mut [f32]) {
    debug_assert!(start + len <= w.len() && len <= out.len());
    let o = out.as_mut_ptr();
    match w {
        crate::Weight::F32(s) => std::ptr::copy_nonoverlapping(s.as_ptr().add(start), o, len),
        crate::Weight::Bf16(s) => {
            let p = s.as_ptr().add(start) as *const u16;
            let mut i = 0;
            while i < len {
                let m = mask16(len - i);
                _mm512_mask_storeu_ps(o.add(i), m, load_bf16(p.add(i), m));
                i += 16;
            }
        }
        crate::Weight::F16(s) => {
            let p = s.as_ptr().add(start) as *const u16;
            let mut i = 0;
            while i < len {
                let m = mask16(len - i);
                _mm512_mask_storeu_ps(o.add(i), m, load_f16(p.add(i), m));
                i += 16;
            }
        }
    }
}

/// An element type (f32, or bf16/f16 widened exactly) that loads as 16 f32 lanes: weights
/// for the GEMV and GEMM packing, a KV cache for decode attention.
pub(crate) trait Lanes16: Copy {
    /// # Safety
    /// Lanes set in `mask` must be readable at `p`.
    unsafe fn load16(p: *const Self, mask: __mmask16) -> __m512;
}

impl Lanes16 for f32 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const f32, mask: __mmask16) -> __m512 {
        load_f32(p, mask)
    }
}

impl Lanes16 for bf16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const bf16, mask: __mmask16) -> __m512 {
        load_bf16(p as *const u16, mask)
    }
}

impl Lanes16 for f16 {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const f16, mask: __mmask16) -> __m512 {
        load_f16(p as *const u16, mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector rounding against `half`'s (the oracle of every bf16 path), bit for bit, over
    /// the special values and a spread of bit patterns (ties, subnormals, NaN payloads).
    #[test]
    fn round_bf16_matches_half_bit_for_bit() {
        if !crate::Isa::Avx512.is_supported() {
            eprintln!("SKIPPED: no AVX-512 here");
            return;
        }
        let mut bits: Vec<u32> = vec![
            0,
            0x8000_0000,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0000,
            0x7F80_0001,
            0xFF81_2345,
            0x3F80_8000,
            0x3F81_8000,
            0x0000_8000,
            0x0001_7FFF,
            0x7F7F_FFFF,
        ];
        let mut x = 0x1234_5678u32;
        bits.extend((0..1 << 16).map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        }));
        for chunk in bits.chunks(16) {
            let mut lanes = [0f32; 16];
            for (l, &b) in lanes.iter_mut().zip(chunk) {
                *l = f32::from_bits(b);
            }
            let mut got = [0f32; 16];
            // SAFETY: AVX-512 checked above; both arrays hold 16 floats.
            unsafe {
                _mm512_storeu_ps(
                    got.as_mut_ptr(),
                    round_bf16(_mm512_loadu_ps(lanes.as_ptr())),
                )
            };
            for (g, l) in got.iter().zip(&lanes) {
                let want = half::bf16::from_f32(*l).to_f32();
                assert_eq!(
                    g.to_bits(),
                    want.to_bits(),
                    "round_bf16({:#010x})",
                    l.to_bits()
                );
            }
        }
    }
}
