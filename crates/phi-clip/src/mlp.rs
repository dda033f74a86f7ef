//! `CLIPMLP`: fc1 → quick_gelu → fc2.

use phi_kernels::cpu::Activation;
use phi_kernels::Checkpoint;

use crate::{ClipVisionConfig, LayerNorm, Linear, Result};

#[derive(Debug, Clone)]
pub struct ClipMlp {
    pub fc1: Linear,
    pub fc2: Linear,
}

impl ClipMlp {
    pub fn load(ckpt: &Checkpoint, prefix: &str, cfg: &ClipVisionConfig) -> Result<Self> {
        let (c, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(ClipMlp {
            fc1: Linear::load(ckpt, &format!("{prefix}.fc1"), c, i, true)?,
            fc2: Linear::load(ckpt, &format!("{prefix}.fc2"), i, c, true)?,
        })
    }

    /// `xs [rows, c] += fc2(quick_gelu(fc1(norm(xs))))`, scratch `hidden [rows, intermediate]`;
    /// the norm runs inside fc1's packing, bias and QuickGELU in its epilogue.
    pub fn forward_residual(
        &self,
        norm: &LayerNorm,
        xs: &mut [f32],
        hidden: &mut [f32],
        rows: usize,
    ) {
        let (c, i) = (self.fc1.in_features, self.fc1.out_features);
        self.fc1
            .forward_rows_into(norm.rows(xs), hidden, i, rows, false, Activation::QuickGelu);
        self.fc2.forward_into(hidden, i, xs, c, rows, true);
    }
}
