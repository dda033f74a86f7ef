//! `Phi3Model` + `lm_head`: embeddings in, logits out, one forward call per prefill or decode
//! step.

use std::path::Path;

use phi_kernels::cpu::Activation::Identity;
use phi_kernels::{Checkpoint, DType, Linear, RmsNorm, Tensor};

use crate::decoder_layer::Scratch;
use crate::{Error, KvCache, Phi3Config, Phi3DecoderLayer, Result, RopeFactors, RotaryEmbedding};

/// Which positions' logits a forward call returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position: `[vocab]` (prefill and decode).
    Last,
    /// Every position of the call: `[t, vocab]`.
    All,
}

/// The embedding rows of `ids`: `clamp(ids, 0, vocab)` as the reference does (negative image
/// placeholders become row 0, overwritten later), ids past the vocabulary refused.
pub(crate) fn embedding_rows(ids: &[i64], vocab: usize) -> Result<Vec<u32>> {
    ids.iter()
        .enumerate()
        .map(|(pos, &id)| {
            if id >= vocab as i64 {
                Err(Error::TokenOutOfRange { id, pos, vocab })
            } else {
                Ok(id.max(0) as u32)
            }
        })
        .collect()
}

#[derive(Debug, Clone)]
pub struct Phi3Model {
    /// `[vocab, hidden]`, in storage dtype.
    pub embed_tokens: Tensor,
    pub layers: Vec<Phi3DecoderLayer>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    pub rotary_emb: RotaryEmbedding,
    pub cfg: Phi3Config,
}

impl Phi3Model {
    /// Loads `model.*` and `lm_head.*` from a checkpoint.
    pub fn load(ckpt: &Checkpoint, cfg: &Phi3Config) -> Result<Self> {
        cfg.validate()?;
        let (h, v) = (cfg.hidden_size, cfg.vocab_size);
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| Phi3DecoderLayer::load(ckpt, &format!("model.layers.{l}"), cfg))
            .collect::<Result<Vec<_>>>()?;
        let embed_tokens = ckpt.get("model.embed_tokens.weight", &[v, h])?;
        let lm_head = if ckpt.contains("lm_head.weight") || !cfg.tie_word_embeddings {
            Linear::load(ckpt, "lm_head", h, v, false)?
        } else {
            let weight = match ckpt.precision() {
                DType::BF16 => embed_tokens.to_bf16(),
                _ => embed_tokens.clone(),
            };
            Linear {
                weight,
                bias: None,
                in_features: h,
                out_features: v,
                precision: ckpt.precision(),
            }
        };
        Ok(Phi3Model {
            embed_tokens,
            layers,
            norm: RmsNorm::load(ckpt, "model.norm", h, cfg.rms_norm_eps as f32)?,
            lm_head,
            rotary_emb: RotaryEmbedding::new(cfg),
            cfg: cfg.clone(),
        })
    }

    /// Loads from a model directory (`config.json` + safetensors).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let cfg = Phi3Config::from_file(&dir.join("config.json"))?;
        let ckpt = Checkpoint::open(dir)?;
        Self::load(&ckpt, &cfg)
    }

    /// Weight bytes one decode step streams: every layer's projections and the LM head (the
    /// embedding is a row gather, the norms are a few KiB). Divided by the DRAM read bandwidth
    /// this is the floor of the time per token on a CPU.
    pub fn decode_weight_bytes(&self) -> usize {
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.self_attn.qkv_proj.weight_bytes()
                    + l.self_attn.o_proj.weight_bytes()
                    + l.mlp.gate_up_proj.weight_bytes()
                    + l.mlp.down_proj.weight_bytes()
            })
            .sum();
        layers + self.lm_head.weight_bytes()
    }

    /// A KV cache for `capacity` positions in this model's precision: bf16 when the products
    /// are bf16 (`Checkpoint::with_precision`), else f32.
    pub fn new_cache(&self, capacity: usize) -> Result<KvCache> {
        let dtype = match self.lm_head.precision {
            DType::BF16 => DType::BF16,
            _ => DType::F32,
        };
        KvCache::with_dtype(&self.cfg, capacity, dtype)
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    pub fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    /// `embed_tokens(clamp(ids, 0, vocab))`: negative image placeholders become row 0, as in
    /// the reference; the caller overwrites those rows with image features. `[t, hidden]`.
    pub fn embed(&self, ids: &[i64]) -> Result<Vec<f32>> {
        let rows = embedding_rows(ids, self.cfg.vocab_size)?;
        let mut out = vec![0f32; ids.len() * self.cfg.hidden_size];
        phi_kernels::cpu::embedding(
            &rows,
            self.embed_tokens.view(),
            self.cfg.hidden_size,
            &mut out,
        );
        Ok(out)
    }

    /// Runs `embeds [t, hidden]` at positions `cache.len()..cache.len()+t`, appends to the
    /// cache, and returns logits (`[vocab]` or `[t, vocab]`) and the RoPE factor set used.
    pub fn forward(
        &self,
        embeds: &[f32],
        cache: &mut KvCache,
        which: Logits,
    ) -> Result<(Vec<f32>, RopeFactors)> {
        self.forward_with_progress(embeds, cache, which, &mut |_, _| {})
    }

    /// [`Self::forward`] calling `on_layer(done, total)` after each layer (progress of a long
    /// prefill).
    pub fn forward_with_progress(
        &self,
        embeds: &[f32],
        cache: &mut KvCache,
        which: Logits,
        on_layer: &mut dyn FnMut(usize, usize),
    ) -> Result<(Vec<f32>, RopeFactors)> {
        let h = self.cfg.hidden_size;
        let t = embeds.len() / h.max(1);
        if embeds.len() != t * h || t == 0 {
            return Err(Error::EmbedShape {
                t,
                hidden: h,
                expected: t.max(1) * h,
                got: embeds.len(),
            });
        }
        cache.check_room(t)?;
        let past = cache.len();
        let (cos, sin, factors) = self.rotary_emb.cos_sin(past..past + t);

        let mut xs = embeds.to_vec();
        let mut s = Scratch::new(t, &self.cfg);
        for (l, layer) in self.layers.iter().enumerate() {
            layer.forward(&mut xs, &mut s, &cos, &sin, cache, l, t);
            on_layer(l + 1, self.layers.len());
        }
        cache.advance(t);

        let (rows, first) = match which {
            Logits::Last => (1, t - 1),
            Logits::All => (t, 0),
        };
        // lm_head(norm(x)) of the rows asked for, the norm inside lm_head's packing.
        let v = self.cfg.vocab_size;
        let mut logits = vec![0f32; rows * v];
        let normed = self.norm.rows(&xs[first * h..]);
        self.lm_head
            .forward_rows_into(normed, &mut logits, v, rows, false, Identity);
        Ok((logits, factors))
    }

    /// One decode step for several sequences at once: `embeds [b, hidden]`, row `r` at
    /// position `caches[r].len()`. Every weight is read once for the `b` rows (the matrix
    /// products are GEMVs with M = b), so on a bandwidth-bound machine `b` steps cost about
    /// one. Returns logits `[b, vocab]` and each row's RoPE factor set; each row equals what
    /// [`Self::forward`] gives for it alone.
    pub fn forward_batch(
        &self,
        embeds: &[f32],
        caches: &mut [&mut KvCache],
    ) -> Result<(Vec<f32>, Vec<RopeFactors>)> {
        let (h, b) = (self.cfg.hidden_size, caches.len());
        if b == 0 || embeds.len() != b * h {
            return Err(Error::EmbedShape {
                t: b,
                hidden: h,
                expected: b.max(1) * h,
                got: embeds.len(),
            });
        }
        let d = self.cfg.head_dim();
        let (mut cos, mut sin) = (vec![0f32; b * d], vec![0f32; b * d]);
        let mut factors = Vec::with_capacity(b);
        for (r, cache) in caches.iter().enumerate() {
            cache.check_room(1)?;
            let past = cache.len();
            let (c, s, f) = self.rotary_emb.cos_sin(past..past + 1);
            cos[r * d..(r + 1) * d].copy_from_slice(&c);
            sin[r * d..(r + 1) * d].copy_from_slice(&s);
            factors.push(f);
        }
        let mut xs = embeds.to_vec();
        let mut s = Scratch::new(b, &self.cfg);
        for (l, layer) in self.layers.iter().enumerate() {
            layer.forward_batch(&mut xs, &mut s, &cos, &sin, caches, l);
        }
        for cache in caches.iter_mut() {
            cache.advance(1);
        }
        let v = self.cfg.vocab_size;
        let mut logits = vec![0f32; b * v];
        self.lm_head
            .forward_rows_into(self.norm.rows(&xs), &mut logits, v, b, false, Identity);
        Ok((logits, factors))
    }
}
