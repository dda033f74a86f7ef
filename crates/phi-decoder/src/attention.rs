//! `Phi3Attention`: fused `qkv_proj` (rows q, k, v), rotate-half RoPE on q and k, causal
//! softmax attention over the cache, `o_proj`. No biases.

use phi_kernels::cpu::Activation::Identity;
use phi_kernels::cpu::{attention_kv, rope, AttnDims, AttnLayout};
use phi_kernels::{Checkpoint, Linear, RmsNorm};

use crate::{KvCache, Phi3Config, Result};

#[derive(Debug, Clone)]
pub struct Phi3Attention {
    /// `[3·hidden, hidden]`: q rows `0..h`, k rows `h..2h`, v rows `2h..3h`.
    pub qkv_proj: Linear,
    pub o_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl Phi3Attention {
    pub fn load(ckpt: &Checkpoint, prefix: &str, cfg: &Phi3Config) -> Result<Self> {
        let h = cfg.hidden_size;
        Ok(Phi3Attention {
            qkv_proj: Linear::load(ckpt, &format!("{prefix}.qkv_proj"), h, 3 * h, false)?,
            o_proj: Linear::load(ckpt, &format!("{prefix}.o_proj"), h, h, false)?,
            heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `xs [t, h] += o_proj(attn(norm(xs)))` (the norm runs inside qkv_proj's packing) for
    /// positions `cache.len()..cache.len()+t` of layer `layer`; writes this call's keys and
    /// values into the cache (the caller advances it).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_residual(
        &self,
        norm: &RmsNorm,
        xs: &mut [f32],
        qkv: &mut [f32],
        ctx: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        cache: &mut KvCache,
        layer: usize,
        t: usize,
    ) {
        let h = self.heads * self.head_dim;
        // [t, 3h] = q | k | v
        self.qkv_proj
            .forward_rows_into(norm.rows(xs), qkv, 3 * h, t, false, Identity);
        self.attend(qkv, ctx, cos, sin, cache, layer, t);
        self.o_proj.forward_into(ctx, h, xs, h, t, true);
    }

    /// One new position for each of several sequences at once (a batched decode step): row `r`
    /// of `xs [b, h]` sits at position `caches[r].len()` and attends to its own cache; `cos` and
    /// `sin` have one row per sequence. The projections read their weights once for all rows.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn forward_residual_batch(
        &self,
        norm: &RmsNorm,
        xs: &mut [f32],
        qkv: &mut [f32],
        ctx: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        caches: &mut [&mut KvCache],
        layer: usize,
    ) {
        let (b, d) = (caches.len(), self.head_dim);
        let h = self.heads * d;
        self.qkv_proj
            .forward_rows_into(norm.rows(xs), qkv, 3 * h, b, false, Identity);
        for (r, cache) in caches.iter_mut().enumerate() {
            self.attend(
                &mut qkv[r * 3 * h..(r + 1) * 3 * h],
                &mut ctx[r * h..(r + 1) * h],
                &cos[r * d..(r + 1) * d],
                &sin[r * d..(r + 1) * d],
                cache,
                layer,
                1,
            );
        }
        self.o_proj.forward_into(ctx, h, xs, h, b, true);
    }

    /// RoPE on `qkv [t, 3h]`, its keys and values appended to `cache`, and attention of its
    /// queries over the cache into `ctx [t, h]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        qkv: &mut [f32],
        ctx: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        cache: &mut KvCache,
        layer: usize,
        t: usize,
    ) {
        let (n_head, d) = (self.heads, self.head_dim);
        let h = n_head * d;
        let past = cache.len();
        rope(&mut qkv[0..], t, 3 * h, n_head, d, cos, sin);
        rope(&mut qkv[h..], t, 3 * h, n_head, d, cos, sin);

        // Append post-RoPE k and v at positions past..past+t of this layer's cache.
        cache.write(layer, &qkv[h..], &qkv[2 * h..], 3 * h, t);

        let kv_len = past + t;
        let dims = AttnDims {
            batch: 1,
            heads: n_head,
            q_len: t,
            kv_len,
            head_dim: d,
            causal: true,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let cached = cache.layout();
        attention_kv(
            &qkv[0..],
            AttnLayout {
                batch_stride: t * 3 * h,
                row_stride: 3 * h,
                head_stride: None,
            },
            cache.k[layer].view(),
            cached,
            cache.v[layer].view(),
            cached,
            ctx,
            AttnLayout::packed(t, h),
            &dims,
        );
    }
}
