//! AVX2 + FMA GEMM: a 6×16 microkernel (12 ymm accumulators, 2 B loads and 6 broadcasts per k
//! step), edge tiles through a stack buffer, and a GEMV that widens bf16/f16 in registers; for
//! bf16 weights the GEMV also takes up to 32 rows of A, streaming B unpacked.

use std::arch::x86_64::*;

use half::bf16;

use super::{
    gemm_blocked, pack_b_rows, prefetch_rows, ARows, GemmOpts, Glu, Microkernel, GEMV_PF_BYTES, KC,
};
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

    fn gemv_max_m(b: Weight<'_>) -> usize {
        match b {
            Weight::Bf16(_) => WIDE_MAX_M,
            _ => super::GEMV_MAX_M,
        }
    }

    fn gemv_pairs(b: Weight<'_>) -> bool {
        matches!(b, Weight::Bf16(_))
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
        Weight::Bf16(s) => gemv_pairs(a, lda, m, &s[j0 * k..(j0 + nj) * k], k, nj, out),
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

/// f32 and f16 weights (bf16 take [`gemv_pairs`]): B rows in groups against all `M` rows of A:
/// as many rows per group as 12 ymm accumulators allow for M = 1..3 (8, 6 and 4 rows; each B
/// vector is widened once and each A vector read as a memory operand, so a group costs only its
/// accumulators and one B register), 2 rows for M = 4, then pairs and single rows for the rest.
/// More rows are more streams in flight, as on AVX-512: against four rows for every M (`timing
/// cold`, 2 threads, alternating pairs, same line loop) this read 25.45 against 24.45 GB/s for
/// one row of A and 24.3 against 23.25 for two (6 of 6 each). For four rows of A, 3 B rows per group beat 2 on the Skylake-SP with AVX2
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

/// Up to this many rows of A, bf16 weights take the GEMV (see [`gemv_wide`]).
///
/// `timing cold`, 2 threads, bf16 weights from DRAM, median ms of the wide GEMV against the
/// blocked GEMM in two alternating rounds each:
///
/// | m × n × k | wide | blocked |
/// |---|---|---|
/// | 5 × 9216 × 3072 | 3.78, 3.62 | 5.20, 5.25 |
/// | 8 × 9216 × 3072 | 3.89, 4.29 | 7.08, 6.12 |
/// | 16 × 9216 × 3072 | 7.71, 6.70 | 8.22, 8.21 |
/// | 24 × 9216 × 3072 | 9.67, 9.78 | 9.82, 9.74 |
/// | 32 × 9216 × 3072 | 12.96, 12.47 | 17.16, 13.18 |
/// | 40 × 9216 × 3072 | 15.64, 15.61 | 14.97, 14.73 |
/// | 64 × 9216 × 3072 | 24.45, 26.87 | 21.87, 21.89 |
/// | 8 × 3072 × 8192 | 3.26, 3.26 | 5.87, 6.28 |
/// | 32 × 3072 × 8192 | 10.70, 12.39 | 12.91, 12.25 |
/// | 8 × 3072 × 3072 | 1.45, 1.32 | 2.19, 2.34 |
/// | 32 × 3072 × 3072 | 5.22, 5.46 | 5.06, 5.07 |
/// | 16 × 32064 × 3072 | 22.16, 22.47 | 27.04, 27.38 |
const WIDE_MAX_M: usize = 32;
/// The wide GEMV's blocks: A rows per block, B rows per slab and k values per chunk (a
/// multiple of 32). An A block's chunk (16 KiB) stays in L1 while it meets every group of the
/// slab's chunk (96 KiB, in L2). Chunks of 512 measured the same as 1024 (74-76 GFLOP/s, one
/// thread, 16×1024×3072 in L3), 2048 less (68-70); slabs of 24 and 96 rows the same as 48.
const WIDE_MA: usize = 4;
const WIDE_NB: usize = 48;
const WIDE_KC: usize = 1024;

/// The bf16 GEMV, on A split by [`split_pairs`](super::split_pairs): `out[r·m + i] = A[i, :] ·
/// b[r, :]` for any `m`.
///
/// Up to four rows of A, B rows go in groups against all of them ([`pairs_m`]), each over the
/// whole of k; against [`gemv_m`]'s widening by [`Lanes8`] (`timing cold 150 M 9216 3072`, 3
/// alternating rounds, median ms) one row read in 1.78, 1.63, 1.37 against 1.79, 1.81, 1.72;
/// two rows 1.83, 1.47, 1.70 against 1.80, 1.93, 1.82; four 2.31, 2.24, 2.32 against 2.25,
/// 2.38, 2.38. Groups of 8, 4, 2 and 2 B rows for 1-4 rows of A: 8 accumulators or fewer. With
/// 12 (6 B rows for two rows of A, 4 for three) LLVM spilled accumulators in the loop, and
/// three rows of A read 9216×3072 in 2.58-2.84 ms against 2.11-2.72 with pairs (7 of 7
/// alternating runs; 3 B rows measured as 4), two rows 1.79-2.59 against 1.56-2.73 (5 of 7).
/// More rows of A (a short prompt, or more than four sequences decoded together) take
/// [`gemv_wide`]; for two to four rows it was slower or the same (1.90-2.27 ms against
/// 1.68-2.08 for two and three rows).
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_pairs(
    a: &[f32],
    lda: usize,
    m: usize,
    b: &[bf16],
    k: usize,
    nj: usize,
    out: &mut [f32],
) {
    debug_assert!(out.len() == nj * m && b.len() == nj * k && a.len() >= (m - 1) * lda + k);
    if m > super::GEMV_MAX_M {
        return gemv_wide(a, lda, m, b, k, nj, out);
    }
    let (a, b, o) = (a.as_ptr(), b.as_ptr() as *const u16, out.as_mut_ptr());
    match m {
        1 => pairs_m::<1, 8>(a, lda, b, k, nj, o),
        2 => pairs_m::<2, 4>(a, lda, b, k, nj, o),
        3 => pairs_m::<3, 2>(a, lda, b, k, nj, o),
        _ => pairs_m::<4, 2>(a, lda, b, k, nj, o),
    }
}

/// `M` rows of A against B rows in groups of `R`, then single rows for the rest.
///
/// A group's rows are `nj / R` apart, so each of its `R` streams reads one contiguous run of
/// rows from start to end and the prefetch simply runs straight on. With adjacent rows in a
/// group (`R` streams of one row each, restarted every group) 3072-wide rows read 4-10% slower
/// than 8192-wide ones of the same bytes. `timing cold 60 M N K`, 2 threads, median ms in 4
/// alternating runs, strided against adjacent: 1×3072×8192 1.28-1.87 against 1.83-2.42 (4 of
/// 4), 1×32064×3072 6.65-7.25 against 7.12-8.46 (4 of 4), 1×9216×3072 1.92-2.21 against
/// 2.03-2.41 (3 of 4), 4×9216×3072 2.12-2.66 against 2.44-2.90 (3 of 4); two and three rows
/// of A the same (3 runs).
#[target_feature(enable = "avx2,fma")]
unsafe fn pairs_m<const M: usize, const R: usize>(
    a: *const f32,
    lda: usize,
    b: *const u16,
    k: usize,
    nj: usize,
    out: *mut f32,
) {
    let body = k / 16 * 16;
    let ahead = pf_ahead(R);
    let q = nj / R;
    for t in 0..q {
        let mut acc = [[_mm256_setzero_ps(); R]; M];
        dot_pairs::<M, R, PF_L1>(a, lda, b.add(t * k), q * k, 0, body, ahead, &mut acc);
        finish(a, lda, b.add(t * k), q * k, k, &acc, out.add(t * M), q * M);
    }
    for j in q * R..nj {
        let mut acc = [[_mm256_setzero_ps(); 1]; M];
        dot_pairs::<M, 1, PF_L1>(a, lda, b.add(j * k), k, 0, body, pf_ahead(1), &mut acc);
        finish(a, lda, b.add(j * k), k, k, &acc, out.add(j * M), M);
    }
}

/// How far ahead (in values) the GEMV prefetches each of `r` streams: 512 bytes, but 2 KiB
/// for two streams or fewer. Four rows of A read B two rows at a time, and 512 bytes ahead in
/// two streams kept too few lines in flight (`timing cold 100 4 9216 3072`, 2 threads, median
/// ms in alternating runs: 2.03, 2.12, 2.06 against 2.46, 2.34, 2.50, and 4 of 5 in a later
/// noisier set; with the strided groups of [`pairs_m`], 4 of 5 again). Spreading about 4 KiB
/// over every group's rows (682 bytes for 6 rows, 1 KiB for 4) was worse for two and three
/// rows of A in 4 of 5 runs each.
const fn pf_ahead(r: usize) -> isize {
    (if r <= 2 { 2048 } else { GEMV_PF_BYTES } / 2) as isize
}

/// [`gemv_pairs`] for more than four rows of A: blocked as a GEMM whose B needs no packing.
///
/// Packing B for the blocked GEMM (widen, then an 8×8 transpose) costs about as much as the
/// products at so few rows of A: the 6×16 microkernel does 6 FMAs per packed B vector. Here B
/// rows are taken a slab at a time and k a chunk at a time; each A block's chunk meets all the
/// slab's B groups while it is in L1, and its accumulators wait in `acc` between chunks.
///
/// Each A block of 4 rows meets B rows in pairs (8 accumulators). With all the A rows of one
/// group at once, A came from L2 and that bound it (70 GFLOP/s at 32 rows, 2 threads, against
/// 135 now); 4×3 blocks (12 accumulators) spilled, in intrinsics, and with the FMAs' A
/// operands forced to memory by inline asm they ran at 78-81 GFLOP/s in L1 against 87-89 for
/// 4×2 (one thread). In place the 4×2 blocks reach 65-70% of the FMA peak against 80% in L1
/// alone, where the blocked GEMM reaches 80% at large m.
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_wide(
    a: &[f32],
    lda: usize,
    m: usize,
    b: &[bf16],
    k: usize,
    nj: usize,
    out: &mut [f32],
) {
    let (a, b, o) = (a.as_ptr(), b.as_ptr() as *const u16, out.as_mut_ptr());
    let body = k / 16 * 16;
    let blocks = m.div_ceil(WIDE_MA);
    // acc[jj·m + i]: the 8 lanes of A row i against B row j0 + jj of the slab.
    let mut acc = vec![_mm256_setzero_ps(); WIDE_NB * m];
    for j0 in (0..nj).step_by(WIDE_NB) {
        let nb = (nj - j0).min(WIDE_NB);
        acc[..nb * m].fill(_mm256_setzero_ps());
        for p0 in (0..body).step_by(WIDE_KC) {
            let p1 = (p0 + WIDE_KC).min(body);
            // The same place in the next chunk, or in the next slab's first: each band of 8 B
            // rows is prefetched from there by one A block, the blocks taking turns, so DRAM
            // is read all the while and not only by the first block.
            let ahead = if p1 < body {
                WIDE_KC as isize
            } else {
                (WIDE_NB * k) as isize - p0 as isize
            };
            for blk in 0..blocks {
                let i0 = blk * WIDE_MA;
                let rows = (m - i0).min(WIDE_MA);
                let full = group_rows(rows);
                let mut jj = 0;
                while jj < nb {
                    let r = (nb - jj).min(full);
                    let pf = if (jj / 8) % blocks == blk { ahead } else { 0 };
                    let bj = b.add((j0 + jj) * k);
                    let at = acc.as_mut_ptr().add(jj * m + i0);
                    macro_rules! call {
                        ($m:literal, $r:literal) => {
                            chunk::<$m, $r>(a.add(i0 * lda), lda, bj, k, p0, p1, at, m, pf)
                        };
                    }
                    match (rows, r) {
                        (4, 2) => call!(4, 2),
                        (3, 2) => call!(3, 2),
                        (2, 4) => call!(2, 4),
                        (1, 8) => call!(1, 8),
                        (4, _) => call!(4, 1),
                        (3, _) => call!(3, 1),
                        (2, _) => call!(2, 1),
                        _ => call!(1, 1),
                    }
                    jj += if r == full { r } else { 1 };
                }
            }
        }
        for jj in 0..nb {
            let bj = b.add((j0 + jj) * k);
            for i in 0..m {
                let v = [[acc[jj * m + i]]];
                finish::<1, 1>(
                    a.add(i * lda),
                    lda,
                    bj,
                    k,
                    k,
                    &v,
                    o.add((j0 + jj) * m + i),
                    m,
                );
            }
        }
    }
}

/// B rows per group against a block of `rows` A rows in [`gemv_wide`] (8 accumulators or
/// fewer; each divides 8, so no group straddles a prefetch band).
fn group_rows(rows: usize) -> usize {
    match rows {
        4 | 3 => 2,
        2 => 4,
        _ => 8,
    }
}

/// One block of [`gemv_wide`]: `M` A rows against `R` B rows over values `p0..p1`, the
/// accumulators taken from and put back to `acc` (`acc[r·ldacc + i]`); with `ahead != 0`, the
/// lines `ahead` values past those read are prefetched.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn chunk<const M: usize, const R: usize>(
    a: *const f32,
    lda: usize,
    b: *const u16,
    k: usize,
    p0: usize,
    p1: usize,
    acc: *mut __m256,
    ldacc: usize,
    ahead: isize,
) {
    let mut regs = [[_mm256_setzero_ps(); R]; M];
    for (i, row) in regs.iter_mut().enumerate() {
        for (r, v) in row.iter_mut().enumerate() {
            *v = *acc.add(r * ldacc + i);
        }
    }
    if ahead != 0 {
        dot_pairs::<M, R, PF_L2>(a, lda, b, k, p0, p1, ahead, &mut regs);
    } else {
        dot_pairs::<M, R, NO_PF>(a, lda, b, k, p0, p1, 0, &mut regs);
    }
    for (i, row) in regs.iter().enumerate() {
        for (r, v) in row.iter().enumerate() {
            *acc.add(r * ldacc + i) = *v;
        }
    }
}

/// [`dot_pairs`]' prefetch: none, into L1, into L2.
const NO_PF: u8 = 0;
const PF_L1: u8 = 1;
const PF_L2: u8 = 2;

/// `acc[i][r] += ` the products of A rows `i < M` (`lda` apart, split by
/// [`split_pairs`](super::split_pairs)) and bf16 B rows `r < R` (`ldb` apart) over values
/// `p0..p1` (whole 16s).
///
/// A 32-byte load of B holds 16 k values, as 8 u32 lanes of (even, odd) bf16 pairs: `w << 16`
/// is the even values as f32 and `w & 0xffff0000` the odd ones. Two integer ops per 16 values,
/// against a zero-extend and a shift per 8 in [`Lanes8`]; A's 16 values come as 8 even then
/// 8 odd to match. `PF`: prefetch each row's line `ahead` values on, into L1 ([`PF_L1`], the
/// decode GEMV's streams) or L2 ([`PF_L2`], the wide GEMV's next chunk, a chunk ahead).
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_pairs<const M: usize, const R: usize, const PF: u8>(
    a: *const f32,
    lda: usize,
    b: *const u16,
    ldb: usize,
    p0: usize,
    p1: usize,
    ahead: isize,
    acc: &mut [[__m256; R]; M],
) {
    let odd = _mm256_set1_epi32(0xffff_0000_u32 as i32);
    let step = |acc: &mut [[__m256; R]; M], p: usize| {
        for r in 0..R {
            let w = _mm256_loadu_si256(b.add(r * ldb + p) as *const __m256i);
            let e = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w));
            let o = _mm256_castsi256_ps(_mm256_and_si256(w, odd));
            for (i, row) in acc.iter_mut().enumerate() {
                let ai = a.add(i * lda);
                row[r] = _mm256_fmadd_ps(_mm256_loadu_ps(ai.add(p)), e, row[r]);
                row[r] = _mm256_fmadd_ps(_mm256_loadu_ps(ai.add(p + 8)), o, row[r]);
            }
        }
    };
    // Whole 64-byte lines (32 values) per turn, one prefetch per line and row.
    let mut p = p0;
    while p + 32 <= p1 {
        for r in 0..R {
            let line = b.wrapping_add(r * ldb + p).wrapping_offset(ahead) as *const i8;
            // SAFETY: a prefetch reads nothing and never faults.
            match PF {
                PF_L1 => _mm_prefetch::<_MM_HINT_T0>(line),
                PF_L2 => _mm_prefetch::<_MM_HINT_T1>(line),
                _ => {}
            }
        }
        step(acc, p);
        step(acc, p + 16);
        p += 32;
    }
    if p < p1 {
        step(acc, p);
    }
}

/// `out[r·ldo + i]` = the lanes of `acc[i][r]` summed, plus the products past the last whole
/// 16 values of k (in order) of A row `i` and B row `r` (`ldb` apart).
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn finish<const M: usize, const R: usize>(
    a: *const f32,
    lda: usize,
    b: *const u16,
    ldb: usize,
    k: usize,
    acc: &[[__m256; R]; M],
    out: *mut f32,
    ldo: usize,
) {
    for (i, row) in acc.iter().enumerate() {
        for (r, v) in row.iter().enumerate() {
            let mut s = hsum(*v);
            for q in k / 16 * 16..k {
                s += *a.add(i * lda + q) * f32::from_bits((*b.add(r * ldb + q) as u32) << 16);
            }
            *out.add(r * ldo + i) = s;
        }
    }
}
