//! Phi-3-vision / Phi-3.5-vision on our own kernels: checkpoint loading, the processor
//! (images, tokenizer, chat template), the pipeline and generation. The `phi3v` binary is a
//! thin command line over [`Pipeline`].

pub mod dump;
mod error;
pub mod feature_cache;
pub mod gpu;
pub mod locate;
mod model;
pub mod parity;
pub mod pipeline;
pub mod processor;
pub mod sampling;
#[cfg(feature = "server")]
pub mod server;
pub mod trace;

pub use error::{Error, Result};
pub use model::{Phi3V, VisionSettings};
/// How the checkpoint's bytes are held (mapped, or read into memory): see [`Pipeline::load_held`].
pub use phi_kernels::Residency;
pub use pipeline::{
    Choice, Decoding, Fed, GenerateOptions, Generation, Pipeline, Prepared, Session, Step,
};
