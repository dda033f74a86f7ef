//! Portable RMSNorm: f32 sum of squares with four partial sums.

pub(super) fn rms_norm(
    x: &[f32],
    weight: &[f32],
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
        let mut s = [0f32; 4];
        for (i, &v) in xs.iter().enumerate() {
            s[i & 3] += v * v;
        }
        let ms = ((s[0] + s[1]) + (s[2] + s[3])) / cols as f32;
        let rs = 1.0 / (ms + eps).sqrt();
        for ((o, &v), &w) in os.iter_mut().zip(xs).zip(weight) {
            *o = w * (v * rs);
        }
    }
}
