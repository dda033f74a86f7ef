//! torchvision `ToTensor()` + `Normalize(mean, std)` on a PIL RGB image (spec §2.4).
//!
//! ToTensor: `img.to(float32).div(255)` (a true f32 division, one rounding).
//! Normalize: `tensor.sub_(mean).div_(std)` with `mean`, `std` as f32 tensors, so each value is
//! `((x / 255) - mean[c]) / std[c]` with an f32 rounding after every operation. Both steps are
//! elementwise, so a 256-entry table per channel gives the same bits.

use super::RgbImage;

/// The normalised value of every byte, per channel: `[3][256]`.
pub fn normalize_table(mean: [f32; 3], std: [f32; 3]) -> [[f32; 256]; 3] {
    let mut t = [[0f32; 256]; 3];
    for (c, row) in t.iter_mut().enumerate() {
        for (v, out) in row.iter_mut().enumerate() {
            let x = v as f32 / 255.0f32;
            *out = (x - mean[c]) / std[c];
        }
    }
    t
}

/// HWC uint8 → CHW f32 `[3, H, W]`, normalised.
pub fn to_tensor_normalize(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let table = normalize_table(mean, std);
    let hw = img.width * img.height;
    let mut out = vec![0f32; 3 * hw];
    let (r, rest) = out.split_at_mut(hw);
    let (g, b) = rest.split_at_mut(hw);
    for (i, p) in img.data.chunks_exact(3).enumerate() {
        r[i] = table[0][p[0] as usize];
        g[i] = table[1][p[1] as usize];
        b[i] = table[2][p[2] as usize];
    }
    out
}
