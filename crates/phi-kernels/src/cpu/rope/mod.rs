//! Rotary position embedding, rotate-half form (GPT-NeoX / Phi-3):
//! `x' = x*cos + rotate_half(x)*sin`, `rotate_half(x) = cat(-x[d/2..], x[..d/2])`.
//! `cos`/`sin` are `[rows, head_dim]` tables already holding any scaling (LongRoPE's mscale).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;

use super::{check_isa, dispatch, for_row_chunks, rows_in};
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
    check_isa(isa);
    let width = heads * head_dim;
    if rows == 0 || width == 0 {
        return;
    }
    assert!(
        row_stride >= width,
        "rope: row_stride {row_stride} < heads*head_dim {width}"
    );
    assert!(
        x.len() >= (rows - 1) * row_stride + width,
        "rope: x too short for {rows} rows"
    );
    assert!(
        cos.len() >= rows * head_dim && sin.len() >= rows * head_dim,
        "rope: cos/sin shorter than [{rows}, {head_dim}]"
    );
    for_row_chunks(x, rows, row_stride, width, |r0, x| {
        let n = rows_in(x.len(), row_stride);
        let (cs, sn) = (
            &cos[r0 * head_dim..(r0 + n) * head_dim],
            &sin[r0 * head_dim..(r0 + n) * head_dim],
        );
        dispatch!(isa, rope(x, n, row_stride, heads, head_dim, cs, sn))
    });
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
