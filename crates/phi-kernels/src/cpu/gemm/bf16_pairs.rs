//! bf16 products on bf16 hardware: panels of bf16 *pairs*, the layout of AVX512-BF16's
//! `vdpbf16ps` (each 32-bit lane holds two consecutive k values, and one instruction does
//! `acc += a.hi·b.hi + a.lo·b.lo` per lane, twice the f32 FMA rate).
//!
//! Packed A: per `MR`-row panel, `[ceil(k/2)][MR]` words, word `(p2, i)` = the pair
//! `(a[i, 2·p2], a[i, 2·p2 + 1])` rounded to bf16 (a zero pads an odd k). Packed B: per
//! `NR`-column panel, `[ceil(kc/2)][NR]` words of `(b[j, p0 + 2·p2], b[j, p0 + 2·p2 + 1])`.
//! [`KC`] is even, so the pairs of a slice never straddle two slices.
//!
//! [`PairsEmu`] is the plain twin: the same packers and the same instruction semantics in scalar
//! code. It runs everywhere, so the layout and the driver are tested on any CPU; the hardware
//! kernel ([`super::avx512_bf16`]) only swaps the inner loop, and is checked against the twin
//! once per process before it is used ([`hardware_kernel_ok`]).

use half::bf16;

use super::{gemm_blocked, ARows, GemmOpts, Microkernel, KC};
use crate::{Isa, Weight};

/// The register tile of the hardware kernel (the f32 AVX-512 kernel's, whose store it shares),
/// kept by the twin so both use one layout.
pub(super) const MR: usize = 14;
pub(super) const NR: usize = 32;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(MR == super::avx512::MR && NR == super::avx512::NR);

/// The pair of bf16 values `(lo, hi)` as one word (lo in the low half, as x86 loads it).
#[inline]
fn pair(lo: f32, hi: f32) -> u32 {
    bf16::from_f32(lo).to_bits() as u32 | (bf16::from_f32(hi).to_bits() as u32) << 16
}

/// Packs rows `i0..i0+rows` of A into one pair panel `dst [ceil(k/2)][MR]` (words stored in f32
/// slots). A is rounded to bf16 here, whatever `round` says: pairs are bf16 by definition.
pub(super) fn pack_a_pairs(
    a: &[f32],
    lda: usize,
    i0: usize,
    rows: usize,
    k: usize,
    dst: &mut [f32],
) {
    let words: &mut [u32] = bytemuck::cast_slice_mut(dst);
    for (p2, d) in words.chunks_exact_mut(MR).enumerate() {
        for (i, w) in d.iter_mut().enumerate() {
            *w = if i < rows {
                let row = &a[(i0 + i) * lda..(i0 + i) * lda + k];
                let hi = row.get(2 * p2 + 1).copied().unwrap_or(0.0);
                pair(row[2 * p2], hi)
            } else {
                0
            };
        }
    }
}

/// Packs rows `j0..j0+nc`, k values `p0..p0+kc` of bf16 `b [n, k]` into pair panels of
/// `[kw][NR]` words (`kw >= ceil(kc/2)`; rows past the data, and columns past `nc`, are zero).
/// The drivers hand the pair kernels bf16 weights only (others are rounded first).
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_b_pairs(
    b: Weight<'_>,
    k: usize,
    j0: usize,
    nc: usize,
    p0: usize,
    kc: usize,
    kw: usize,
    out: &mut [f32],
) {
    debug_assert!(kw >= kc.div_ceil(2));
    let Weight::Bf16(b) = b else {
        unreachable!("bf16 pair panels are packed from bf16 weights only")
    };
    let words: &mut [u32] = bytemuck::cast_slice_mut(&mut out[..nc.div_ceil(NR) * NR * kw]);
    for (q, panel) in words.chunks_exact_mut(NR * kw).enumerate() {
        for jj in 0..NR {
            let col = q * NR + jj;
            let row: &[bf16] = if col < nc {
                &b[(j0 + col) * k + p0..(j0 + col) * k + p0 + kc]
            } else {
                &[]
            };
            for p2 in 0..kw {
                let lo = row.get(2 * p2).map_or(0, |v| v.to_bits() as u32);
                let hi = row.get(2 * p2 + 1).map_or(0, |v| v.to_bits() as u32);
                panel[p2 * NR + jj] = lo | hi << 16;
            }
        }
    }
}

/// `vdpbf16ps` on one lane: `acc + a.hi·b.hi + a.lo·b.lo`, each product exact in f32 (8-bit
/// significands) and each sum rounded, odd element first, as Intel's pseudocode orders it.
#[inline]
pub(super) fn dot_pair(acc: f32, a: u32, b: u32) -> f32 {
    let lo = |w: u32| f32::from_bits(w << 16);
    let hi = |w: u32| f32::from_bits(w & 0xFFFF_0000);
    let t = acc + hi(a) * hi(b);
    t + lo(a) * lo(b)
}

/// The scalar twin of the hardware pair kernel (same packers, same per-lane semantics).
pub(super) struct PairsEmu;

impl Microkernel for PairsEmu {
    const ISA: Isa = Isa::Scalar;
    const MR: usize = MR;
    const NR: usize = NR;
    const K_PER_WORD: usize = 2;

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
        let kw = kc.div_ceil(2);
        let (ap, bp) = (ap as *const u32, bp as *const u32);
        let mut acc = [[0f32; NR]; MR];
        for p2 in 0..kw {
            for (i, row) in acc.iter_mut().enumerate() {
                let a = *ap.add(p2 * MR + i);
                for (j, v) in row.iter_mut().enumerate() {
                    *v = dot_pair(*v, a, *bp.add(p2 * NR + j));
                }
            }
        }
        for (i, row) in acc.iter().enumerate().take(mr) {
            for (j, &v) in row.iter().enumerate().take(nr) {
                let dst = c.add(i * ldc + j);
                let mut r = v + bias.map_or(0.0, |bs| bs[j]);
                if load_c {
                    r += *dst;
                }
                *dst = r;
            }
        }
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
        debug_assert!(kc <= KC && kc.is_multiple_of(2) || p0 + kc == k);
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
        super::scalar::Scalar::gemv(a, lda, m, b, k, j0, nj, out)
    }
}

/// Runs a small GEMM with awkward edges (odd k over two KC slices, partial tiles, bias) on the
/// hardware kernel `Hw` and on its scalar twin `Twin`, and says whether they agree.
pub(super) fn agrees_with_twin<Hw: Microkernel, Twin: Microkernel>() -> bool {
    let (m, n, k) = (37, 70, KC + 45);
    let a: Vec<f32> = (0..m * k)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
        .collect();
    let b: Vec<bf16> = (0..n * k)
        .map(|i| bf16::from_f32(((i * 53 % 97) as f32 - 48.0) / 24.0))
        .collect();
    let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.125).collect();
    let opts = GemmOpts {
        bias: Some(&bias),
        precision: crate::DType::BF16,
        ..GemmOpts::default()
    };
    let mut want = vec![f32::NAN; m * n];
    let mut got = vec![f32::NAN; m * n];
    let a = ARows::dense(&a, k);
    gemm_blocked::<Twin>(a, Weight::Bf16(&b), &mut want, n, m, n, k, &opts, None);
    gemm_blocked::<Hw>(a, Weight::Bf16(&b), &mut got, n, m, n, k, &opts, None);
    got.iter()
        .zip(&want)
        .all(|(g, w)| (g - w).abs() <= 1e-4 * (1.0 + w.abs()))
}

/// Whether this CPU runs `vdpbf16ps` *and* the hardware kernel agrees with [`PairsEmu`]
/// (checked once per process; a mismatch disables the path with a warning instead of returning
/// wrong numbers). `PHI_KERNELS_BF16_DOT=0` turns it off.
pub(super) fn hardware_kernel_ok() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            if std::env::var("PHI_KERNELS_BF16_DOT").as_deref() == Ok("0")
                || !Isa::Avx512.is_supported()
                || !is_x86_feature_detected!("avx512bf16")
            {
                return false;
            }
            let ok = agrees_with_twin::<super::avx512_bf16::Avx512Bf16, PairsEmu>();
            if !ok {
                eprintln!(
                    "phi-kernels: the AVX512-BF16 GEMM kernel disagrees with its scalar twin on \
                     this CPU; bf16 products fall back to the f32 kernels"
                );
            }
            ok
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
