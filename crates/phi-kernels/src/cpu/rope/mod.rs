//! Rotary position embedding, rotate-half form (GPT-NeoX / Phi-3):
//! `x' = x*cos + rotate_half(x)*sin`, `rotate_half(x) = cat(-x[d/2..], x[..d/2])`.
//! `cos`/`sin` are `[rows, head_dim]` tables already holding any scaling (LongRoPE's mscale).

use crate::{isa, Isa};

/// In place over `rows` rows of `heads * head_dim` values spaced `row_stride` apart.
pub fn rope(
    x: &mut [f32],
    rows: usize,
    row_stride: usize,
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
) {
    rope_with(
        isa::active(),
        x,
        rows,
        row_stride,
        heads,
        head_dim,
        cos,
        sin,
    )
}

#[allow(clippy::too_many_arguments)]
pub fn rope_with(
    isa: Isa,
    x: &mut [f32],
    rows: usize,
    row_stride: usize,
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
) {
    let _ = isa;
    rope_ref(x, rows, row_stride, heads, head_dim, cos, sin)
}

pub fn rope_ref(
    x: &mut [f32],
    rows: usize,
    row_stride: usize,
    heads: usize,
    head_dim: usize,
    cos: &[f32],
    sin: &[f32],
) {
    let half = head_dim / 2;
    for r in 0..rows {
        let cs = &cos[r * head_dim..(r + 1) * head_dim];
        let sn = &sin[r * head_dim..(r + 1) * head_dim];
        for h in 0..heads {
            let o = r * row_stride + h * head_dim;
            let v = x[o..o + head_dim].to_vec();
            for e in 0..head_dim {
                let rot = if e < half { -v[e + half] } else { v[e - half] };
                x[o + e] = v[e] * cs[e] + rot * sn[e];
            }
        }
    }
}
