//! `Phi3VForCausalLM` assembled from the layer crates: CLIP tower, image projector, decoder,
//! loaded from one Hugging Face model directory.

use std::path::{Path, PathBuf};

use phi_clip::{ClipVisionConfig, ClipVisionModel, PHI3V_CLIP_PREFIX};
use phi_decoder::{Phi3Config, Phi3Model};
use phi_kernels::{Checkpoint, DType, Residency};
use phi_projector::{ImageProjector, PHI3V_EMBED_PREFIX};

use crate::{Error, Result};

/// The vision-embedding settings of `config.json` (`embd_layer`, `img_processor`), checked
/// against what this engine implements.
#[derive(Debug, Clone)]
pub struct VisionSettings {
    pub clip: ClipVisionConfig,
    /// Index into CLIP's `hidden_states` (default -2).
    pub layer_idx: i64,
    pub image_dim_out: usize,
}

impl VisionSettings {
    fn from_json(json: &serde_json::Value, path: &Path) -> Result<Self> {
        let bad = |msg: String| Error::Config {
            path: path.to_path_buf(),
            msg,
        };
        let clip = ClipVisionConfig::from_phi3v_config(json).map_err(|e| bad(e.to_string()))?;
        let proc_ = json.get("img_processor");
        let layer_idx = proc_
            .and_then(|p| p.get("layer_idx"))
            .and_then(|v| v.as_i64())
            .unwrap_or(-2);
        if let Some(tf) = proc_
            .and_then(|p| p.get("type_feature"))
            .and_then(|v| v.as_str())
        {
            if tf != "patch" {
                return Err(bad(format!(
                    "img_processor.type_feature `{tf}` is not supported (expected patch)"
                )));
            }
        }
        let image_dim_out = proc_
            .and_then(|p| p.get("image_dim_out"))
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .unwrap_or(clip.hidden_size);
        if image_dim_out != clip.hidden_size {
            return Err(bad(format!(
                "img_processor.image_dim_out {image_dim_out} differs from the CLIP hidden size {}",
                clip.hidden_size
            )));
        }
        if let Some(e) = json.get("embd_layer") {
            let s = |k: &str| e.get(k).and_then(|v| v.as_str());
            let b = |k: &str| e.get(k).and_then(|v| v.as_bool());
            if let Some(o) = s("hd_transform_order") {
                if o != "sub_glb" {
                    return Err(bad(format!(
                        "embd_layer.hd_transform_order `{o}` is not supported (expected sub_glb)"
                    )));
                }
            }
            if let Some(p) = s("projection_cls") {
                if p != "mlp" {
                    return Err(bad(format!(
                        "embd_layer.projection_cls `{p}` is not supported (expected mlp)"
                    )));
                }
            }
            if b("use_hd_transform") == Some(false) || b("with_learnable_separator") == Some(false)
            {
                return Err(bad("embd_layer: only use_hd_transform = with_learnable_separator = true is supported".into()));
            }
        }
        Ok(VisionSettings {
            clip,
            layer_idx,
            image_dim_out,
        })
    }
}

/// The whole model. Weights keep their storage dtype, memory-mapped or read into memory.
pub struct Phi3V {
    pub clip: ClipVisionModel,
    pub projector: ImageProjector,
    pub decoder: Phi3Model,
    pub vision: VisionSettings,
    pub dir: PathBuf,
}

impl Phi3V {
    /// Loads with f32 products (exact to the f32 reference).
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, DType::F32)
    }

    /// Loads with the products of every Linear layer in `precision` (f32 or bf16; see
    /// `Checkpoint::with_precision`). Norm statistics, softmax and attention stay f32.
    /// The weights stay memory-mapped.
    pub fn load_with(dir: &Path, precision: DType) -> Result<Self> {
        Self::load_held(dir, precision, Residency::Mapped)
    }

    /// [`Phi3V::load_with`], the checkpoint's bytes held as `residency` says (mapped, or read
    /// into memory, which CPU decoding streams faster).
    pub fn load_held(dir: &Path, precision: DType, residency: Residency) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let decoder_cfg = Phi3Config::from_json(&json).map_err(|e| Error::Config {
            path: path.clone(),
            msg: e.to_string(),
        })?;
        let vision = VisionSettings::from_json(&json, &path)?;

        let ckpt = Checkpoint::open_with(dir, residency)?.with_precision(precision)?;
        let n_layers = ClipVisionModel::layers_for_hidden_state(&vision.clip, vision.layer_idx)?;
        let clip = ClipVisionModel::load(&ckpt, PHI3V_CLIP_PREFIX, &vision.clip, n_layers)?;
        let projector = ImageProjector::load(
            &ckpt,
            PHI3V_EMBED_PREFIX,
            vision.image_dim_out,
            decoder_cfg.hidden_size,
        )?;
        let decoder = Phi3Model::load(&ckpt, &decoder_cfg)?;
        Ok(Phi3V {
            clip,
            projector,
            decoder,
            vision,
            dir: dir.to_path_buf(),
        })
    }
}
