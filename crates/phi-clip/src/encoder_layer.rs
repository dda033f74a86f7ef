//! `CLIPEncoderLayer`, pre-norm:
//! `x = x + attn(LN1(x))`, then `x = x + mlp(LN2(x))`.

use phi_kernels::Checkpoint;

use crate::{ClipAttention, ClipMlp, ClipVisionConfig, LayerNorm, Result};

#[derive(Debug, Clone)]
pub struct ClipEncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: ClipAttention,
    pub layer_norm2: LayerNorm,
    pub mlp: ClipMlp,
}

/// Scratch buffers reused across layers (`embedded`: the patch embeddings, before
/// `pre_layrnorm` writes the residual stream).
pub(crate) struct Scratch {
    pub embedded: Vec<f32>,
    pub qkv: Vec<f32>,
    pub ctx: Vec<f32>,
    pub hidden: Vec<f32>,
}

impl Scratch {
    pub fn new(rows: usize, cfg: &ClipVisionConfig) -> Self {
        let c = cfg.hidden_size;
        Scratch {
            embedded: vec![0.0; rows * c],
            qkv: vec![0.0; rows * 3 * c],
            ctx: vec![0.0; rows * c],
            hidden: vec![0.0; rows * cfg.intermediate_size],
        }
    }
}

impl ClipEncoderLayer {
    pub fn load(ckpt: &Checkpoint, prefix: &str, cfg: &ClipVisionConfig) -> Result<Self> {
        let (c, eps) = (cfg.hidden_size, cfg.layer_norm_eps as f32);
        Ok(ClipEncoderLayer {
            layer_norm1: LayerNorm::load(ckpt, &format!("{prefix}.layer_norm1"), c, eps)?,
            self_attn: ClipAttention::load(ckpt, &format!("{prefix}.self_attn"), cfg)?,
            layer_norm2: LayerNorm::load(ckpt, &format!("{prefix}.layer_norm2"), c, eps)?,
            mlp: ClipMlp::load(ckpt, &format!("{prefix}.mlp"), cfg)?,
        })
    }

    /// `xs [n, t, c]` updated in place. The norms are not written out: each runs inside the
    /// packing of the GEMMs that read it.
    pub(crate) fn forward(&self, xs: &mut [f32], s: &mut Scratch, n: usize, t: usize) {
        // x = x + attn(LN1(x))
        self.self_attn
            .forward_residual(&self.layer_norm1, xs, &mut s.qkv, &mut s.ctx, n, t);
        // x = x + mlp(LN2(x))
        self.mlp
            .forward_residual(&self.layer_norm2, xs, &mut s.hidden, n * t);
    }
}
