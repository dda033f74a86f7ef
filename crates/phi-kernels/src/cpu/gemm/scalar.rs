//! Portable GEMM: the same blocked driver with a 4×4 microkernel over plain f32 arrays (each
//! accumulator row is one SSE register after auto-vectorisation; 4×8 measured 4× slower, as
//! LLVM then shuffles and spills), and a row-by-row GEMV.

use super::{gemm_blocked, pack_b_rows, ARows, GemmOpts, Glu, Microkernel, KC};
use crate::{Isa, Weight};

const MR: usize = 4;
const NR: usize = 4;

pub(super) struct Scalar;

impl Microkernel for Scalar {
    const ISA: Isa = Isa::Scalar;
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
        let ap = std::slice::from_raw_parts(ap, kc * MR);
        let bp = std::slice::from_raw_parts(bp, kc * NR);
        let mut acc = [[0f32; NR]; MR];
        for p in 0..kc {
            // Fixed-size views: no bounds checks in the loop, all 16 sums stay in registers.
            let a = <&[f32; MR]>::try_from(&ap[p * MR..(p + 1) * MR]).unwrap();
            let b = <&[f32; NR]>::try_from(&bp[p * NR..(p + 1) * NR]).unwrap();
            for (row, &ai) in acc.iter_mut().zip(a) {
                for (c, &bj) in row.iter_mut().zip(b) {
                    *c += ai * bj;
                }
            }
        }
        for (i, row) in acc.iter().enumerate().take(mr) {
            let cp = c.add(i * ldc);
            for (j, &v) in row.iter().enumerate().take(nr) {
                let mut v = v + bias.map_or(0.0, |bs| bs[j]);
                if load_c {
                    v += *cp.add(j);
                }
                *cp.add(j) = v;
            }
        }
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
        debug_assert!(kc <= KC);
        pack_b_rows(n, k, j0, nc, p0, kc, NR, out, |start, dst| {
            b.widen_into(start, dst)
        })
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

/// The portable entry point (see [`gemm_blocked`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
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
    gemm_blocked::<Scalar>(a, b, c, ldc, m, n, k, opts, glu)
}

/// `out[jj·m + i] = A[i, :] · b[j0 + jj, :]`: each B row widened once into a buffer, then one
/// dot product per A row with four partial sums (breaks the add dependency chain).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemv(
    a: &[f32],
    lda: usize,
    m: usize,
    b: Weight<'_>,
    k: usize,
    j0: usize,
    nj: usize,
    out: &mut [f32],
) {
    let mut row = vec![0f32; k];
    for jj in 0..nj {
        b.widen_into((j0 + jj) * k, &mut row);
        for i in 0..m {
            let x = &a[i * lda..i * lda + k];
            let mut s = [0f32; 4];
            let (xb, rb) = (x.chunks_exact(4), row.chunks_exact(4));
            let (xt, rt) = (xb.remainder(), rb.remainder());
            for (xs, rs) in xb.zip(rb) {
                for l in 0..4 {
                    s[l] += xs[l] * rs[l];
                }
            }
            let mut t = (s[0] + s[1]) + (s[2] + s[3]);
            for (x, r) in xt.iter().zip(rt) {
                t += x * r;
            }
            out[jj * m + i] = t;
        }
    }
}
