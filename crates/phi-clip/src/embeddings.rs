//! `CLIPVisionEmbeddings`: a 14×14 stride-14 convolution without bias (as im2col + GEMM), a
//! learned CLS vector in front, and learned position embeddings added.

use phi_kernels::{Checkpoint, Tensor};
use rayon::prelude::*;

use crate::{ClipVisionConfig, Result};

#[derive(Debug, Clone)]
pub struct ClipVisionEmbeddings {
    /// `[hidden, 3, patch, patch]`, used as a `[hidden, 3·patch²]` GEMM operand.
    pub patch_embedding: Tensor,
    pub class_embedding: Vec<f32>,
    /// `[num_positions, hidden]`.
    pub position_embedding: Vec<f32>,
    cfg: ClipVisionConfig,
}

impl ClipVisionEmbeddings {
    pub fn load(ckpt: &Checkpoint, prefix: &str, cfg: &ClipVisionConfig) -> Result<Self> {
        let (c, p) = (cfg.hidden_size, cfg.patch_size);
        Ok(ClipVisionEmbeddings {
            patch_embedding: ckpt
                .get(&format!("{prefix}.patch_embedding.weight"), &[c, 3, p, p])?,
            class_embedding: ckpt.get_f32(&format!("{prefix}.class_embedding"), &[c])?,
            position_embedding: ckpt.get_f32(
                &format!("{prefix}.position_embedding.weight"),
                &[cfg.num_positions(), c],
            )?,
            cfg: cfg.clone(),
        })
    }

    /// `pixels [n, 3, 336, 336]` → `out [n, 577, hidden]`.
    pub fn forward(&self, pixels: &[f32], n: usize, out: &mut [f32]) {
        let (c, p, g, size) = (
            self.cfg.hidden_size,
            self.cfg.patch_size,
            self.cfg.grid(),
            self.cfg.image_size,
        );
        let t = self.cfg.num_positions();
        let kdim = 3 * p * p;

        // im2col: [n, 576, 3·14·14], column order (channel, ky, kx) = the weight's flattening.
        let mut cols = vec![0f32; n * g * g * kdim];
        cols.par_chunks_mut(kdim)
            .enumerate()
            .for_each(|(row, dst)| {
                let (b, patch) = (row / (g * g), row % (g * g));
                let (py, px) = (patch / g, patch % g);
                for ch in 0..3 {
                    for ky in 0..p {
                        let src = ((b * 3 + ch) * size + py * p + ky) * size + px * p;
                        dst[(ch * p + ky) * p..(ch * p + ky + 1) * p]
                            .copy_from_slice(&pixels[src..src + p]);
                    }
                }
            });

        for b in 0..n {
            let crop = &mut out[b * t * c..(b + 1) * t * c];
            // Row 0: CLS. Rows 1..: patches, r*24+c order (`flatten(2).transpose(1,2)`).
            crop[..c].copy_from_slice(&self.class_embedding);
            phi_kernels::cpu::gemm(
                &cols[b * g * g * kdim..],
                kdim,
                self.patch_embedding.view(),
                None,
                &mut crop[c..],
                c,
                g * g,
                c,
                kdim,
                false,
            );
            for (x, pe) in crop.iter_mut().zip(&self.position_embedding) {
                *x += pe;
            }
        }
    }
}
