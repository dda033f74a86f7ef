//! Portable RoPE: one pass over each pair `(x[e], x[e + d/2])`.

#[allow(clippy::too_many_arguments)]
pub(super) fn rope(
    x: &mut [f32],
    rows: usize,
    row_stride: usize,
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
) {
    for r in 0..rows {
        let (cs, sn) = (
            &cos[r * head_dim..(r + 1) * head_dim],
            &sin[r * head_dim..(r + 1) * head_dim],
        );
        for h in 0..heads {
            let o = r * row_stride + h * head_dim;
            rope_head(&mut x[o..o + head_dim], cs, sn);
        }
    }
}

/// One head in place. Odd `head_dim` (never used by a model, but defined by the reference: the
/// last element pairs with `x[d/2]`) goes through a copy.
pub(super) fn rope_head(x: &mut [f32], cs: &[f32], sn: &[f32]) {
    let d = x.len();
    let half = d / 2;
    if d % 2 == 1 {
        let v = x.to_vec();
        for e in 0..d {
            let rot = if e < half { -v[e + half] } else { v[e - half] };
            x[e] = v[e] * cs[e] + rot * sn[e];
        }
        return;
    }
    let (lo, hi) = x.split_at_mut(half);
    for e in 0..half {
        let (a, b) = (lo[e], hi[e]);
        lo[e] = a * cs[e] - b * sn[e];
        hi[e] = b * cs[half + e] + a * sn[half + e];
    }
}
