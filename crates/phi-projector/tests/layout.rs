//! The token layout of one image, checked element by element against the index formulas of
//! the spec (§4.2–4.5), written independently of the implementation: each CLIP value encodes
//! (crop, patch, channel), so every output position says where it came from.

use phi_projector::{hd_feature_transform, num_image_tokens, reshape_hd_patches_2x2merge};

const T: usize = 577;

fn encode(crop: usize, patch: usize, ch: usize) -> f32 {
    (crop * 1_000_000 + patch * 100 + ch) as f32
}

fn clip_features(crops: usize, c: usize) -> Vec<f32> {
    let mut v = vec![0f32; crops * T * c];
    for b in 0..crops {
        for t in 0..T {
            for ch in 0..c {
                // Row 0 is CLS: a value no formula may pick.
                v[(b * T + t) * c + ch] = if t == 0 { -1.0 } else { encode(b, t - 1, ch) };
            }
        }
    }
    v
}

/// `merged[p = i*12 + j][q = (dy*2 + dx)*c + ch] = feat[(2i+dy)*24 + (2j+dx)][ch]`
fn merged_value(crop: usize, i: usize, j: usize, q: usize, c: usize) -> f32 {
    let (blk, ch) = (q / c, q % c);
    let (dy, dx) = (blk / 2, blk % 2);
    encode(crop, (2 * i + dy) * 24 + (2 * j + dx), ch)
}

#[test]
fn merge_follows_the_index_formula() {
    let c = 3;
    let merged = reshape_hd_patches_2x2merge(&clip_features(2, c), 2, c);
    for crop in 0..2 {
        for p in 0..144 {
            for q in 0..4 * c {
                assert_eq!(
                    merged[(crop * 144 + p) * 4 * c + q],
                    merged_value(crop, p / 12, p % 12, q, c)
                );
            }
        }
    }
}

#[test]
fn sequence_layout_for_several_grids() {
    let c = 2;
    let w = 4 * c;
    let sub: Vec<f32> = (0..w).map(|i| -10.0 - i as f32).collect();
    let glb: Vec<f32> = (0..w).map(|i| -100.0 - i as f32).collect();
    for (h_c, w_c) in [(1, 1), (2, 2), (3, 4), (4, 3), (1, 16), (16, 1)] {
        let crops = 1 + h_c * w_c;
        let seq = hd_feature_transform(&clip_features(crops, c), h_c, w_c, c, &sub, &glb).unwrap();
        let n = num_image_tokens(h_c, w_c);
        assert_eq!(seq.len(), n * w, "grid {h_c}x{w_c}");

        let mut expected: Vec<Vec<f32>> = Vec::new();
        // Sub-image grid: row R = a*12 + i, column C = b*12 + j, then sub_GN per row.
        for r in 0..h_c * 12 {
            for col in 0..w_c * 12 {
                let (a, i, b, j) = (r / 12, r % 12, col / 12, col % 12);
                let crop = 1 + a * w_c + b;
                expected.push((0..w).map(|q| merged_value(crop, i, j, q, c)).collect());
            }
            expected.push(sub.clone());
        }
        expected.push(glb.clone());
        // Global view (crop 0) with its own sub_GN newlines.
        for i in 0..12 {
            for j in 0..12 {
                expected.push((0..w).map(|q| merged_value(0, i, j, q, c)).collect());
            }
            expected.push(sub.clone());
        }
        assert_eq!(expected.len(), n);
        for (tok, e) in expected.iter().enumerate() {
            assert_eq!(
                &seq[tok * w..(tok + 1) * w],
                e.as_slice(),
                "grid {h_c}x{w_c}, token {tok}"
            );
        }
    }
}

#[test]
fn token_counts_match_the_spec_table() {
    // spec §2.7: 4x4 → 2509, 2x2 → 757, 3x4 → 1921, 4x3 → 1933, 3x5 → 2353, 16x1 → 2653.
    for ((h, w), n) in [
        ((4, 4), 2509),
        ((2, 2), 757),
        ((3, 4), 1921),
        ((4, 3), 1933),
        ((3, 5), 2353),
        ((16, 1), 2653),
    ] {
        assert_eq!(num_image_tokens(h, w), n);
    }
}

#[test]
fn bad_inputs_are_errors() {
    let c = 2;
    let sub = vec![0.0; 4 * c];
    assert!(hd_feature_transform(&clip_features(2, c), 0, 1, c, &sub, &sub).is_err());
    // Features for 2 crops but a 2x2 grid needs 5.
    assert!(hd_feature_transform(&clip_features(2, c), 2, 2, c, &sub, &sub).is_err());
}

/// Several images at once through the fused path (the merge and the separators gathered by
/// the first projection's packing) against the layout above followed by the projection, bit
/// for bit, with f32 and with bf16 products; a feature buffer of the wrong size is an error.
#[test]
fn fused_projection_equals_layout_then_projection() {
    use phi_kernels::{DType, Linear, Tensor};
    use phi_projector::{ImageProjector, ImgProjection};
    let (c, hidden) = (4, 24);
    let grids = [(1, 2), (2, 1), (1, 1)];
    let crops: usize = grids.iter().map(|(h, w)| 1 + h * w).sum();
    let val = |i: usize, scale: f32| ((i * 2_654_435_761 % 1999) as f32 / 999.5 - 1.0) * scale;
    let clip: Vec<f32> = (0..crops * T * c).map(|i| val(i, 1.0)).collect();
    for precision in [DType::F32, DType::BF16] {
        let linear = |inp: usize, out: usize, seed: usize| {
            let w = (0..inp * out).map(|i| val(i + seed, 0.3)).collect();
            let mut weight = Tensor::from_f32(w, &[out, inp]);
            if precision == DType::BF16 {
                weight = weight.to_bf16();
            }
            Linear {
                weight,
                bias: Some((0..out).map(|i| val(i + seed + 7, 0.1)).collect()),
                in_features: inp,
                out_features: out,
                precision,
            }
        };
        let proj = ImageProjector {
            glb_gn: (0..4 * c).map(|i| val(i + 11, 2.0)).collect(),
            sub_gn: (0..4 * c).map(|i| val(i + 13, 2.0)).collect(),
            img_projection: ImgProjection {
                fc0: linear(4 * c, hidden, 17),
                fc2: linear(hidden, hidden, 19),
            },
            image_dim_out: c,
        };
        let fused = proj.project_images(&clip, &grids).unwrap();

        let mut feats = Vec::new();
        let mut crop0 = 0;
        for &(h, w) in &grids {
            let n = 1 + h * w;
            let one = &clip[crop0 * T * c..(crop0 + n) * T * c];
            feats.extend(proj.image_features(one, h, w).unwrap());
            crop0 += n;
        }
        let total = feats.len() / (4 * c);
        let unfused = proj.project(&feats, total);
        assert_eq!(fused.len(), total * hidden);
        for (i, (f, u)) in fused.iter().zip(&unfused).enumerate() {
            assert_eq!(
                f.to_bits(),
                u.to_bits(),
                "{precision:?} [{i}]: {f} against {u}"
            );
        }
        assert!(proj
            .project_images(&clip[..clip.len() - c], &grids)
            .is_err());
    }
}
