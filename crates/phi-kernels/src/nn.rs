//! Parameter holders for the two layer kinds every model crate uses, so each model file only
//! names its checkpoint tensors. They own no activations; `forward` calls the dispatched kernels.

use crate::cpu::gemm::{gemm_fused, ARows, GemmOpts};
use crate::cpu::Activation;
use crate::{DType, Result};

/// A Linear layer's parameters: weight `[out, in]` in storage dtype, bias widened to f32, and
/// the precision of its products (the checkpoint's, see `Checkpoint::with_precision`).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: crate::Tensor,
    pub bias: Option<Vec<f32>>,
    pub in_features: usize,
    pub out_features: usize,
    pub precision: DType,
}

impl Linear {
    pub fn load(
        ckpt: &crate::Checkpoint,
        prefix: &str,
        in_f: usize,
        out_f: usize,
        bias: bool,
    ) -> Result<Self> {
        let mut weight = ckpt.get(&format!("{prefix}.weight"), &[out_f, in_f])?;
        if ckpt.precision() == DType::BF16 {
            // bf16 checkpoints (all real ones) stay mapped; others are rounded once, here.
            weight = weight.to_bf16();
        }
        let bias = if bias {
            Some(ckpt.get_f32(&format!("{prefix}.bias"), &[out_f])?)
        } else {
            None
        };
        Ok(Linear {
            weight,
            bias,
            in_features: in_f,
            out_features: out_f,
            precision: ckpt.precision(),
        })
    }

    /// Bytes of the weight as stored (what one GEMV streams from memory).
    pub fn weight_bytes(&self) -> usize {
        self.weight.len() * self.weight.dtype().size()
    }

    /// `out[rows, out_f] (+)= xs[rows, in_f] · Wᵀ + b`, with leading dimensions for fused buffers.
    pub fn forward_into(
        &self,
        xs: &[f32],
        ld_x: usize,
        out: &mut [f32],
        ld_out: usize,
        rows: usize,
        accumulate: bool,
    ) {
        let a = ARows::dense(xs, ld_x);
        self.gemm(a, out, ld_out, rows, accumulate, Activation::Identity)
    }

    /// `out[rows, out_f] = act(xs[rows, in_f] · Wᵀ + b)`, the activation fused into the GEMM's
    /// epilogue (applied to each output tile while it is hot).
    pub fn forward_act_into(
        &self,
        xs: &[f32],
        ld_x: usize,
        out: &mut [f32],
        ld_out: usize,
        rows: usize,
        activation: Activation,
    ) {
        self.forward_rows_into(ARows::dense(xs, ld_x), out, ld_out, rows, false, activation)
    }

    /// `out[rows, out_f] (+)= act(A · Wᵀ + b)` with A's rows made while they are packed (a
    /// norm, or the 2×2 merge: see [`ARows`]); `activation` must be Identity with `accumulate`.
    pub fn forward_rows_into(
        &self,
        a: ARows<'_>,
        out: &mut [f32],
        ld_out: usize,
        rows: usize,
        accumulate: bool,
        activation: Activation,
    ) {
        self.gemm(a, out, ld_out, rows, accumulate, activation)
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        a: ARows<'_>,
        out: &mut [f32],
        ld_out: usize,
        rows: usize,
        accumulate: bool,
        activation: Activation,
    ) {
        let opts = GemmOpts {
            bias: self.bias.as_deref(),
            activation,
            accumulate,
            precision: self.precision,
        };
        gemm_fused(
            a,
            self.weight.view(),
            out,
            ld_out,
            rows,
            self.out_features,
            self.in_features,
            &opts,
            None,
        );
    }
}

/// LayerNorm parameters widened to f32.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(ckpt: &crate::Checkpoint, prefix: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(LayerNorm {
            weight: ckpt.get_f32(&format!("{prefix}.weight"), &[dim])?,
            bias: ckpt.get_f32(&format!("{prefix}.bias"), &[dim])?,
            eps,
        })
    }

    /// `LN(xs)` as the A operand of the next GEMM, computed while it packs (see [`ARows`]).
    pub fn rows<'a>(&'a self, xs: &'a [f32]) -> ARows<'a> {
        ARows::LayerNorm {
            x: xs,
            weight: &self.weight,
            bias: &self.bias,
            eps: self.eps,
        }
    }

    /// `out[rows, dim] = LN(xs[rows, dim])`.
    pub fn forward(&self, xs: &[f32], out: &mut [f32], rows: usize) {
        crate::cpu::layer_norm(
            xs,
            &self.weight,
            &self.bias,
            self.eps,
            out,
            rows,
            self.weight.len(),
        );
    }
}

/// RMSNorm parameters widened to f32 (Phi-3 style, no bias).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    pub weight: Vec<f32>,
    pub eps: f32,
}

impl RmsNorm {
    pub fn load(ckpt: &crate::Checkpoint, prefix: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(RmsNorm {
            weight: ckpt.get_f32(&format!("{prefix}.weight"), &[dim])?,
            eps,
        })
    }

    /// `RMSNorm(xs)` as the A operand of the next GEMM, computed while it packs (see [`ARows`]).
    pub fn rows<'a>(&'a self, xs: &'a [f32]) -> ARows<'a> {
        ARows::RmsNorm {
            x: xs,
            weight: &self.weight,
            eps: self.eps,
        }
    }

    /// `out[rows, dim] = RMSNorm(xs[rows, dim])`.
    pub fn forward(&self, xs: &[f32], out: &mut [f32], rows: usize) {
        crate::cpu::rms_norm(xs, &self.weight, self.eps, out, rows, self.weight.len());
    }
}
