//! AVX2 + FMA GEMM: a 6×16 microkernel (12 ymm accumulators, 2 B loads and 6 broadcasts per k
//! step), edge tiles through a stack buffer, and a GEMV that widens bf16/f16 in registers.

use std::arch::x86_64::*;

use super::{gemm_blocked, pack_b_rows, prefetch_rows, ARows, GemmOpts, Glu, Microkernel, KC};
use crate::cpu::math::avx2::{has_f16c, hsum, widen, Lanes8};
use crate::{Isa, Weight};

const MR: usize = 6;
const NR: usize = 16;

pub(super) struct Avx2;

impl Microkernel for Avx2 {
    const ISA: Isa = Isa::Avx2;
    const MR: usize = MR;
    const NR: usize = NR;

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
        kernel_6x16(kc, ap, bp, c, ldc, mr, nr, load_c, bias)
    }

    fn pack_a(
        a: &[f32],
        lda: usize,
        i0: usize,
        rows: usize,
        k: usize,
        bf16: bool,
        dst: &mut [f32],
    ) {
        super::pack_a::<MR>(a, lda, i0, rows, k, bf16, dst)
    }

    unsafe fn pack_b(
        b: Weight<'_>,
        n: usize,
        k: usize,
        j0: usize,
        nc: usize,
        p0: usize,
        kc: usize,
        out: &mut [f32],
    ) {
        debug_assert!(kc <= KC && j0 + nc <= n && p0 + kc <= k);
        debug_assert!(
            out.len() >= nc.div_ceil(NR) * NR * kc && (out.as_ptr() as usize).is_multiple_of(64)
        );
        match b {
            Weight::F32(s) => pack_b_t(s.as_ptr(), k, j0, nc, p0, kc, out.as_mut_ptr()),
            Weight::Bf16(s) => pack_b_t(s.as_ptr(), k, j0, nc, p0, kc, out.as_mut_ptr()),
            Weight::F16(s) if has_f16c() => {
                pack_b_t(s.as_ptr(), k, j0, nc, p0, kc, out.as_mut_ptr())
            }
            // SAFETY (closure): `pack_b_rows` only asks for kc elements inside row j < n of B.
            Weight::F16(_) => pack_b_rows(n, k, j0, nc, p0, kc, NR, out, |start, dst| unsafe {
                widen(b, start, dst.len(), dst)
            }),
        }
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
        gemv(a, lda, m, b, k, j0, nj, out)
    }
}

/// The AVX2 entry point (see [`gemm_blocked`]).
///
/// # Safety
/// The CPU must support `Isa::Avx2`; shapes checked by `gemm_fused_with`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn gemm(
    a: ARows<'_>,
    b: Weight<'_>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
    glu: Option<Glu>,
) {
    gemm_blocked::<Avx2>(a, b, c, ldc, m, n, k, opts, glu)
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_6x16(
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
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    let (mut a, mut b) = (ap, bp);
    for _ in 0..kc {
        let b0 = _mm256_load_ps(b);
        let b1 = _mm256_load_ps(b.add(8));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm256_broadcast_ss(&*a.add(i));
            row[0] = _mm256_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm256_fmadd_ps(ai, b1, row[1]);
        }
        a = a.add(MR);
        b = b.add(NR);
    }

    if nr == NR {
        let (bias0, bias1) = match bias {
            Some(bs) => (
                _mm256_loadu_ps(bs.as_ptr()),
                _mm256_loadu_ps(bs.as_ptr().add(8)),
            ),
            None => (_mm256_setzero_ps(), _mm256_setzero_ps()),
        };
        for (i, row) in acc.iter().enumerate() {
            if i < mr {
                let cp = c.add(i * ldc);
                let mut v0 = _mm256_add_ps(row[0], bias0);
                let mut v1 = _mm256_add_ps(row[1], bias1);
                if load_c {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(cp));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(cp.add(8)));
                }
                _mm256_storeu_ps(cp, v0);
                _mm256_storeu_ps(cp.add(8), v1);
            }
        }
    } else {
        // Partial columns: spill the row and finish it in scalar code.
        let mut tmp = [0f32; NR];
        for (i, row) in acc.iter().enumerate() {
            if i < mr {
                _mm256_storeu_ps(tmp.as_mut_ptr(), row[0]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), row[1]);
                let cp = c.add(i * ldc);
                for (j, &t) in tmp.iter().enumerate().take(nr) {
                    let mut v = t + bias.map_or(0.0, |bs| bs[j]);
                    if load_c {
                        v += *cp.add(j);
                    }
                    *cp.add(j) = v;
                }
            }
        }
    }
}

/// Packs B by 8×8 blocks: 8 rows × 8 k-values are loaded (widened) into registers, transposed,
/// and written as 8 aligned 32-byte half-rows of the 64-byte panel rows. The column-at-a-time
/// scatter it replaces (`pack_b_rows`) touched every line of the 64 KiB panel for each row of B:
/// with bf16 weights read from DRAM, 5×9216×3072 took 32.6 ms against 4.6 for the 4-row GEMV.
///
/// # Safety
/// Rows `j0..j0+nc`, columns `p0..p0+kc` lie inside `b [.., k]`; `out` holds the panels and is
/// 64-byte aligned; the CPU has what `T::load8` needs (F16C for f16).
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_b_t<T: Lanes8>(
    b: *const T,
    k: usize,
    j0: usize,
    nc: usize,
    p0: usize,
    kc: usize,
    out: *mut f32,
) {
    let body = kc / 8 * 8;
    for q in 0..nc.div_ceil(NR) {
        let panel = out.add(q * NR * kc);
        for half in [0, 8] {
            let col0 = q * NR + half;
            let rows = nc.saturating_sub(col0).min(8);
            let src = |i: usize, p: usize| b.add((j0 + col0 + i) * k + p0 + p);
            for p in (0..body).step_by(8) {
                let mut r = [_mm256_setzero_ps(); 8];
                for (i, v) in r.iter_mut().enumerate().take(rows) {
                    *v = T::load8(src(i, p));
                }
                for (dp, v) in transpose8(r).iter().enumerate() {
                    _mm256_store_ps(panel.add((p + dp) * NR + half), *v);
                }
            }
            for p in body..kc {
                for i in 0..8 {
                    let v = if i < rows { (*src(i, p)).to_f32() } else { 0.0 };
                    *panel.add(p * NR + half + i) = v;
                }
            }
        }
    }
}

/// The 8×8 transpose of `r` (row `i` of the result holds lane `i` of every input).
#[inline]
#[target_feature(enable = "avx2,fma")]
fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    // Pairs of rows interleaved, then 4-row columns within each 128-bit lane, then lanes swapped.
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    // s0: column 0 of rows 0-3 | column 4; s1: 1 | 5; s2: 2 | 6; s3: 3 | 7 (s4-s7: rows 4-7).
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma")]
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
    match b {
        Weight::F32(s) => gemv_t(a, lda, m, &s[j0 * k..(j0 + nj) * k], k, nj, out),
        Weight::Bf16(s) => gemv_t(a, lda, m, &s[j0 * k..(j0 + nj) * k], k, nj, out),
        Weight::F16(s) if has_f16c() => gemv_t(a, lda, m, &s[j0 * k..(j0 + nj) * k], k, nj, out),
        Weight::F16(_) => super::scalar::gemv(a, lda, m, b, k, j0, nj, out),
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_t<T: Lanes8>(
    a: &[f32],
    lda: usize,
    m: usize,
    b: &[T],
    k: usize,
    nj: usize,
    out: &mut [f32],
) {
    match m {
        1 => gemv_m::<T, 1>(a, lda, b, k, nj, out),
        2 => gemv_m::<T, 2>(a, lda, b, k, nj, out),
        3 => gemv_m::<T, 3>(a, lda, b, k, nj, out),
        _ => gemv_m::<T, 4>(a, lda, b, k, nj, out),
    }
}

/// B rows in groups against all `M` rows of A: as many rows per group as 12 ymm accumulators
/// allow for M = 1..3 (8, 6 and 4 rows; each B vector is widened once and each A vector read as
/// a memory operand, so a group costs only its accumulators and one B register), 2 rows for
/// M = 4, then pairs and single rows for the rest. More rows are more streams in flight, as on
/// AVX-512: against four rows for every M (`timing cold`, 2 threads, alternating pairs, same
/// line loop) this read 25.45 against 24.45 GB/s for one row of A and 24.3 against 23.25 for
/// two (6 of 6 each). For four rows of A, 3 B rows per group beat 2 on the Skylake-SP with AVX2
/// forced (18.1 against 17.45, 5 of 6), but on a Zen 3, where AVX2 is the real path, 2 rows (8
/// accumulators; the four A vectors can stay in registers) read 20.6-21.6 GB/s median against
/// 15.9-19.1 (3 of 3 alternating runs of `timing cold 300 4 9216 3072`). For three rows of A,
/// 3 per group against 4 was a tie there (27.5, 28.6, 22.3 against 26.9, 26.9, 24.7).
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_m<T: Lanes8, const M: usize>(
    a: &[f32],
    lda: usize,
    b: &[T],
    k: usize,
    nj: usize,
    out: &mut [f32],
) {
    debug_assert!(out.len() == nj * M && b.len() == nj * k && a.len() >= (M - 1) * lda + k);
    let j = match M {
        1 => row_groups::<T, M, 8>(a, lda, b, k, nj, out, 0),
        2 => row_groups::<T, M, 6>(a, lda, b, k, nj, out, 0),
        3 => row_groups::<T, M, 4>(a, lda, b, k, nj, out, 0),
        _ => row_groups::<T, M, 2>(a, lda, b, k, nj, out, 0),
    };
    let j = row_groups::<T, M, 2>(a, lda, b, k, nj, out, j);
    row_groups::<T, M, 1>(a, lda, b, k, nj, out, j);
}

/// [`dot_rows`] over B rows `j0..` in groups of `R` while a whole group fits in `nj`; returns
/// the first row left over.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_groups<T: Lanes8, const M: usize, const R: usize>(
    a: &[f32],
    lda: usize,
    b: &[T],
    k: usize,
    nj: usize,
    out: &mut [f32],
    j0: usize,
) -> usize {
    let mut j = j0;
    while j + R <= nj {
        dot_rows::<T, M, R>(
            a,
            lda,
            &b[j * k..(j + R) * k],
            k,
            &mut out[j * M..(j + R) * M],
        );
        j += R;
    }
    j
}

/// `out[r·M + i] = A[i, ..k] · b[r, ..k]` for the `R` rows of `b`; the `k % 8` tail in scalar.
///
/// Whole 64-byte lines of every row per turn, with one [`prefetch_rows`] per line and no test
/// of the position per 8 values (as on AVX-512). With the row groups above, against the old
/// per-8 loop with four rows per group (`timing cold`, 2 threads, 6 alternating pairs each):
/// one row of A 25.55 against 23.9 GB/s, two 24.5 against 22.9, four 18.25 against 17.55.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_rows<T: Lanes8, const M: usize, const R: usize>(
    a: &[f32],
    lda: usize,
    b: &[T],
    k: usize,
    out: &mut [f32],
) {
    let body = k / 8 * 8;
    let mut acc = [[_mm256_setzero_ps(); R]; M];
    let (ap, bp) = (a.as_ptr(), b.as_ptr());
    let step = |acc: &mut [[__m256; R]; M], p: usize| {
        for r in 0..R {
            let bv = T::load8(bp.add(r * k + p));
            for (i, row) in acc.iter_mut().enumerate() {
                row[r] = _mm256_fmadd_ps(_mm256_loadu_ps(ap.add(i * lda + p)), bv, row[r]);
            }
        }
    };
    let line = 64 / size_of::<T>();
    let mut p = 0;
    while p + line <= body {
        prefetch_rows(bp, k, R, p);
        for s in (0..line).step_by(8) {
            step(&mut acc, p + s);
        }
        p += line;
    }
    while p < body {
        step(&mut acc, p);
        p += 8;
    }
    for (i, row) in acc.iter().enumerate() {
        for (r, v) in row.iter().enumerate() {
            let mut s = hsum(*v);
            for p in body..k {
                s += a[i * lda + p] * b[r * k + p].to_f32();
            }
            out[r * M + i] = s;
        }
    }
}
