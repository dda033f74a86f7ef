//! The decoder on a GPU (`cuda` feature): [`Phi3Model`] uploaded once in bf16 and run on
//! `phi_kernels::cuda`, with a preallocated head-major KV cache on the device.
//!
//! Per layer, as `Phi3DecoderLayer.forward`: RMSNorm → qkv_proj → RoPE on q and k in the fused
//! buffer (cos/sin tables from the same [`crate::RotaryEmbedding`] the CPU path uses) → k and v
//! appended to the cache → causal flash attention (a prompt on an empty cache, straight from the
//! fused buffer) or flash-decoding over the cache (one token; and row by row for a continued
//! prompt or a head size without prefill tiles) → o_proj added to the residual stream in its
//! epilogue → RMSNorm → gate_up_proj → SiLU(gate)·up → down_proj added to the residual stream.
//! The last position's RMSNorm and lm_head give f32 logits.

use half::bf16;
use phi_kernels::cpu::Activation;
use phi_kernels::cuda::{
    self, upload_weight, AttnShape, CudaSlice, Device, DeviceLinear, DeviceRmsNorm, Epilogue,
};

use crate::{Error, Logits, Phi3Config, Phi3Model, Result, RopeFactors, RotaryEmbedding};

struct Layer {
    input_layernorm: DeviceRmsNorm,
    qkv_proj: DeviceLinear,
    o_proj: DeviceLinear,
    post_attention_layernorm: DeviceRmsNorm,
    gate_up_proj: DeviceLinear,
    down_proj: DeviceLinear,
}

pub struct Phi3ModelCuda {
    /// `[vocab, hidden]` bf16.
    embed_tokens: CudaSlice<bf16>,
    layers: Vec<Layer>,
    norm: DeviceRmsNorm,
    lm_head: DeviceLinear,
    rotary_emb: RotaryEmbedding,
    cfg: Phi3Config,
}

/// Keys and values of every layer on the device, `[heads, capacity, head_dim]` each.
pub struct KvCacheCuda {
    k: Vec<CudaSlice<bf16>>,
    v: Vec<CudaSlice<bf16>>,
    len: usize,
    capacity: usize,
}

impl KvCacheCuda {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps the first `len` positions and forgets the rest.
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl Phi3ModelCuda {
    /// Uploads every weight once, calling `progress(done, total)` after each layer.
    pub fn upload(
        dev: &Device,
        m: &Phi3Model,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self> {
        let total = m.layers.len() + 2;
        let embed_tokens = upload_weight(dev, m.embed_tokens.view())?;
        progress(1, total);
        let mut layers = Vec::with_capacity(m.layers.len());
        for (i, l) in m.layers.iter().enumerate() {
            layers.push(Layer {
                input_layernorm: DeviceRmsNorm::upload(dev, &l.input_layernorm)?,
                qkv_proj: DeviceLinear::upload(dev, &l.self_attn.qkv_proj)?,
                o_proj: DeviceLinear::upload(dev, &l.self_attn.o_proj)?,
                post_attention_layernorm: DeviceRmsNorm::upload(dev, &l.post_attention_layernorm)?,
                gate_up_proj: DeviceLinear::upload(dev, &l.mlp.gate_up_proj)?,
                down_proj: DeviceLinear::upload(dev, &l.mlp.down_proj)?,
            });
            progress(2 + i, total);
        }
        let out = Phi3ModelCuda {
            embed_tokens,
            layers,
            norm: DeviceRmsNorm::upload(dev, &m.norm)?,
            lm_head: DeviceLinear::upload(dev, &m.lm_head)?,
            rotary_emb: m.rotary_emb.clone(),
            cfg: m.cfg.clone(),
        };
        progress(total, total);
        Ok(out)
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    pub fn new_cache(&self, dev: &Device, capacity: usize) -> Result<KvCacheCuda> {
        let limit = self.cfg.max_position_embeddings;
        if capacity > limit {
            return Err(Error::ContextOverflow {
                needed: capacity,
                limit,
                what: "max_position_embeddings",
            });
        }
        let per_layer = self.cfg.hidden_size * capacity;
        let mut k = Vec::with_capacity(self.layers.len());
        let mut v = Vec::with_capacity(self.layers.len());
        for _ in &self.layers {
            k.push(dev.zeros(per_layer)?);
            v.push(dev.zeros(per_layer)?);
        }
        Ok(KvCacheCuda {
            k,
            v,
            len: 0,
            capacity,
        })
    }

    /// `embed_tokens(ids)` on the device, ids checked (image placeholders must already be
    /// replaced by the caller, as [`Phi3Model::embed`] clamps them to row 0).
    pub fn embed(&self, dev: &Device, ids: &[i64]) -> Result<CudaSlice<bf16>> {
        let (v, h) = (self.cfg.vocab_size, self.cfg.hidden_size);
        let rows = crate::model::embedding_rows(ids, v)?;
        let mut out: CudaSlice<bf16> = dev.zeros(ids.len() * h)?;
        cuda::embedding_bf16(dev, &rows, &self.embed_tokens, h, &mut out)?;
        Ok(out)
    }

    /// [`Self::forward_device`] with the logits brought back to the host.
    pub fn forward(
        &self,
        dev: &Device,
        xs: CudaSlice<bf16>,
        cache: &mut KvCacheCuda,
        which: Logits,
    ) -> Result<(Vec<f32>, RopeFactors)> {
        let (logits, factors) = self.forward_device(dev, xs, cache, which)?;
        Ok((dev.download(&logits)?, factors))
    }

    /// Greedy decoding's step: the token after `xs` (first of the largest logits, as
    /// `torch.argmax`), chosen on the device so only 4 bytes come back.
    pub fn forward_greedy(
        &self,
        dev: &Device,
        xs: CudaSlice<bf16>,
        cache: &mut KvCacheCuda,
    ) -> Result<(u32, RopeFactors)> {
        let (logits, factors) = self.forward_device(dev, xs, cache, Logits::Last)?;
        let mut tok: CudaSlice<i32> = dev.zeros(1)?;
        cuda::argmax_f32(dev, &logits, 1, self.cfg.vocab_size, &mut tok)?;
        Ok((dev.download(&tok)?[0] as u32, factors))
    }

    /// Runs `xs [t, hidden]` (device, bf16; consumed as the residual stream) at positions
    /// `cache.len()..+t`, appends to the cache, returns f32 logits on the device (`[vocab]` or
    /// `[t, vocab]`) and the RoPE factors used.
    pub fn forward_device(
        &self,
        dev: &Device,
        mut xs: CudaSlice<bf16>,
        cache: &mut KvCacheCuda,
        which: Logits,
    ) -> Result<(CudaSlice<f32>, RopeFactors)> {
        let cfg = &self.cfg;
        let (h, heads, d, inter) = (
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.head_dim(),
            cfg.intermediate_size,
        );
        let t = xs.len() / h;
        if t == 0 || xs.len() != t * h {
            return Err(Error::EmbedShape {
                t,
                hidden: h,
                expected: t.max(1) * h,
                got: xs.len(),
            });
        }
        let past = cache.len;
        if past + t > cache.capacity {
            return Err(Error::ContextOverflow {
                needed: past + t,
                limit: cache.capacity,
                what: "the KV cache",
            });
        }
        let (cos, sin, factors) = self.rotary_emb.cos_sin(past..past + t);
        let (cos, sin) = (dev.upload(&cos)?, dev.upload(&sin)?);

        let mut normed: CudaSlice<bf16> = dev.zeros(t * h)?;
        let mut qkv: CudaSlice<bf16> = dev.zeros(t * 3 * h)?;
        let mut ctx: CudaSlice<bf16> = dev.zeros(t * h)?;
        let mut gate_up: CudaSlice<bf16> = dev.zeros(t * 2 * inter)?;
        let mut act: CudaSlice<bf16> = dev.zeros(t * inter)?;
        let scale = 1.0 / (d as f32).sqrt();
        for (l, layer) in self.layers.iter().enumerate() {
            // h = x + o_proj(attn(input_layernorm(x)))
            layer.input_layernorm.forward(dev, &xs, &mut normed, t)?;
            layer.qkv_proj.forward(
                dev,
                &normed,
                h,
                &mut qkv,
                3 * h,
                t,
                false,
                Activation::Identity,
            )?;
            // [t, 3h] = q | k | v; RoPE on q and k in place.
            cuda::rope_bf16(dev, &mut qkv.slice_mut(0..), t, 3 * h, heads, d, &cos, &sin)?;
            cuda::rope_bf16(dev, &mut qkv.slice_mut(h..), t, 3 * h, heads, d, &cos, &sin)?;
            cuda::kv_cache_write_bf16(
                dev,
                &qkv.slice(h..),
                3 * h,
                t,
                &mut cache.k[l],
                heads,
                cache.capacity,
                d,
                past,
            )?;
            cuda::kv_cache_write_bf16(
                dev,
                &qkv.slice(2 * h..),
                3 * h,
                t,
                &mut cache.v[l],
                heads,
                cache.capacity,
                d,
                past,
            )?;
            if past == 0 && t > 1 && matches!(d, 64 | 96) {
                // A prompt on an empty cache: causal flash attention straight from qkv.
                let s = AttnShape::fused_qkv(1, heads, t, d, true, scale);
                cuda::flash_attn_bf16(dev, &qkv, &qkv, &qkv, &mut ctx, &s)?;
            } else {
                // One token (decode), a prompt continuing a cached one, or a head size the
                // prefill kernel has no tiles for: each query row over the cache, causally.
                for i in 0..t {
                    let kv_len = past + i + 1;
                    let splits = kv_len.div_ceil(256).clamp(1, 64);
                    cuda::flash_decode_bf16(
                        dev,
                        &qkv.slice(i * 3 * h..i * 3 * h + h),
                        &cache.k[l],
                        &cache.v[l],
                        &mut ctx.slice_mut(i * h..(i + 1) * h),
                        heads,
                        kv_len,
                        d,
                        cache.capacity * d,
                        splits,
                        scale,
                    )?;
                }
            }
            layer
                .o_proj
                .forward(dev, &ctx, h, &mut xs, h, t, true, Activation::Identity)?;
            // y = h + down_proj(silu(gate) * up)
            layer
                .post_attention_layernorm
                .forward(dev, &xs, &mut normed, t)?;
            layer.gate_up_proj.forward(
                dev,
                &normed,
                h,
                &mut gate_up,
                2 * inter,
                t,
                false,
                Activation::Identity,
            )?;
            cuda::silu_mul_bf16(dev, &gate_up, &mut act, t, inter)?;
            layer
                .down_proj
                .forward(dev, &act, inter, &mut xs, h, t, true, Activation::Identity)?;
        }
        cache.len += t;

        let (rows, first) = match which {
            Logits::Last => (1, t - 1),
            Logits::All => (t, 0),
        };
        let mut last: CudaSlice<bf16> = dev.zeros(rows * h)?;
        self.norm
            .forward(dev, &xs.slice(first * h..), &mut last, rows)?;
        let v = cfg.vocab_size;
        let mut logits: CudaSlice<f32> = dev.zeros(rows * v)?;
        let ep: Epilogue<'_, f32> = Epilogue::default();
        cuda::gemm_bf16_f32(
            dev,
            &last,
            h,
            &self.lm_head.weight,
            &mut logits,
            v,
            rows,
            v,
            h,
            &ep,
        )?;
        Ok((logits, factors))
    }

    /// Host f32 embeddings `[t, hidden]` to the device (bf16), for [`Self::forward`].
    pub fn upload_embeds(&self, dev: &Device, embeds: &[f32]) -> Result<CudaSlice<bf16>> {
        Ok(phi_kernels::cuda::upload_f32_as_bf16(dev, embeds)?)
    }
}
