//! `Phi3DecoderLayer`, pre-norm:
//! `h = x + o_proj(attn(input_layernorm(x)))`, `y = h + down_proj(mlp(post_attention_layernorm(h)))`.

use phi_kernels::{Checkpoint, RmsNorm};

use crate::{KvCache, Phi3Attention, Phi3Config, Phi3Mlp, Result};

#[derive(Debug, Clone)]
pub struct Phi3DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Phi3Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Phi3Mlp,
}

/// Activations of one forward call, reused across layers (the norms are never written out:
/// they run inside the packing of the GEMMs that read them).
pub(crate) struct Scratch {
    pub qkv: Vec<f32>,
    pub ctx: Vec<f32>,
    pub gate_up: Vec<f32>,
    pub act: Vec<f32>,
}

impl Scratch {
    pub fn new(t: usize, cfg: &Phi3Config) -> Self {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Scratch {
            qkv: vec![0.0; t * 3 * h],
            ctx: vec![0.0; t * h],
            gate_up: vec![0.0; t * 2 * i],
            act: vec![0.0; t * i],
        }
    }
}

impl Phi3DecoderLayer {
    pub fn load(ckpt: &Checkpoint, prefix: &str, cfg: &Phi3Config) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps as f32);
        Ok(Phi3DecoderLayer {
            input_layernorm: RmsNorm::load(ckpt, &format!("{prefix}.input_layernorm"), h, eps)?,
            self_attn: Phi3Attention::load(ckpt, &format!("{prefix}.self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(
                ckpt,
                &format!("{prefix}.post_attention_layernorm"),
                h,
                eps,
            )?,
            mlp: Phi3Mlp::load(ckpt, &format!("{prefix}.mlp"), cfg)?,
        })
    }

    /// `xs [t, h]` updated in place.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward(
        &self,
        xs: &mut [f32],
        s: &mut Scratch,
        cos: &[f32],
        sin: &[f32],
        cache: &mut KvCache,
        layer: usize,
        t: usize,
    ) {
        // h = x + o_proj(attn(input_layernorm(x)))
        self.self_attn.forward_residual(
            &self.input_layernorm,
            xs,
            &mut s.qkv,
            &mut s.ctx,
            cos,
            sin,
            cache,
            layer,
            t,
        );
        // y = h + down_proj(mlp(post_attention_layernorm(h)))
        self.mlp.forward_residual(
            &self.post_attention_layernorm,
            xs,
            &mut s.gate_up,
            &mut s.act,
            t,
        );
    }

    /// One new position for each sequence of `caches` (row `r` of `xs [b, h]` against cache
    /// `r`), in place.
    pub(crate) fn forward_batch(
        &self,
        xs: &mut [f32],
        s: &mut Scratch,
        cos: &[f32],
        sin: &[f32],
        caches: &mut [&mut KvCache],
        layer: usize,
    ) {
        let b = caches.len();
        self.self_attn.forward_residual_batch(
            &self.input_layernorm,
            xs,
            &mut s.qkv,
            &mut s.ctx,
            cos,
            sin,
            caches,
            layer,
        );
        self.mlp.forward_residual(
            &self.post_attention_layernorm,
            xs,
            &mut s.gate_up,
            &mut s.act,
            b,
        );
    }
}
