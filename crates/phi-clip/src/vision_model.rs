//! `CLIPVisionTransformer` up to the hidden state Phi-3-vision reads.
//!
//! transformers' `hidden_states` has `num_layers + 1` entries: `[0]` is the embeddings after
//! `pre_layrnorm`, `[i]` the output of encoder layer `i` (1-based). Phi-3-vision takes
//! `layer_idx = -2`, i.e. entry 23 of 25 = the output of the 23rd layer, so only 23 layers are
//! loaded and run, and `post_layernorm` (which only touches the pooled CLS) is never applied.

use std::path::Path;

use phi_kernels::Checkpoint;

use crate::encoder_layer::Scratch;
use crate::{
    ClipEncoderLayer, ClipVisionConfig, ClipVisionEmbeddings, Error, LayerNorm, Result,
    PHI3V_CLIP_PREFIX,
};

/// Crops run through the tower together; bounds the scratch memory (about 25 MB per crop at
/// ViT-L size) while keeping GEMMs tall.
const CROPS_PER_BATCH: usize = 8;

#[derive(Debug, Clone)]
pub struct ClipVisionModel {
    pub embeddings: ClipVisionEmbeddings,
    pub pre_layrnorm: LayerNorm,
    /// Only the layers needed for `hidden_states[layer_idx]`.
    pub layers: Vec<ClipEncoderLayer>,
    pub cfg: ClipVisionConfig,
}

impl ClipVisionModel {
    /// Index into transformers' `hidden_states` (negative counts from the end, as in Python).
    pub fn layers_for_hidden_state(cfg: &ClipVisionConfig, layer_idx: i64) -> Result<usize> {
        let len = cfg.num_hidden_layers as i64 + 1;
        let idx = if layer_idx < 0 {
            len + layer_idx
        } else {
            layer_idx
        };
        if !(0..len).contains(&idx) {
            return Err(Error::BadConfig(format!(
                "layer_idx {layer_idx} out of range for {} layers",
                cfg.num_hidden_layers
            )));
        }
        Ok(idx as usize)
    }

    /// Loads the tower under `prefix`, keeping the first `num_layers` encoder layers.
    pub fn load(
        ckpt: &Checkpoint,
        prefix: &str,
        cfg: &ClipVisionConfig,
        num_layers: usize,
    ) -> Result<Self> {
        cfg.validate()?;
        let c = cfg.hidden_size;
        let layers = (0..num_layers.min(cfg.num_hidden_layers))
            .map(|l| ClipEncoderLayer::load(ckpt, &format!("{prefix}.encoder.layers.{l}"), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(ClipVisionModel {
            embeddings: ClipVisionEmbeddings::load(ckpt, &format!("{prefix}.embeddings"), cfg)?,
            pre_layrnorm: LayerNorm::load(
                ckpt,
                &format!("{prefix}.pre_layrnorm"),
                c,
                cfg.layer_norm_eps as f32,
            )?,
            layers,
            cfg: cfg.clone(),
        })
    }

    /// Loads the vision tower of a Phi-3-vision model directory (`config.json` + safetensors),
    /// returning the hidden state the model uses (`img_processor.layer_idx`, default -2).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Config {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let cfg = ClipVisionConfig::from_phi3v_config(&json)?;
        let layer_idx = json
            .get("img_processor")
            .and_then(|p| p.get("layer_idx"))
            .and_then(|v| v.as_i64())
            .unwrap_or(-2);
        let ckpt = Checkpoint::open(dir)?;
        let n = Self::layers_for_hidden_state(&cfg, layer_idx)?;
        Self::load(&ckpt, PHI3V_CLIP_PREFIX, &cfg, n)
    }

    /// Tokens per crop (577) and width (1024 for ViT-L).
    pub fn output_dims(&self) -> (usize, usize) {
        (self.cfg.num_positions(), self.cfg.hidden_size)
    }

    /// `pixels [n, 3, 336, 336]` → `[n, 577, hidden]`: the output of the last loaded layer,
    /// CLS first.
    pub fn forward(&self, pixels: &[f32], n: usize) -> Result<Vec<f32>> {
        self.cfg.check_pixels(pixels, n)?;
        let per_crop = 3 * self.cfg.image_size * self.cfg.image_size;
        let (t, c) = self.output_dims();
        let mut out = vec![0f32; n * t * c];
        let mut scratch = Scratch::new(CROPS_PER_BATCH.min(n.max(1)) * t, &self.cfg);
        for start in (0..n).step_by(CROPS_PER_BATCH) {
            let nb = CROPS_PER_BATCH.min(n - start);
            let xs = &mut out[start * t * c..(start + nb) * t * c];
            self.forward_batch(
                &pixels[start * per_crop..(start + nb) * per_crop],
                nb,
                xs,
                &mut scratch,
            );
        }
        Ok(out)
    }

    fn forward_batch(&self, pixels: &[f32], n: usize, xs: &mut [f32], s: &mut Scratch) {
        let (t, _) = self.output_dims();
        // [n, 577, c]: CLS + patches + positions, then pre_layrnorm.
        self.embeddings.forward(pixels, n, &mut s.embedded);
        self.pre_layrnorm.forward(&s.embedded, xs, n * t);
        for layer in &self.layers {
            layer.forward(xs, s, n, t);
        }
    }
}
