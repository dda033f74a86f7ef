//! The Phi-3-vision processor, exact to the reference Python (`image_processing_phi3_v.py` and
//! `processing_phi3_v.py` of `microsoft/Phi-3-vision-128k-instruct`, run with Pillow 10.3.0,
//! torch 2.3.0, torchvision 0.18.0 and transformers 4.40.2):
//!
//! ```text
//! file ─ decode (Pillow's Image.open(..).convert("RGB")) ─▶ RgbImage
//!      ─ HD transform (transpose, Pillow bilinear resize, white pad, transpose back) ─▶ HD RgbImage [H, W]
//!      ─ ToTensor + Normalize ─▶ [3, H, W] f32
//!      ─ bicubic to 336×336 (global view) + 336×336 crops + zero crops ─▶ [num_crops+1, 3, 336, 336]
//! prompt ─ chat template (minijinja) ─ split on <|image_k|>, one BOS per chunk ─▶ ids with -k runs
//! ```
//!
//! Every stage is a plain function of its own module so that parity checks can compare each one
//! with the Python dumps.

pub mod bicubic;
pub mod hd_transform;
pub mod image_io;
pub mod image_processor;
pub mod normalize;
pub mod prompt;
pub mod resize;
pub mod streamer;

use std::path::PathBuf;

pub use bicubic::bicubic_resize_chw;
pub use hd_transform::{hd_transform, hd_transform_size, transpose};
pub use image_io::{
    decode_image, decode_image_bytes, decode_image_bytes_limited, RgbImage, MAX_IMAGE_PIXELS,
};
pub use image_processor::{
    calc_num_image_tokens_from_image_size, num_image_tokens, ImageProcessor, ProcessedImage,
    MAX_NUM_CROPS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
};
pub use normalize::{normalize_table, to_tensor_normalize};
pub use prompt::{ChatMessage, PromptProcessor};
pub use resize::resize_bilinear;
pub use streamer::TextStreamer;

/// Side of one crop and of the global view (CLIP ViT-L/14 at 336 px).
pub const CROP_SIZE: usize = 336;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{name}: unsupported image format ({detail})")]
    UnsupportedFormat { name: String, detail: String },

    #[error("{name}: cannot decode image: {detail}")]
    Decode { name: String, detail: String },

    #[error("{name}: image has zero size ({width}x{height})")]
    EmptyImage {
        name: String,
        width: usize,
        height: usize,
    },

    #[error(
        "{name}: image is {width}x{height} = {pixels} pixels, over the limit of {limit} \
         (decompression bomb guard, as Pillow)"
    )]
    TooLarge {
        name: String,
        width: usize,
        height: usize,
        pixels: u64,
        limit: u64,
    },

    #[error("{arg}: {reason}")]
    InvalidArgument { arg: String, reason: String },

    #[error("image {width}x{height}: {reason}")]
    Transform {
        width: usize,
        height: usize,
        reason: String,
    },

    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("chat template: {0}")]
    Template(String),

    #[error("prompt: {0}")]
    Prompt(String),
}

pub type Result<T> = std::result::Result<T, Error>;
