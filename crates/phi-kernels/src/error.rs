//! One error type for the kernel crate.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: not a valid safetensors file: {msg}")]
    BadSafetensors { path: PathBuf, msg: String },

    #[error("{path}: bad index file: {msg}")]
    BadIndex { path: PathBuf, msg: String },

    #[error("{origin}: tensor `{name}` not found in the checkpoint")]
    MissingTensor { origin: PathBuf, name: String },

    #[error("{file}: tensor `{name}`: expected shape {expected:?}, found {got:?}")]
    ShapeMismatch {
        file: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    #[error("tensor `{name}`: unsupported dtype {dtype} (expected F32, BF16 or F16)")]
    UnsupportedDType { name: String, dtype: String },

    #[error("unknown instruction set `{0}` in PHI_KERNELS_ISA (expected scalar, avx2 or avx512)")]
    UnknownIsa(String),

    #[error("{0}: unsupported")]
    Unsupported(String),

    #[error("instruction set {0:?} is not supported by this CPU")]
    IsaUnavailable(crate::Isa),

    /// No usable GPU: no CUDA driver library, no device, or a build without the `cuda` feature.
    #[error("no CUDA device: {0}")]
    NoGpu(String),

    /// A CUDA driver call or kernel launch failed; `what` names the call or kernel.
    #[error("CUDA: {what}: {msg}")]
    Cuda { what: String, msg: String },

    /// Arguments a CUDA kernel cannot take (alignment, sizes), named.
    #[error("CUDA kernel {kernel}: {msg}")]
    CudaArgs { kernel: &'static str, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;
