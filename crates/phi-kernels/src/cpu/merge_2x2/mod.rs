//! The 2×2 permute-reshape merge of Phi-3-vision's image embedding: each 2×2 block of patches
//! becomes one token with the four patch vectors side by side.
//!
//! `feat [n, g*g, c]` (row-major grid `g×g`, `g` even) → `out [n, (g/2)*(g/2), 4c]` with
//! `out[p = i*(g/2) + j][(dy*2 + dx)*c + ch] = feat[(2i+dy)*g + (2j+dx)][ch]`:
//! `[g,g,c] → [g/2,2,g/2,2,c] → permute(0,2,1,3,4)`.

use crate::{isa, Isa};

pub fn merge_2x2(feat: &[f32], out: &mut [f32], n: usize, g: usize, c: usize) {
    merge_2x2_with(isa::active(), feat, out, n, g, c)
}

pub fn merge_2x2_with(isa: Isa, feat: &[f32], out: &mut [f32], n: usize, g: usize, c: usize) {
    let _ = isa;
    merge_2x2_ref(feat, out, n, g, c)
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
