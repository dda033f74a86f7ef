//! CLIP vision configuration. Phi-3-vision hard-codes ViT-L/14-336 in its remote code; this
//! project also reads an optional `img_processor.clip_config` object from `config.json` (any of
//! `hidden_size`, `intermediate_size`, `num_hidden_layers`, `num_attention_heads`,
//! `layer_norm_eps`) so small test checkpoints can shrink the tower. Image 336 and patch 14 stay.

use serde::Deserialize;

use crate::{Error, Result};

/// Where Phi-3-vision checkpoints keep the tower.
pub const PHI3V_CLIP_PREFIX: &str = "model.vision_embed_tokens.img_processor.vision_model";

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClipVisionConfig {
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    #[serde(skip, default = "d_image")]
    pub image_size: usize,
    #[serde(skip, default = "d_patch")]
    pub patch_size: usize,
}

fn d_hidden() -> usize {
    1024
}
fn d_inter() -> usize {
    4096
}
fn d_layers() -> usize {
    24
}
fn d_heads() -> usize {
    16
}
fn d_eps() -> f64 {
    1e-5
}
fn d_image() -> usize {
    336
}
fn d_patch() -> usize {
    14
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self::vit_l14_336()
    }
}

impl ClipVisionConfig {
    /// `openai/clip-vit-large-patch14-336`, the tower of every released Phi-3-vision checkpoint.
    pub fn vit_l14_336() -> Self {
        ClipVisionConfig {
            hidden_size: d_hidden(),
            intermediate_size: d_inter(),
            num_hidden_layers: d_layers(),
            num_attention_heads: d_heads(),
            layer_norm_eps: d_eps(),
            image_size: d_image(),
            patch_size: d_patch(),
        }
    }

    /// Reads `img_processor.clip_config` from a Phi-3-vision `config.json` value (absent keys
    /// keep the ViT-L/14-336 values).
    pub fn from_phi3v_config(config: &serde_json::Value) -> Result<Self> {
        let cfg = match config
            .get("img_processor")
            .and_then(|p| p.get("clip_config"))
        {
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|e| Error::BadConfig(format!("img_processor.clip_config: {e}")))?,
            None => Self::vit_l14_336(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        if self.hidden_size == 0
            || self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::BadConfig(format!(
                "hidden_size {} must be a positive multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.num_hidden_layers < 2 {
            return Err(Error::BadConfig(format!(
                "num_hidden_layers {} < 2: Phi-3-vision reads hidden_states[-2]",
                self.num_hidden_layers
            )));
        }
        if self.intermediate_size == 0 {
            return Err(Error::BadConfig(
                "intermediate_size must be positive".into(),
            ));
        }
        Ok(())
    }

    /// Checks that `pixels` holds `n` crops of `[3, image_size, image_size]`.
    pub fn check_pixels(&self, pixels: &[f32], n: usize) -> crate::Result<()> {
        let size = self.image_size;
        let expected = n * 3 * size * size;
        if pixels.len() != expected {
            return Err(crate::Error::PixelShape {
                crops: n,
                size,
                expected,
                got: pixels.len(),
            });
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Patches per side: 336 / 14 = 24.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens per crop: 24² patches + CLS = 577.
    pub fn num_positions(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}
