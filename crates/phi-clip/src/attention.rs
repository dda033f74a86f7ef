//! `CLIPAttention`: separate q/k/v projections with bias, 16 heads of 64, no mask, then
//! `out_proj`. The three projections write column slices of one `[rows, 3·hidden]` buffer so the
//! attention kernel reads them in place.

use phi_kernels::cpu::Activation::Identity;
use phi_kernels::cpu::{attention, AttnDims, AttnLayout};
use phi_kernels::Checkpoint;

use crate::{ClipVisionConfig, LayerNorm, Linear, Result};

#[derive(Debug, Clone)]
pub struct ClipAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    pub fn load(ckpt: &Checkpoint, prefix: &str, cfg: &ClipVisionConfig) -> Result<Self> {
        let c = cfg.hidden_size;
        Ok(ClipAttention {
            q_proj: Linear::load(ckpt, &format!("{prefix}.q_proj"), c, c, true)?,
            k_proj: Linear::load(ckpt, &format!("{prefix}.k_proj"), c, c, true)?,
            v_proj: Linear::load(ckpt, &format!("{prefix}.v_proj"), c, c, true)?,
            out_proj: Linear::load(ckpt, &format!("{prefix}.out_proj"), c, c, true)?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `xs [n·t, c] += out_proj(MHA(norm(xs)))`, with scratch `qkv [n·t, 3c]` and `ctx [n·t, c]`.
    pub fn forward_residual(
        &self,
        norm: &LayerNorm,
        xs: &mut [f32],
        qkv: &mut [f32],
        ctx: &mut [f32],
        n: usize,
        t: usize,
    ) {
        let c = self.heads * self.head_dim;
        let rows = n * t;
        // [rows, 3c] = q | k | v of norm(xs); the norm runs inside each GEMM's packing.
        let normed = norm.rows(xs);
        for (i, proj) in [&self.q_proj, &self.k_proj, &self.v_proj]
            .iter()
            .enumerate()
        {
            proj.forward_rows_into(normed, &mut qkv[i * c..], 3 * c, rows, false, Identity);
        }

        // softmax(q kᵀ / √head_dim) v per crop and head; q/k/v rows are 3c apart.
        let fused = AttnLayout {
            batch_stride: t * 3 * c,
            row_stride: 3 * c,
            head_stride: None,
        };
        let dims = AttnDims {
            batch: n,
            heads: self.heads,
            q_len: t,
            kv_len: t,
            head_dim: self.head_dim,
            causal: false,
            scale: (self.head_dim as f32).powf(-0.5),
        };
        attention(
            &qkv[0..],
            fused,
            &qkv[c..],
            fused,
            &qkv[2 * c..],
            fused,
            ctx,
            AttnLayout::packed(t, c),
            &dims,
        );

        self.out_proj.forward_into(ctx, c, xs, c, rows, true);
    }
}
