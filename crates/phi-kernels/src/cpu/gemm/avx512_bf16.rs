//! AVX512-BF16 GEMM (`vdpbf16ps`, Cooper Lake, Sapphire Rapids, Zen 4): the 14×32 tile of the
//! f32 kernel over bf16 pair panels (see [`super::bf16_pairs`]), so each instruction does two k
//! steps: twice the f32 FMA rate per register tile. Packing is the twin's; only the inner loop
//! and the use of the hardware differ, and [`super::bf16_pairs::hardware_kernel_ok`] compares
//! the two once per process before this path is taken.
//!
//! Not run on the dev VM (Skylake-SP has no AVX512-BF16): verified there only through the twin
//! and by compilation.

use std::arch::x86_64::*;

use super::avx512::store_tile;
use super::bf16_pairs::{pack_a_pairs, pack_b_pairs, MR, NR};
use super::{Microkernel, KC};
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
        pack_a_pairs(a, lda, i0, rows, k, d)
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
        pack_b_pairs(b, k, j0, nc, p0, kc, kc.div_ceil(2), out)
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
