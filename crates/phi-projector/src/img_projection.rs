//! `img_projection = Sequential(Linear(4c → hidden), GELU(), Linear(hidden → hidden))`; the
//! checkpoint indices are 0 and 2 (1 is the parameter-free GELU, exact erf form).

use phi_kernels::cpu::{ARows, Activation};
use phi_kernels::{Checkpoint, Linear};

use crate::Result;

#[derive(Debug, Clone)]
pub struct ImgProjection {
    /// `img_projection.0`
    pub fc0: Linear,
    /// `img_projection.2`
    pub fc2: Linear,
}

impl ImgProjection {
    pub fn load(ckpt: &Checkpoint, prefix: &str, in_dim: usize, hidden: usize) -> Result<Self> {
        Ok(ImgProjection {
            fc0: Linear::load(ckpt, &format!("{prefix}.0"), in_dim, hidden, true)?,
            fc2: Linear::load(ckpt, &format!("{prefix}.2"), hidden, hidden, true)?,
        })
    }

    /// `xs [t, 4c]` → `[t, hidden]`.
    pub fn forward(&self, xs: &[f32], t: usize) -> Vec<f32> {
        self.forward_rows(ARows::dense(xs, self.fc0.in_features), t)
    }

    /// The `t` rows of `xs` (`4c` wide, made while fc0 packs them: see [`ARows`]) →
    /// `[t, hidden]`.
    pub fn forward_rows(&self, xs: ARows<'_>, t: usize) -> Vec<f32> {
        let h = self.fc0.out_features;
        let mut mid = vec![0f32; t * h];
        self.fc0
            .forward_rows_into(xs, &mut mid, h, t, false, Activation::GeluErf);
        let mut out = vec![0f32; t * h];
        self.fc2.forward_into(&mid, h, &mut out, h, t, false);
        out
    }
}
