//! LayerNorm over the last dimension, two-pass (mean, then centred variance), f32 statistics:
//! `out = (x - mean) / sqrt(var + eps) * weight + bias`, as `torch.nn.LayerNorm`.

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
    let _ = isa;
    layer_norm_ref(x, weight, bias, eps, out, rows, cols)
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
