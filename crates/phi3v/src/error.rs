//! Errors of the phi3v library. The binary wraps them with `anyhow`.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kernels(#[from] phi_kernels::Error),
    #[error(transparent)]
    Clip(#[from] phi_clip::Error),
    #[error(transparent)]
    Projector(#[from] phi_projector::Error),
    #[error(transparent)]
    Decoder(#[from] phi_decoder::Error),
    #[error(transparent)]
    Processor(#[from] crate::processor::Error),

    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("{0}")]
    Input(String),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("writing dump {path}: {msg}")]
    Dump { path: PathBuf, msg: String },
}

pub type Result<T> = std::result::Result<T, Error>;
