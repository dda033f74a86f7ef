//! CLIP ViT vision tower as Phi-3-vision uses it: ViT-L/14 at 336 px, run up to the hidden state
//! the model reads (`hidden_states[-2]`, the output of the 23rd of 24 layers), no post-norm.
//!
//! Mirrors transformers' `modeling_clip.py` (`CLIPVisionEmbeddings`, `CLIPAttention`,
//! `CLIPMLP`, `CLIPEncoderLayer`, `CLIPVisionTransformer`), one file per module.
//!
//! ```no_run
//! # fn main() -> Result<(), phi_clip::Error> {
//! let clip = phi_clip::ClipVisionModel::from_model_dir(std::path::Path::new("Phi-3-vision-128k-instruct"))?;
//! let crops = vec![0f32; 2 * 3 * 336 * 336];      // [n, 3, 336, 336], normalised
//! let hidden = clip.forward(&crops, 2)?;            // [n, 577, 1024]
//! # Ok(()) }
//! ```

mod attention;
mod config;
#[cfg(feature = "cuda")]
mod cuda;
mod embeddings;
mod encoder_layer;
mod error;
mod mlp;
mod vision_model;

pub use attention::ClipAttention;
pub use config::{ClipVisionConfig, PHI3V_CLIP_PREFIX};
#[cfg(feature = "cuda")]
pub use cuda::ClipVisionModelCuda;
pub use embeddings::ClipVisionEmbeddings;
pub use encoder_layer::ClipEncoderLayer;
pub use error::{Error, Result};
pub use mlp::ClipMlp;
pub use vision_model::ClipVisionModel;

pub use phi_kernels::{LayerNorm, Linear};
