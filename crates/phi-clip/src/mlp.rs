//! `CLIPMLP`: fc1 → quick_gelu → fc2.

use phi_kernels::cpu::Activation;
use phi_kernels::Checkpoint;

use crate::{ClipVisionConfig, Linear, Result};

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

    /// `residual [rows, c] += fc2(quick_gelu(fc1(xs)))`, scratch `hidden [rows, intermediate]`.
    pub fn forward_residual(
        &self,
        xs: &[f32],
        residual: &mut [f32],
        hidden: &mut [f32],
        rows: usize,
    ) {
        let (c, i) = (self.fc1.in_features, self.fc1.out_features);
        self.fc1
            .forward_act_into(xs, c, hidden, i, rows, Activation::QuickGelu);
        self.fc2.forward_into(hidden, i, residual, c, rows, true);
    }
}
