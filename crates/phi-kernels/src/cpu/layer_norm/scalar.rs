//! Portable LayerNorm: f32 statistics with four partial sums per pass.

/// `rows` rows of `cols`; `weight`/`bias` are `cols` long.
pub(super) fn layer_norm(
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
    rows: usize,
    cols: usize,
) {
    for (xs, os) in x
        .chunks_exact(cols)
        .zip(out.chunks_exact_mut(cols))
        .take(rows)
    {
        let mean = sum4(xs.iter().copied()) / cols as f32;
        let var = sum4(xs.iter().map(|&v| (v - mean) * (v - mean))) / cols as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for (((o, &v), &w), &b) in os.iter_mut().zip(xs).zip(weight).zip(bias) {
            *o = (v - mean) * rstd * w + b;
        }
    }
}

/// Sum with four interleaved accumulators (shorter dependency chains, smaller rounding error).
pub(crate) fn sum4(vals: impl Iterator<Item = f32>) -> f32 {
    let mut s = [0f32; 4];
    for (i, v) in vals.enumerate() {
        s[i & 3] += v;
    }
    (s[0] + s[1]) + (s[2] + s[3])
}
