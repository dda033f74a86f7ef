use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kernels(#[from] phi_kernels::Error),

    #[error("{path}: {msg}")]
    Config { path: PathBuf, msg: String },

    #[error("config.json: {0}")]
    BadConfig(String),

    #[error("token id {id} at position {pos} is outside the vocabulary of {vocab}")]
    TokenOutOfRange { id: i64, pos: usize, vocab: usize },

    #[error("sequence of {needed} positions exceeds {limit} ({what})")]
    ContextOverflow {
        needed: usize,
        limit: usize,
        what: &'static str,
    },

    #[error("input embeddings: expected {expected} values ({t} x {hidden}), got {got}")]
    EmbedShape {
        t: usize,
        hidden: usize,
        expected: usize,
        got: usize,
    },
}

pub type Result<T> = std::result::Result<T, Error>;
