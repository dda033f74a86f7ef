//! Scaled dot-product attention, `softmax(q kᵀ · scale [+ causal mask]) v`, per batch and head.
//!
//! Layout: element `(b, t, h, d)` of q/k/v/out sits at `b*batch_stride + t*row_stride +
//! h*head_dim + d` of its slice, so q, k and v can be column ranges of one fused projection
//! buffer or rows of a KV cache. Causal: query `i` sits at absolute position
//! `kv_len - q_len + i` and sees keys `0..=that` (prefill with a cache, and decode).

use crate::{isa, Isa};

#[derive(Copy, Clone, Debug, PartialEq)]
pub struct AttnDims {
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f32,
}

/// Strides of one operand, in elements.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AttnLayout {
    pub batch_stride: usize,
    pub row_stride: usize,
}

impl AttnLayout {
    /// Rows of `heads * head_dim` packed back to back, batches back to back.
    pub fn packed(len: usize, width: usize) -> Self {
        AttnLayout {
            batch_stride: len * width,
            row_stride: width,
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    ql: AttnLayout,
    k: &[f32],
    kl: AttnLayout,
    v: &[f32],
    vl: AttnLayout,
    out: &mut [f32],
    ol: AttnLayout,
    dims: &AttnDims,
) {
    attention_with(isa::active(), q, ql, k, kl, v, vl, out, ol, dims)
}

#[allow(clippy::too_many_arguments)]
pub fn attention_with(
    isa: Isa,
    q: &[f32],
    ql: AttnLayout,
    k: &[f32],
    kl: AttnLayout,
    v: &[f32],
    vl: AttnLayout,
    out: &mut [f32],
    ol: AttnLayout,
    dims: &AttnDims,
) {
    let _ = isa;
    attention_ref(q, ql, k, kl, v, vl, out, ol, dims)
}

/// Materialises the score row, f64 softmax. The oracle.
#[allow(clippy::too_many_arguments)]
pub fn attention_ref(
    q: &[f32],
    ql: AttnLayout,
    k: &[f32],
    kl: AttnLayout,
    v: &[f32],
    vl: AttnLayout,
    out: &mut [f32],
    ol: AttnLayout,
    dims: &AttnDims,
) {
    let &AttnDims {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim: d,
        causal,
        scale,
    } = dims;
    let mut scores = vec![0f64; kv_len];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..q_len {
                let qo = b * ql.batch_stride + i * ql.row_stride + h * d;
                let visible = if causal {
                    (kv_len + i + 1).saturating_sub(q_len).min(kv_len)
                } else {
                    kv_len
                };
                let mut max = f64::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate().take(visible) {
                    let ko = b * kl.batch_stride + j * kl.row_stride + h * d;
                    let mut acc = 0f64;
                    for e in 0..d {
                        acc += q[qo + e] as f64 * k[ko + e] as f64;
                    }
                    *s = acc * scale as f64;
                    max = max.max(*s);
                }
                let mut sum = 0f64;
                for s in scores.iter_mut().take(visible) {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let oo = b * ol.batch_stride + i * ol.row_stride + h * d;
                for e in 0..d {
                    let mut acc = 0f64;
                    for (j, s) in scores.iter().enumerate().take(visible) {
                        acc += s * v[b * vl.batch_stride + j * vl.row_stride + h * d + e] as f64;
                    }
                    out[oo + e] = if visible == 0 {
                        0.0
                    } else {
                        (acc / sum) as f32
                    };
                }
            }
        }
    }
}
