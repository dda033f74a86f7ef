use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kernels(#[from] phi_kernels::Error),

    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("clip config: {0}")]
    BadConfig(String),

    #[error(
        "pixel values: expected {expected} values for {crops} crops of 3x{size}x{size}, got {got}"
    )]
    PixelShape {
        crops: usize,
        size: usize,
        expected: usize,
        got: usize,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
