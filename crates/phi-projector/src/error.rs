#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kernels(#[from] phi_kernels::Error),

    #[error(
        "image features: expected {expected} values for {crops} crops of [577, {c}], got {got}"
    )]
    FeatureShape {
        crops: usize,
        c: usize,
        expected: usize,
        got: usize,
    },

    #[error("crop grid {h_c}x{w_c} is empty")]
    EmptyGrid { h_c: usize, w_c: usize },
}

pub type Result<T> = std::result::Result<T, Error>;
