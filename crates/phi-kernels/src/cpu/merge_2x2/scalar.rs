//! Portable merge: `copy_from_slice` per half token.

use super::merge_src;

/// Fills whole output tokens `t0..t0 + out.len() / 4c`.
pub(super) fn merge_tokens(feat: &[f32], out: &mut [f32], t0: usize, g: usize, c: usize) {
    for (t, tok) in out.chunks_exact_mut(4 * c).enumerate() {
        for dy in 0..2 {
            let src = merge_src(t0 + t, dy, g, c);
            tok[dy * 2 * c..(dy + 1) * 2 * c].copy_from_slice(&feat[src..src + 2 * c]);
        }
    }
}
