//! RMSNorm over the last dimension (Phi-3): `out = weight * (x * rsqrt(mean(x²) + eps))`, f32
//! statistics. The reference casts the normalised value to the activation dtype before the
//! weight multiply; in f32 that cast is the identity.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;

use super::{check_isa, dispatch, for_row_chunks, rows_in};
use crate::{isa, Isa};

/// `x` and `out` are `[rows, cols]` row-major.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32], rows: usize, cols: usize) {
    rms_norm_with(isa::active(), x, weight, eps, out, rows, cols)
}

pub fn rms_norm_with(
    isa: Isa,
    x: &[f32],
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
    rows: usize,
    cols: usize,
) {
    check_isa(isa);
    check_shapes(x, weight, out, rows, cols);
    for_row_chunks(out, rows, cols, cols, |r0, out| {
        let n = rows_in(out.len(), cols);
        let x = &x[r0 * cols..(r0 + n) * cols];
        dispatch!(isa, rms_norm(x, &weight[..cols], eps, out, n, cols))
    });
}

/// [`rms_norm_with`] on the calling thread, for a few rows at a time (a GEMM packing its A
/// operand normalises one micro-panel of rows with it).
pub(crate) fn rms_norm_seq(
    isa: Isa,
    x: &[f32],
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
    rows: usize,
    cols: usize,
) {
    check_isa(isa);
    check_shapes(x, weight, out, rows, cols);
    dispatch!(isa, rms_norm(x, &weight[..cols], eps, out, rows, cols))
}

fn check_shapes(x: &[f32], weight: &[f32], out: &[f32], rows: usize, cols: usize) {
    assert!(
        x.len() >= rows * cols && out.len() >= rows * cols,
        "rms_norm: buffers shorter than [{rows}, {cols}]"
    );
    assert!(weight.len() >= cols, "rms_norm: weight shorter than {cols}");
}

/// Plain loops, f64 statistics.
pub fn rms_norm_ref(
    x: &[f32],
    weight: &[f32],
    eps: f32,
    out: &mut [f32],
    rows: usize,
    cols: usize,
) {
    for r in 0..rows {
        let xs = &x[r * cols..(r + 1) * cols];
        let ms = xs.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / cols as f64;
        let rs = 1.0 / (ms + eps as f64).sqrt();
        for c in 0..cols {
            out[r * cols + c] = (weight[c] as f64 * (xs[c] as f64 * rs)) as f32;
        }
    }
}
