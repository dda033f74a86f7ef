//! The 2×2 permute-reshape merge of Phi-3-vision's image embedding: each 2×2 block of patches
//! becomes one token with the four patch vectors side by side.
//!
//! `feat [n, g*g, c]` (row-major grid `g×g`, `g` even) → `out [n, (g/2)*(g/2), 4c]` with
//! `out[p = i*(g/2) + j][(dy*2 + dx)*c + ch] = feat[(2i+dy)*g + (2j+dx)][ch]`:
//! `[g,g,c] → [g/2,2,g/2,2,c] → permute(0,2,1,3,4)`.
//!
//! A pure copy: patches `2j` and `2j+1` of one grid row are adjacent in `feat` and in the output
//! token, so each output token is two `2c`-long copies. Split over output tokens when large.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;

use super::{check_isa, dispatch, for_row_chunks};
use crate::{isa, Isa};

pub fn merge_2x2(feat: &[f32], out: &mut [f32], n: usize, g: usize, c: usize) {
    merge_2x2_with(isa::active(), feat, out, n, g, c)
}

pub fn merge_2x2_with(isa: Isa, feat: &[f32], out: &mut [f32], n: usize, g: usize, c: usize) {
    check_isa(isa);
    assert!(g.is_multiple_of(2), "merge_2x2: grid {g} is odd");
    let tokens = n * (g / 2) * (g / 2);
    assert!(
        feat.len() >= n * g * g * c,
        "merge_2x2: feat shorter than [{n}, {g}*{g}, {c}]"
    );
    assert!(
        out.len() >= tokens * 4 * c,
        "merge_2x2: out shorter than [{n}, {tokens}/{n}, 4*{c}]"
    );
    for_row_chunks(out, tokens, 4 * c, 4 * c, |t0, out| {
        dispatch!(isa, merge_tokens(feat, out, t0, g, c))
    });
}

pub fn merge_2x2_ref(feat: &[f32], out: &mut [f32], n: usize, g: usize, c: usize) {
    let h = g / 2;
    for b in 0..n {
        for i in 0..h {
            for j in 0..h {
                for dy in 0..2 {
                    for dx in 0..2 {
                        for ch in 0..c {
                            out[((b * h + i) * h + j) * 4 * c + (dy * 2 + dx) * c + ch] =
                                feat[(b * g * g + (2 * i + dy) * g + (2 * j + dx)) * c + ch];
                        }
                    }
                }
            }
        }
    }
}

/// Source offset in `feat` of the `dy` row pair of output token `t` (grid `g`, channels `c`).
#[inline]
pub(crate) fn merge_src(t: usize, dy: usize, g: usize, c: usize) -> usize {
    let h = g / 2;
    let (b, p) = (t / (h * h), t % (h * h));
    let (i, j) = (p / h, p % h);
    (b * g * g + (2 * i + dy) * g + 2 * j) * c
}
