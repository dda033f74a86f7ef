//! Tensor kernels for the phi3v engine.
//!
//! This crate knows nothing about Phi-3-vision: it offers plain functions over `f32` slices
//! (activations) and [`Weight`] views (weights as stored on disk: f32, bf16 or f16), plus
//! [`Checkpoint`], a memory-mapped safetensors reader.
//!
//! Every op lives in `src/cpu/<op>/` with one module per instruction set (`scalar`, `avx2`,
//! `avx512`) and a `mod.rs` that holds the public entry point, the dispatch and the plain
//! `<op>_ref` twin that tests compare against. The instruction set is picked once per process
//! ([`isa::active`]); `PHI_KERNELS_ISA=scalar|avx2|avx512` forces one, and every op also has an
//! `<op>_with(isa, ..)` form so tests can run every path in one process.

pub mod checkpoint;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod huge;
pub mod isa;
pub mod nn;

pub use checkpoint::{Checkpoint, Residency, Tensor};
pub use dtype::{DType, Weight};
pub use error::{Error, Result};
pub use huge::HugeBuf;
pub use isa::Isa;
pub use nn::{LayerNorm, Linear, RmsNorm};
