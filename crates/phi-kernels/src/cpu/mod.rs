//! CPU kernels. One folder per op; each `mod.rs` holds the entry point, the dispatch over
//! [`Isa`](crate::Isa) and the plain `_ref` twin.

pub mod activation;
pub mod attention;
pub mod embedding;
pub mod gemm;
pub mod layer_norm;
pub mod merge_2x2;
pub mod rms_norm;
pub mod rope;
pub mod softmax;

pub use activation::{gelu_erf, gelu_erf_ref, quick_gelu, quick_gelu_ref, silu_mul, silu_mul_ref};
pub use attention::{attention, attention_ref, AttnDims, AttnLayout};
pub use embedding::{embedding, embedding_ref};
pub use gemm::{gemm, gemm_ref};
pub use layer_norm::{layer_norm, layer_norm_ref};
pub use merge_2x2::{merge_2x2, merge_2x2_ref};
pub use rms_norm::{rms_norm, rms_norm_ref};
pub use rope::{rope, rope_ref};
pub use softmax::{softmax, softmax_ref};
