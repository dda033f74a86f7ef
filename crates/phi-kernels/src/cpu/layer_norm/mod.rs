//! LayerNorm over the last dimension, two-pass (mean, then centred variance), f32 statistics:
//! `out = (x - mean) / sqrt(var + eps) * weight + bias`, as `torch.nn.LayerNorm`.
//! Two passes rather than `E[x²] - mean²`: CLIP's residual stream has |mean| >> std in some
//! channels, where the one-pass form cancels catastrophically in f32.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;

use super::{check_isa, dispatch, for_row_chunks, rows_in};
use crate::{isa, Isa};

/// `x` and `out` are `[rows, cols]` row-major.
pub fn layer_norm(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
    rows: usize,
    cols: usize,
) {
    layer_norm_with(isa::active(), x, weight, bias, eps, out, rows, cols)
}

#[allow(clippy::too_many_arguments)]
pub fn layer_norm_with(
    isa: Isa,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
    rows: usize,
    cols: usize,
) {
    check_isa(isa);
    check_shapes(x, weight, bias, out, rows, cols);
    for_row_chunks(out, rows, cols, cols, |r0, out| {
        let n = rows_in(out.len(), cols);
        let x = &x[r0 * cols..(r0 + n) * cols];
        dispatch!(
            isa,
            layer_norm(x, &weight[..cols], &bias[..cols], eps, out, n, cols)
        )
    });
}

/// [`layer_norm_with`] on the calling thread, for a few rows at a time (a GEMM packing its A
/// operand normalises one micro-panel of rows with it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_seq(
    isa: Isa,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
    rows: usize,
    cols: usize,
) {
    check_isa(isa);
    check_shapes(x, weight, bias, out, rows, cols);
    dispatch!(
        isa,
        layer_norm(x, &weight[..cols], &bias[..cols], eps, out, rows, cols)
    )
}

fn check_shapes(x: &[f32], weight: &[f32], bias: &[f32], out: &[f32], rows: usize, cols: usize) {
    assert!(
        x.len() >= rows * cols && out.len() >= rows * cols,
        "layer_norm: buffers shorter than [{rows}, {cols}]"
    );
    assert!(
        weight.len() >= cols && bias.len() >= cols,
        "layer_norm: weight/bias shorter than {cols}"
    );
}

/// Plain loops, f64 statistics.
pub fn layer_norm_ref(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
    rows: usize,
    cols: usize,
) {
    for r in 0..rows {
        let xs = &x[r * cols..(r + 1) * cols];
        let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / cols as f64;
        let var = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / cols as f64;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        for c in 0..cols {
            out[r * cols + c] =
                ((xs[c] as f64 - mean) * rstd * weight[c] as f64 + bias[c] as f64) as f32;
        }
    }
}
