//! AVX-512 GEMM: a 14×32 microkernel (28 zmm accumulators, 2 B loads and 14 broadcasts per k
//! step, so the two FMA ports are the bottleneck), instances for 1..13 rows for a panel's last
//! tile, masked stores for edge columns, and a GEMV that widens bf16/f16 rows in registers.

use std::arch::x86_64::*;

use super::{gemm_blocked, prefetch_rows, ARows, GemmOpts, Glu, Microkernel, KC};
use crate::cpu::math::avx512::{load_f32, mask16, round_bf16, Lanes16};
use crate::{Isa, Weight};

pub(super) const MR: usize = 14;
pub(super) const NR: usize = 32;

pub(super) struct Avx512;

impl Microkernel for Avx512 {
    const ISA: Isa = Isa::Avx512;
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
        // The tile's rows are known here, so a panel's last tile (577 = 41·14 + 3 rows for a
        // CLIP crop, or all of a short prompt's 5..14) multiplies only the rows it has.
        macro_rules! rows {
            ($($r:literal)*) => {
                match mr {
                    $($r => kernel_rows::<$r>(kc, ap, bp, c, ldc, nr, load_c, bias),)*
                    _ => unreachable!("mr {mr} > MR"),
                }
            };
        }
        rows!(14 13 12 11 10 9 8 7 6 5 4 3 2 1)
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
        debug_assert!(Isa::Avx512.is_supported());
        // SAFETY: this kernel only runs where AVX-512 is (checked by `gemm_opts_with`).
        unsafe { pack_a_t(a, lda, i0, rows, k, bf16, dst) }
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
            Weight::F16(s) => pack_b_t(s.as_ptr(), k, j0, nc, p0, kc, out.as_mut_ptr()),
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

/// The AVX-512 entry point (see [`gemm_blocked`]).
///
/// # Safety
/// The CPU must support `Isa::Avx512`; shapes checked by `gemm_fused_with`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
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
    gemm_blocked::<Avx512>(a, b, c, ldc, m, n, k, opts, glu)
}

/// The microkernel on the first `R <= MR` rows of an A panel (row stride `MR` per k step): an
/// `R×32` tile in `2R` accumulators.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn kernel_rows<const R: usize>(
    kc: usize,
    ap: *const f32,
    bp: *const f32,
    c: *mut f32,
    ldc: usize,
    nr: usize,
    load_c: bool,
    bias: Option<&[f32]>,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; R];
    let (mut a, mut b) = (ap, bp);
    // One k step: two B vectors against R broadcast A values. Unrolled by four so the loop
    // counter and pointer bumps stay off the 4-wide front end, which the 2·R FMAs plus R + 2
    // loads of one step nearly fill on their own (at R = MR).
    let step = |acc: &mut [[__m512; 2]; R], a: *const f32, b: *const f32| {
        let b0 = _mm512_load_ps(b);
        let b1 = _mm512_load_ps(b.add(16));
        for (i, row) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*a.add(i));
            row[0] = _mm512_fmadd_ps(ai, b0, row[0]);
            row[1] = _mm512_fmadd_ps(ai, b1, row[1]);
        }
    };
    for _ in 0..kc / 4 {
        step(&mut acc, a, b);
        step(&mut acc, a.add(MR), b.add(NR));
        step(&mut acc, a.add(2 * MR), b.add(2 * NR));
        step(&mut acc, a.add(3 * MR), b.add(3 * NR));
        a = a.add(4 * MR);
        b = b.add(4 * NR);
    }
    for _ in 0..kc % 4 {
        step(&mut acc, a, b);
        a = a.add(MR);
        b = b.add(NR);
    }

    store_tile(&acc, c, ldc, R, nr, load_c, bias)
}

/// Writes an `R×32` accumulator tile to C: `mr <= R` rows of `nr` columns, plus bias, plus the
/// old C when `load_c`.
///
/// # Safety
/// `c` writable for `mr` rows of `nr` (rows `ldc` apart), `bias` (if any) `nr` long.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn store_tile<const R: usize>(
    acc: &[[__m512; 2]; R],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    load_c: bool,
    bias: Option<&[f32]>,
) {
    // Edge tiles use the same path with partial masks; masked-off lanes are never touched, so
    // the second half's address may lie past the row (hence `wrapping_add`).
    let (m0, m1) = (mask16(nr), mask16(nr.saturating_sub(16)));
    let (bias0, bias1) = match bias {
        Some(bs) => (
            load_f32(bs.as_ptr(), m0),
            load_f32(bs.as_ptr().wrapping_add(16), m1),
        ),
        None => (_mm512_setzero_ps(), _mm512_setzero_ps()),
    };
    for (i, row) in acc.iter().enumerate() {
        if i < mr {
            let cp = c.add(i * ldc);
            let mut v0 = _mm512_add_ps(row[0], bias0);
            let mut v1 = _mm512_add_ps(row[1], bias1);
            if load_c {
                v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, cp));
                v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, cp.wrapping_add(16)));
            }
            _mm512_mask_storeu_ps(cp, m0, v0);
            _mm512_mask_storeu_ps(cp.wrapping_add(16), m1, v1);
        }
    }
}

/// Packs B by 16×16 blocks: 16 rows × 16 k-values are loaded (widened) into registers,
/// transposed, and written as 16 aligned 64-byte half-rows of the panel. Writing whole cache
/// lines matters: a column-at-a-time scatter touches every line of the 32 KiB panel per row.
///
/// # Safety
/// Rows `j0..j0+nc`, columns `p0..p0+kc` lie inside `b [.., k]`; `out` holds the panels and is
/// 64-byte aligned.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_b_t<T: Lanes16>(
    b: *const T,
    k: usize,
    j0: usize,
    nc: usize,
    p0: usize,
    kc: usize,
    out: *mut f32,
) {
    for q in 0..nc.div_ceil(NR) {
        let panel = out.add(q * NR * kc);
        for half in [0, 16] {
            let col0 = q * NR + half;
            let rows = nc.saturating_sub(col0).min(16);
            let mut p = 0;
            while p < kc {
                let mask = mask16(kc - p);
                let mut r = [_mm512_setzero_ps(); 16];
                for (i, v) in r.iter_mut().enumerate().take(rows) {
                    *v = T::load16(b.add((j0 + col0 + i) * k + p0 + p), mask);
                }
                let t = transpose16(r);
                for (dp, v) in t.iter().enumerate().take((kc - p).min(16)) {
                    _mm512_store_ps(panel.add((p + dp) * NR + half), *v);
                }
                p += 16;
            }
        }
    }
}

/// Packs rows `i0..i0+rows` of A (`rows <= MR`) into one micro-panel `dst [k][MR]` by 16×16
/// blocks, as [`pack_b_t`]: 16 k-values of each row loaded (rounded to bf16 in registers if
/// `bf16`), transposed, and written as `MR`-wide rows; rows past `rows` are zero. The scalar
/// gather it replaces took 4% of CLIP's time.
///
/// # Safety
/// The CPU has AVX-512; rows `i0..i0+rows` of `a` hold `k` values each, `dst` `MR·k`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_a_t(
    a: &[f32],
    lda: usize,
    i0: usize,
    rows: usize,
    k: usize,
    bf16: bool,
    dst: &mut [f32],
) {
    debug_assert!(rows <= MR && dst.len() >= MR * k);
    debug_assert!(rows == 0 || a.len() >= (i0 + rows - 1) * lda + k);
    let src = a.as_ptr().wrapping_add(i0 * lda);
    let out = dst.as_mut_ptr();
    let row_lanes = mask16(MR);
    let mut p = 0;
    while p < k {
        let mask = mask16(k - p);
        let mut r = [_mm512_setzero_ps(); 16];
        for (i, v) in r.iter_mut().enumerate().take(rows) {
            *v = load_f32(src.add(i * lda + p), mask);
            if bf16 {
                *v = round_bf16(*v);
            }
        }
        let t = transpose16(r);
        for (dp, v) in t.iter().enumerate().take((k - p).min(16)) {
            _mm512_mask_storeu_ps(out.add((p + dp) * MR), row_lanes, *v);
        }
        p += 16;
    }
}

/// 16×16 transpose of f32 in registers: `out[j][i] = r[i][j]` (64 shuffles).
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // Stage 1+2, per quad of rows 4c..4c+3 and column offset o: w[c][o] holds, in 128-bit lane L,
    // column 4L+o of those four rows.
    let mut w = [[_mm512_setzero_ps(); 4]; 4];
    for c in 0..4 {
        let lo01 = _mm512_unpacklo_ps(r[4 * c], r[4 * c + 1]);
        let hi01 = _mm512_unpackhi_ps(r[4 * c], r[4 * c + 1]);
        let lo23 = _mm512_unpacklo_ps(r[4 * c + 2], r[4 * c + 3]);
        let hi23 = _mm512_unpackhi_ps(r[4 * c + 2], r[4 * c + 3]);
        w[c][0] = _mm512_shuffle_ps::<0x44>(lo01, lo23);
        w[c][1] = _mm512_shuffle_ps::<0xEE>(lo01, lo23);
        w[c][2] = _mm512_shuffle_ps::<0x44>(hi01, hi23);
        w[c][3] = _mm512_shuffle_ps::<0xEE>(hi01, hi23);
    }
    // Stage 3+4: gather lane L of w[0..4][o] into column 4L+o.
    let mut out = [_mm512_setzero_ps(); 16];
    for o in 0..4 {
        let x01 = _mm512_shuffle_f32x4::<0x44>(w[0][o], w[1][o]);
        let y01 = _mm512_shuffle_f32x4::<0xEE>(w[0][o], w[1][o]);
        let x23 = _mm512_shuffle_f32x4::<0x44>(w[2][o], w[3][o]);
        let y23 = _mm512_shuffle_f32x4::<0xEE>(w[2][o], w[3][o]);
        out[o] = _mm512_shuffle_f32x4::<0x88>(x01, x23);
        out[4 + o] = _mm512_shuffle_f32x4::<0xDD>(x01, x23);
        out[8 + o] = _mm512_shuffle_f32x4::<0x88>(y01, y23);
        out[12 + o] = _mm512_shuffle_f32x4::<0xDD>(y01, y23);
    }
    out
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
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
        Weight::F16(s) => gemv_t(a, lda, m, &s[j0 * k..(j0 + nj) * k], k, nj, out),
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn gemv_t<T: Lanes16>(
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

/// B rows in groups against all `M` rows of A, each B vector widened once: eight rows for
/// `M <= 2` (up to 16 accumulators), six for 3-4 (24), then four and one for the rest. More rows
/// are more streams from memory: with four, two rows of A read bf16 weights at 18.4-20.0 GB/s
/// and four rows at 17.1-18.3; with eight and six, 20.4-20.9 and 18.1-19.4.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn gemv_m<T: Lanes16, const M: usize>(
    a: &[f32],
    lda: usize,
    b: &[T],
    k: usize,
    nj: usize,
    out: &mut [f32],
) {
    debug_assert!(out.len() == nj * M && b.len() == nj * k && a.len() >= (M - 1) * lda + k);
    let j = if M <= 2 {
        row_groups::<T, M, 8>(a, lda, b, k, nj, out, 0)
    } else {
        row_groups::<T, M, 6>(a, lda, b, k, nj, out, 0)
    };
    let j = row_groups::<T, M, 4>(a, lda, b, k, nj, out, j);
    row_groups::<T, M, 1>(a, lda, b, k, nj, out, j);
}

/// [`dot_rows`] over B rows `j0..` in groups of `R` while a whole group fits in `nj`; returns
/// the first row left over.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn row_groups<T: Lanes16, const M: usize, const R: usize>(
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
            a.as_ptr(),
            lda,
            b.as_ptr().add(j * k),
            k,
            out.as_mut_ptr().add(j * M),
        );
        j += R;
    }
    j
}

/// `out[r·M + i] = A[i, ..k] · B[r, ..k]` for `R` consecutive B rows at `b`.
///
/// Each B row is one stream from memory, prefetched line by line with [`prefetch_rows`]. That
/// the prefetch runs on into the next group of rows matters: without it each group started its
/// streams cold (`timing cold`, 2 threads, huge pages, alternating runs: 1×9216×3072 25.0
/// against 23.8 GB/s, median of 8 pairs; 2 rows 24.4 against 18.9, 6 of 6). With four rows of
/// A, where the cold prefetch had gained nothing, it now does: 20.9 against 20.0 (5 of 6); the
/// unmasked line loop below then took four rows to 23.1 against 21.1 (5 of 6) and three to
/// 23.7 against 21.4 (4 of 4).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn dot_rows<T: Lanes16, const M: usize, const R: usize>(
    a: *const f32,
    lda: usize,
    b: *const T,
    k: usize,
    out: *mut f32,
) {
    let mut acc = [[_mm512_setzero_ps(); R]; M];
    // 16 values of every row at p (lanes past `mask` read as zero).
    let step = |acc: &mut [[__m512; R]; M], p: usize, mask: __mmask16| {
        let mut bv = [_mm512_setzero_ps(); R];
        for (r, v) in bv.iter_mut().enumerate() {
            *v = T::load16(b.add(r * k + p), mask);
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let av = load_f32(a.add(i * lda + p), mask);
            for r in 0..R {
                row[r] = _mm512_fmadd_ps(av, bv[r], row[r]);
            }
        }
    };
    // Whole 64-byte lines of every row: one prefetch per row and line, unmasked loads.
    let line = 64 / size_of::<T>();
    let mut p = 0;
    while p + line <= k {
        prefetch_rows(b, k, R, p);
        for s in (0..line).step_by(16) {
            step(&mut acc, p + s, !0);
        }
        p += line;
    }
    while p < k {
        step(&mut acc, p, mask16(k - p));
        p += 16;
    }
    for (i, row) in acc.iter().enumerate() {
        for (r, v) in row.iter().enumerate() {
            *out.add(r * M + i) = _mm512_reduce_add_ps(*v);
        }
    }
}
