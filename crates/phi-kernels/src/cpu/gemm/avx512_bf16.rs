//! AVX512-BF16 GEMM (`vdpbf16ps`, Cooper Lake, Sapphire Rapids, Zen 4): the 14×32 tile of the
//! f32 kernel over bf16 pair panels (see [`super::bf16_pairs`]), so each instruction does two k
//! steps: twice the f32 FMA rate per register tile. Packing is the twin's; only the inner loop
//! and the use of the hardware differ, and [`super::bf16_pairs::hardware_kernel_ok`] compares
//! the two once per process before this path is taken.
//!
//! The dev VM (Skylake-SP) has no AVX512-BF16; the kernel ran and passed the GEMM tests on the
//! GPU machine's host CPU (through the device bundle), at 86-96% of its `dpbf16_2t` probe on
//! two threads at the CLIP and prefill shapes. Its packers (shared with AMX) are the AVX-512
//! ones below, tested word for word against the scalar packers of the twin.

use std::arch::x86_64::*;

use half::bf16;

use super::avx512::{store_tile, transpose16};
use super::bf16_pairs::{MR, NR};
use super::{Microkernel, KC};
use crate::cpu::math::avx512::{load_f32, mask16, round_bf16};
use crate::{Isa, Weight};

pub(super) struct Avx512Bf16;

impl Microkernel for Avx512Bf16 {
    const ISA: Isa = Isa::Avx512;
    const MR: usize = MR;
    const NR: usize = NR;
    const K_PER_WORD: usize = 2;

    #[inline]
    unsafe fn kernel(
        kc: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        load_c: bool,
        bias: Option<&[f32]>,
    ) {
        kernel_14x32_bf16(
            kc,
            ap as *const u32,
            bp as *const u32,
            c,
            ldc,
            mr,
            nr,
            load_c,
            bias,
        )
    }

    fn pack_a(a: &[f32], lda: usize, i0: usize, rows: usize, k: usize, _: bool, d: &mut [f32]) {
        debug_assert!(rows <= MR && d.len() >= MR * k.div_ceil(2));
        debug_assert!(rows == 0 || a.len() >= (i0 + rows - 1) * lda + k);
        // SAFETY: this kernel runs only where AVX512-BF16 (hence AVX-512 F/BW) is present; the
        // rows lie inside `a` and `d` holds the panel (asserted above).
        unsafe { pack_a_pairs_t(a.as_ptr().wrapping_add(i0 * lda), lda, rows, k, d) }
    }

    unsafe fn pack_b(
        b: Weight<'_>,
        _n: usize,
        k: usize,
        j0: usize,
        nc: usize,
        p0: usize,
        kc: usize,
        out: &mut [f32],
    ) {
        debug_assert!(kc <= KC);
        pack_b_pairs_t(b, k, j0, nc, p0, kc, kc.div_ceil(2), out)
    }

    unsafe fn gemv(
        a: &[f32],
        lda: usize,
        m: usize,
        b: Weight<'_>,
        k: usize,
        j0: usize,
        nj: usize,
        out: &mut [f32],
    ) {
        // Decode is bound by the weight stream, not the multiplies: the f32 GEMV serves.
        super::avx512::Avx512::gemv(a, lda, m, b, k, j0, nj, out)
    }
}

/// 32 f32 values from `src` (`left` of them real, the rest read as 0), rounded to bf16 and
/// packed as 16 pair words: word `w` holds value `2w` in its low half and `2w + 1` in its high
/// half, as [`super::bf16_pairs`] lays pairs out.
///
/// # Safety
/// The CPU has AVX-512 F/BW; `src` is readable for `min(left, 32)` values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn pairs16(src: *const f32, left: usize) -> __m512i {
    let lo = round_bf16(load_f32(src, mask16(left)));
    let hi = round_bf16(load_f32(
        src.wrapping_add(16),
        mask16(left.saturating_sub(16)),
    ));
    // Each lane's bf16 is its top half: shift it down and narrow to 16 words per vector.
    let lo = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(_mm512_castps_si512(lo)));
    let hi = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(_mm512_castps_si512(hi)));
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi)
}

/// [`super::bf16_pairs::pack_a_pairs`] by 16×16 word transposes (same panel, word for word):
/// `rows` rows of A from `src` (rows `lda` apart, `k` values each) into `dst [ceil(k/2)][MR]`.
///
/// # Safety
/// The CPU has AVX-512 F/BW; `src` holds `rows` rows of `k` values, `dst` `MR·ceil(k/2)` words.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn pack_a_pairs_t(
    src: *const f32,
    lda: usize,
    rows: usize,
    k: usize,
    dst: &mut [f32],
) {
    let kw = k.div_ceil(2);
    let out = dst.as_mut_ptr();
    let row_lanes = mask16(MR);
    for p2 in (0..kw).step_by(16) {
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, v) in r.iter_mut().enumerate().take(rows) {
            *v = _mm512_castsi512_ps(pairs16(src.add(i * lda + 2 * p2), k - 2 * p2));
        }
        let t = transpose16(r);
        for (dp, v) in t.iter().enumerate().take((kw - p2).min(16)) {
            _mm512_mask_storeu_ps(out.add((p2 + dp) * MR), row_lanes, *v);
        }
    }
}

/// [`super::bf16_pairs::pack_b_pairs`] by 16×16 word transposes (same panels, word for word):
/// a pair of consecutive bf16 in a row of B already is one word, so 16 rows × 16 words are
/// loaded, transposed and stored as 16 aligned half-rows of the panel. The scalar packer took
/// most of the AMX GEMM's time on a Sapphire Rapids host (4-10% of the AMX peak).
///
/// # Safety
/// The CPU has AVX-512 F/BW; as `pack_b_pairs`, and `out` is 64-byte aligned.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn pack_b_pairs_t(
    b: Weight<'_>,
    k: usize,
    j0: usize,
    nc: usize,
    p0: usize,
    kc: usize,
    kw: usize,
    out: &mut [f32],
) {
    debug_assert!(kw >= kc.div_ceil(2) && out.len() >= nc.div_ceil(NR) * NR * kw);
    let Weight::Bf16(b) = b else {
        unreachable!("bf16 pair panels are packed from bf16 weights only")
    };
    debug_assert!(j0 + nc <= b.len() / k.max(1) && p0 + kc <= k);
    pack_b_pairs_words(b.as_ptr(), k, j0, nc, p0, kc, kw, out.as_mut_ptr())
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_b_pairs_words(
    b: *const bf16,
    k: usize,
    j0: usize,
    nc: usize,
    p0: usize,
    kc: usize,
    kw: usize,
    out: *mut f32,
) {
    for q in 0..nc.div_ceil(NR) {
        let panel = out.add(q * NR * kw);
        for half in [0, 16] {
            let col0 = q * NR + half;
            let rows = nc.saturating_sub(col0).min(16);
            for p2 in (0..kw).step_by(16) {
                // bf16 values of this 16-word step still inside the slice (0 past it: the
                // padded words, and the high half of an odd k's last pair, are zero).
                let left = kc.saturating_sub(2 * p2).min(32);
                let mask = (((1u64 << left) - 1) & 0xFFFF_FFFF) as __mmask32;
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, v) in r.iter_mut().enumerate().take(rows) {
                    let row = b.wrapping_add((j0 + col0 + i) * k + p0 + 2 * p2);
                    *v = _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, row as *const i16));
                }
                let t = transpose16(r);
                for (dp, v) in t.iter().enumerate().take((kw - p2).min(16)) {
                    _mm512_store_ps(panel.add((p2 + dp) * NR + half), *v);
                }
            }
        }
    }
}

/// One `MR×32` tile over `kc` k values (`ceil(kc/2)` pair words per row/column).
///
/// # Safety
/// As [`Microkernel::kernel`], with pair panels; the CPU has AVX512-BF16.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn kernel_14x32_bf16(
    kc: usize,
    ap: *const u32,
    bp: *const u32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    load_c: bool,
    bias: Option<&[f32]>,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p2 in 0..kc.div_ceil(2) {
        let b = bp.add(p2 * NR);
        let b0: __m512bh = std::mem::transmute(_mm512_load_si512(b as *const __m512i));
        let b1: __m512bh = std::mem::transmute(_mm512_load_si512(b.add(16) as *const __m512i));
        let a = ap.add(p2 * MR);
        for (i, row) in acc.iter_mut().enumerate() {
            let ai: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(i) as i32));
            row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
            row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
        }
    }
    store_tile(&acc, c, ldc, mr, nr, load_c, bias)
}

/// `iters` rounds of 12 independent `vdpbf16ps` chains on registers (as the FMA probe), the
/// AVX512-BF16 peak probe; returns the FLOPs done (16 lanes × 2 pairs × 2 per instruction).
///
/// # Safety
/// The CPU has AVX512-BF16.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn peak_loop(iters: u64) -> f64 {
    let mut acc = [_mm512_setzero_ps(); 12];
    // bf16 pairs (1.0, 1.0) and (2^-24, 2^-24): the sums grow slowly and stay finite.
    let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3F80_3F80));
    let y: __m512bh = std::mem::transmute(_mm512_set1_epi32(0x3380_3380));
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm512_dpbf16_ps(*a, x, y);
        }
    }
    std::hint::black_box(&acc);
    (iters * 12 * 64) as f64
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::aligned;
    use super::super::bf16_pairs::{pack_a_pairs, pack_b_pairs};
    use super::*;

    /// Room for a 64-byte aligned buffer of `n` floats (take it with `gemm::aligned`: the B
    /// packers store whole aligned lines), filled with a NaN pattern so that a word the packer
    /// fails to write shows.
    pub(in crate::cpu::gemm) fn poisoned(n: usize) -> Vec<f32> {
        vec![f32::from_bits(0x7FC0_DEAD); n + 16]
    }

    pub(in crate::cpu::gemm) fn bits(xs: &[f32]) -> Vec<u32> {
        xs.iter().map(|x| x.to_bits()).collect()
    }

    /// Values with ties, NaN-free but awkward for rounding (odd mantissas past bf16's).
    pub(in crate::cpu::gemm) fn awkward(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                f32::from_bits(0x3E00_0000 + (x & 0x01FF_FFFF))
                    * if x & 1 == 0 { 1.0 } else { -1.0 }
            })
            .collect()
    }

    #[test]
    fn vector_pair_packers_match_the_scalar_ones() {
        if !Isa::Avx512.is_supported() {
            eprintln!("SKIPPED: no AVX-512 here");
            return;
        }
        let b_cases: [(usize, usize, usize, usize, usize, usize, bool); 5] = [
            (70, 77, 3, 67, 0, 77, false),
            (64, 2048, 0, 64, 1024, 1024, false),
            (40, 301, 5, 33, 256, 45, true),
            (33, 33, 0, 33, 0, 33, true),
            (32, 2, 0, 32, 0, 2, true),
        ];
        for (n, k, j0, nc, p0, kc, pad) in b_cases {
            let b: Vec<bf16> = awkward(n * k, 7).into_iter().map(bf16::from_f32).collect();
            // AMX pads each slice to whole 32-value tile rows; the dpbf16 kernel does not.
            let kw = if pad {
                kc.next_multiple_of(32) / 2
            } else {
                kc.div_ceil(2)
            };
            let len = nc.div_ceil(NR) * NR * kw;
            let (mut want, mut got) = (poisoned(len), poisoned(len));
            let (want, got) = (aligned(&mut want, len), aligned(&mut got, len));
            pack_b_pairs(Weight::Bf16(&b), k, j0, nc, p0, kc, kw, want);
            // SAFETY: AVX-512 checked above; the buffer is aligned and holds the panels.
            unsafe { pack_b_pairs_t(Weight::Bf16(&b), k, j0, nc, p0, kc, kw, got) };
            assert_eq!(
                bits(got),
                bits(want),
                "B n {n} k {k} j0 {j0} nc {nc} p0 {p0} kc {kc}"
            );
        }
        let a_cases: [(usize, usize, usize); 5] = [
            (14, 77, 80),
            (5, 1024, 1024),
            (1, 1, 1),
            (13, 33, 40),
            (0, 16, 16),
        ];
        for (rows, k, lda) in a_cases {
            let a = awkward(rows.max(1) * lda, 11);
            let len = MR * k.div_ceil(2);
            let (mut want, mut got) = (poisoned(len), poisoned(len));
            let (want, got) = (aligned(&mut want, len), aligned(&mut got, len));
            pack_a_pairs(&a, lda, 0, rows, k, want);
            // SAFETY: AVX-512 checked above; `a` holds the rows, the buffer the panel.
            unsafe { pack_a_pairs_t(a.as_ptr(), lda, rows, k, got) };
            assert_eq!(bits(got), bits(want), "A rows {rows} k {k}");
        }
    }
}
