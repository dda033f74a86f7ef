//! The image side of Phi-3-vision after CLIP (`Phi3ImageEmbedding`, HD path, "sub_glb" order):
//! drop CLS, merge each 2×2 block of patches into one token, tile the crops into a grid with a
//! learned `sub_GN` newline after every row, put `glb_GN` between the grid and the global view
//! (which gets its own newlines), and project with `img_projection` (Linear, GELU, Linear).
//!
//! Reference: `image_embedding_phi3_v.py` (`hd_feature_transform`,
//! `reshape_hd_patches_2x2merge`, `add_image_newline`) of microsoft/Phi-3-vision-128k-instruct.

#[cfg(feature = "cuda")]
mod cuda;
mod error;
mod hd_feature_transform;
mod img_projection;

use phi_kernels::cpu::{ARows, MergedRows};
use phi_kernels::Checkpoint;

use hd_feature_transform::GRID;

#[cfg(feature = "cuda")]
pub use cuda::ImageProjectorCuda;
pub use error::{Error, Result};
pub use hd_feature_transform::{
    hd_feature_transform, hd_token_sources, num_image_tokens, reshape_hd_patches_2x2merge,
};
pub use img_projection::ImgProjection;

/// Where Phi-3-vision checkpoints keep these tensors.
pub const PHI3V_EMBED_PREFIX: &str = "model.vision_embed_tokens";

/// Separators and projection of the image embedding.
#[derive(Debug, Clone)]
pub struct ImageProjector {
    /// `[4c]`, stored `[1, 1, 4c]`: between the sub-image grid and the global view.
    pub glb_gn: Vec<f32>,
    /// `[4c]`, stored `[1, 1, 1, 4c]`: closes every row of patches.
    pub sub_gn: Vec<f32>,
    pub img_projection: ImgProjection,
    /// CLIP width `c`; tokens are `4c` wide after the merge.
    pub image_dim_out: usize,
}

impl ImageProjector {
    /// `image_dim_out`: CLIP hidden size (1024); `hidden`: decoder width (3072).
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        image_dim_out: usize,
        hidden: usize,
    ) -> Result<Self> {
        let w = 4 * image_dim_out;
        Ok(ImageProjector {
            glb_gn: ckpt.get_f32(&format!("{prefix}.glb_GN"), &[1, 1, w])?,
            sub_gn: ckpt.get_f32(&format!("{prefix}.sub_GN"), &[1, 1, 1, w])?,
            img_projection: ImgProjection::load(
                ckpt,
                &format!("{prefix}.img_projection"),
                w,
                hidden,
            )?,
            image_dim_out,
        })
    }

    /// One image: `clip [1 + h_c·w_c, 577, c]` (CLIP output of the global view then the real
    /// sub-crops, CLS included) → `[num_image_tokens(h_c, w_c), 4c]` in sequence order.
    pub fn image_features(&self, clip: &[f32], h_c: usize, w_c: usize) -> Result<Vec<f32>> {
        hd_feature_transform(
            clip,
            h_c,
            w_c,
            self.image_dim_out,
            &self.sub_gn,
            &self.glb_gn,
        )
    }

    /// `xs [t, 4c]` → `[t, hidden]`.
    pub fn project(&self, xs: &[f32], t: usize) -> Vec<f32> {
        self.img_projection.forward(xs, t)
    }

    /// Several images at once: `clip [crops, 577, c]` holds each image's CLIP output (global
    /// view, then its `h_c·w_c` sub-crops, CLS included), `grids` their `(h_c, w_c)` →
    /// `[Σ num_image_tokens, hidden]`, images in order. Equals [`Self::image_features`] then
    /// [`Self::project`] bit for bit, but the merged tokens and separators are never written
    /// out: the first projection's packing gathers each row from `clip` (see [`MergedRows`]).
    pub fn project_images(&self, clip: &[f32], grids: &[(usize, usize)]) -> Result<Vec<f32>> {
        let c = self.image_dim_out;
        let t = GRID * GRID + 1;
        let mut sources = Vec::new();
        let mut crop0 = 0;
        for &(h_c, w_c) in grids {
            sources.extend(hd_token_sources(h_c, w_c, crop0)?);
            crop0 += 1 + h_c * w_c;
        }
        if clip.len() != crop0 * t * c {
            return Err(Error::FeatureShape {
                crops: crop0,
                c,
                expected: crop0 * t * c,
                got: clip.len(),
            });
        }
        // hd_token_sources: -1 is sub_GN, -2 is glb_GN.
        let literals: [&[f32]; 2] = [&self.sub_gn, &self.glb_gn];
        let rows = MergedRows {
            feat: clip,
            grid_stride: t * c,
            first: c,
            g: GRID,
            c,
            sources: &sources,
            literals: &literals,
        };
        Ok(self
            .img_projection
            .forward_rows(ARows::Merged(&rows), sources.len()))
    }
}
