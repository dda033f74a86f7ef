//! Token layout of one image (spec §4.2–4.5):
//!
//! ```text
//! per crop   [577, c] → drop CLS → [24, 24, c] → 2×2 merge → [12, 12, 4c]
//! sub grid   crops 1..=h_c·w_c → [h_c·12, w_c·12, 4c], sub_GN appended to every row
//! global     crop 0 → [12, 12, 4c], sub_GN appended to every row
//! sequence   [sub grid rows (h_c·12·(w_c·12+1)), glb_GN (1), global rows (12·13)]
//! ```

use crate::{Error, Result};

/// Patches per side of a 336-px crop (336 / 14).
pub(crate) const GRID: usize = 24;
/// Merged tokens per side (24 / 2).
const MERGED: usize = GRID / 2;

/// Tokens one image contributes: `(h_c·w_c + 1)·144 + 1 + (h_c + 1)·12`.
pub fn num_image_tokens(h_c: usize, w_c: usize) -> usize {
    (h_c * w_c + 1) * MERGED * MERGED + 1 + (h_c + 1) * MERGED
}

/// `clip [n, 577, c]` (CLS first) → `[n, 144, 4c]`, channel blocks in (dy, dx) order
/// (0,0), (0,1), (1,0), (1,1).
pub fn reshape_hd_patches_2x2merge(clip: &[f32], n: usize, c: usize) -> Vec<f32> {
    let t = GRID * GRID + 1;
    let mut out = vec![0f32; n * MERGED * MERGED * 4 * c];
    for b in 0..n {
        // Skip CLS: patches are rows 1..577 of the crop.
        let patches = &clip[(b * t + 1) * c..(b + 1) * t * c];
        let dst = &mut out[b * MERGED * MERGED * 4 * c..(b + 1) * MERGED * MERGED * 4 * c];
        phi_kernels::cpu::merge_2x2(patches, dst, 1, GRID, c);
    }
    out
}

/// Appends `sub_gn` after every row of a `[rows, cols, w]` grid → `[rows·(cols+1), w]`.
fn add_image_newline(
    grid: &[f32],
    rows: usize,
    cols: usize,
    w: usize,
    sub_gn: &[f32],
    out: &mut Vec<f32>,
) {
    for r in 0..rows {
        out.extend_from_slice(&grid[r * cols * w..(r + 1) * cols * w]);
        out.extend_from_slice(sub_gn);
    }
}

/// One image's CLIP output `[1 + h_c·w_c, 577, c]` (global view first) → its token sequence
/// `[num_image_tokens(h_c, w_c), 4c]`.
pub fn hd_feature_transform(
    clip: &[f32],
    h_c: usize,
    w_c: usize,
    c: usize,
    sub_gn: &[f32],
    glb_gn: &[f32],
) -> Result<Vec<f32>> {
    if h_c == 0 || w_c == 0 {
        return Err(Error::EmptyGrid { h_c, w_c });
    }
    let crops = 1 + h_c * w_c;
    let expected = crops * (GRID * GRID + 1) * c;
    if clip.len() != expected {
        return Err(Error::FeatureShape {
            crops,
            c,
            expected,
            got: clip.len(),
        });
    }
    let w = 4 * c;
    // [crops, 144, 4c]
    let merged = reshape_hd_patches_2x2merge(clip, crops, c);
    let per_crop = MERGED * MERGED * w;

    // [h_c, w_c, 12, 12, 4c] → permute → [h_c·12, w_c·12, 4c]: row R = a·12 + i holds, for each
    // crop column b, merged crop (a·w_c + b) row i.
    let mut grid = Vec::with_capacity(h_c * w_c * per_crop);
    for a in 0..h_c {
        for i in 0..MERGED {
            for b in 0..w_c {
                let crop = 1 + a * w_c + b;
                let row = &merged
                    [crop * per_crop + i * MERGED * w..crop * per_crop + (i + 1) * MERGED * w];
                grid.extend_from_slice(row);
            }
        }
    }

    let mut out = Vec::with_capacity(num_image_tokens(h_c, w_c) * w);
    add_image_newline(&grid, h_c * MERGED, w_c * MERGED, w, sub_gn, &mut out);
    out.extend_from_slice(glb_gn);
    add_image_newline(&merged[..per_crop], MERGED, MERGED, w, sub_gn, &mut out);
    debug_assert_eq!(out.len(), num_image_tokens(h_c, w_c) * w);
    Ok(out)
}

/// Where each token of [`hd_feature_transform`]'s output comes from, for a gather on the device:
/// `s >= 0` is merged token `s` of the whole batch of crops (crop `k` of the batch holds tokens
/// `144k .. 144k+144`, row-major 12×12), `-1` is `sub_GN`, `-2` is `glb_GN`. The image's global
/// view is crop `crop0` of the batch, its sub-crops follow.
pub fn hd_token_sources(h_c: usize, w_c: usize, crop0: usize) -> Result<Vec<i32>> {
    if h_c == 0 || w_c == 0 {
        return Err(Error::EmptyGrid { h_c, w_c });
    }
    let tok = |crop: usize, i: usize, j: usize| {
        ((crop0 + crop) * MERGED * MERGED + i * MERGED + j) as i32
    };
    let mut out = Vec::with_capacity(num_image_tokens(h_c, w_c));
    for a in 0..h_c {
        for i in 0..MERGED {
            for b in 0..w_c {
                out.extend((0..MERGED).map(|j| tok(1 + a * w_c + b, i, j)));
            }
            out.push(-1);
        }
    }
    out.push(-2);
    for i in 0..MERGED {
        out.extend((0..MERGED).map(|j| tok(0, i, j)));
        out.push(-1);
    }
    debug_assert_eq!(out.len(), num_image_tokens(h_c, w_c));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gather table reproduces the CPU layout token for token.
    #[test]
    fn token_sources_reproduce_the_cpu_layout() {
        let c = 8;
        for (h_c, w_c) in [(1, 1), (1, 2), (2, 1), (2, 3), (4, 4)] {
            let crops = 1 + h_c * w_c;
            let t = GRID * GRID + 1;
            // Distinct values everywhere, CLS rows included (they must never be picked).
            let clip: Vec<f32> = (0..crops * t * c).map(|i| i as f32).collect();
            let sub: Vec<f32> = (0..4 * c).map(|i| -1.0 - i as f32).collect();
            let glb: Vec<f32> = (0..4 * c).map(|i| -1000.0 - i as f32).collect();
            let want = hd_feature_transform(&clip, h_c, w_c, c, &sub, &glb).unwrap();
            let merged = reshape_hd_patches_2x2merge(&clip, crops, c);
            let got: Vec<f32> = hd_token_sources(h_c, w_c, 0)
                .unwrap()
                .iter()
                .flat_map(|&s| match s {
                    -1 => sub.clone(),
                    -2 => glb.clone(),
                    s => merged[s as usize * 4 * c..(s as usize + 1) * 4 * c].to_vec(),
                })
                .collect();
            assert_eq!(got, want, "grid {h_c}x{w_c}");
        }
        // A second image starts at its own first crop.
        assert_eq!(hd_token_sources(1, 1, 3).unwrap()[0], (3 + 1) * 144);
    }
}
