//! The Phi-3-mini decoder of Phi-3-vision: 32 pre-norm layers with fused `qkv_proj` and
//! `gate_up_proj`, LongRoPE ("su"/"longrope") with mscale, RMSNorm, a KV cache.
//!
//! Mirrors transformers' `modeling_phi3.py` (4.40) and the Phi-3-vision remote code's
//! `modeling_phi3_v.py`, one file per module: `rope.rs` (`Phi3SuScaledRotaryEmbedding`),
//! `attention.rs` (`Phi3Attention`), `mlp.rs` (`Phi3MLP`), `decoder_layer.rs`
//! (`Phi3DecoderLayer`), `model.rs` (`Phi3Model` + `lm_head`).

mod attention;
mod config;
#[cfg(feature = "cuda")]
mod cuda;
mod decoder_layer;
mod error;
mod kv_cache;
mod mlp;
mod model;
mod rope;

pub use attention::Phi3Attention;
pub use config::{Phi3Config, RopeScaling};
#[cfg(feature = "cuda")]
pub use cuda::{KvCacheCuda, Phi3ModelCuda};
pub use decoder_layer::Phi3DecoderLayer;
pub use error::{Error, Result};
pub use kv_cache::KvCache;
pub use mlp::Phi3Mlp;
pub use model::{Logits, Phi3Model};
pub use rope::{RopeFactors, RotaryEmbedding};
