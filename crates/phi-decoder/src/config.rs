//! `config.json` of Phi-3-vision (`Phi3VConfig`), decoder part. Unknown keys are ignored unless
//! they change the maths, in which case loading fails: `rope_scaling.type` other than
//! su/longrope, an activation other than silu, grouped-query attention, partial rotary.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct RopeScaling {
    #[serde(rename = "type", alias = "rope_type")]
    pub kind: String,
    pub short_factor: Vec<f64>,
    pub long_factor: Vec<f64>,
}

/// Either a single id or a list (Phi-3.5 configs use both forms).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Phi3Config {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default = "d_act")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "d_theta")]
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn d_act() -> String {
    "silu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_theta() -> f64 {
    10000.0
}

impl Phi3Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.into(),
            msg: e.to_string(),
        })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.into(),
            msg: e.to_string(),
        })?;
        Self::from_json(&json).map_err(|e| match e {
            Error::BadConfig(msg) => Error::Config {
                path: path.into(),
                msg,
            },
            other => other,
        })
    }

    pub fn from_json(json: &serde_json::Value) -> Result<Self> {
        let cfg: Phi3Config =
            serde_json::from_value(json.clone()).map_err(|e| Error::BadConfig(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::BadConfig(m));
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if let Some(kv) = self.num_key_value_heads {
            if kv != self.num_attention_heads {
                return bad(format!(
                    "num_key_value_heads {kv} != num_attention_heads {}: grouped-query attention is not supported",
                    self.num_attention_heads
                ));
            }
        }
        if self.hidden_act != "silu" {
            return bad(format!(
                "hidden_act `{}` is not supported (Phi-3 uses silu)",
                self.hidden_act
            ));
        }
        if let Some(f) = self.partial_rotary_factor {
            if f != 1.0 {
                return bad(format!("partial_rotary_factor {f} is not supported"));
            }
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "head_dim {} must be even for rotary embeddings",
                self.head_dim()
            ));
        }
        if let Some(rs) = &self.rope_scaling {
            if rs.kind != "su" && rs.kind != "longrope" {
                return bad(format!(
                    "rope_scaling.type `{}` is not supported (expected su or longrope)",
                    rs.kind
                ));
            }
            let half = self.head_dim() / 2;
            for (name, f) in [
                ("short_factor", &rs.short_factor),
                ("long_factor", &rs.long_factor),
            ] {
                if f.len() != half {
                    return bad(format!(
                        "rope_scaling.{name} has {} entries, expected head_dim/2 = {half}",
                        f.len()
                    ));
                }
            }
            if self.original_max_position_embeddings.is_none() {
                return bad(
                    "rope_scaling is set but original_max_position_embeddings is missing".into(),
                );
            }
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Stop ids from the config (`eos_token_id`, int or list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(|e| e.to_vec())
            .unwrap_or_default()
    }
}
