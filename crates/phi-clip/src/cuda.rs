//! The vision tower on a GPU (`cuda` feature): the same model as [`ClipVisionModel`], uploaded
//! once in bf16, run on `phi_kernels::cuda` with every crop of every image in one batch.
//!
//! Per layer, as `CLIPEncoderLayer.forward`: LayerNorm → one GEMM for q|k|v (the three
//! projections stacked, biases fused) → flash attention reading the fused buffer in place →
//! out_proj added to the residual stream in its epilogue → LayerNorm → fc1 with bias and
//! QuickGELU fused → fc2 added to the residual stream. bf16 activations, f32 accumulation and
//! statistics, as transformers runs the tower in bf16.

use half::bf16;
use phi_kernels::cpu::Activation;
use phi_kernels::cuda::{
    self, upload_f32_as_bf16, AttnShape, CudaSlice, Device, DeviceLayerNorm, DeviceLinear,
};

use crate::{ClipVisionConfig, ClipVisionModel, Result};

struct Layer {
    layer_norm1: DeviceLayerNorm,
    /// q_proj | k_proj | v_proj stacked: `[3c, c]`.
    qkv: DeviceLinear,
    out_proj: DeviceLinear,
    layer_norm2: DeviceLayerNorm,
    fc1: DeviceLinear,
    fc2: DeviceLinear,
}

pub struct ClipVisionModelCuda {
    /// The patch convolution as a GEMM operand `[c, k_pad]`, k = 3·14·14 = 588 zero-padded to a
    /// multiple of 8 (the GEMM's 16-byte loads).
    patch_embedding: CudaSlice<bf16>,
    k_pad: usize,
    /// Position embeddings with the class embedding added to row 0: `[577, c]`.
    cls_pos: CudaSlice<bf16>,
    pre_layrnorm: DeviceLayerNorm,
    layers: Vec<Layer>,
    cfg: ClipVisionConfig,
}

impl ClipVisionModelCuda {
    pub fn upload(dev: &Device, m: &ClipVisionModel) -> Result<Self> {
        let cfg = m.cfg.clone();
        let (c, p) = (cfg.hidden_size, cfg.patch_size);
        let k = 3 * p * p;
        let k_pad = k.next_multiple_of(8);
        let w = m.embeddings.patch_embedding.view();
        let mut padded = vec![bf16::ZERO; c * k_pad];
        for o in 0..c {
            for i in 0..k {
                padded[o * k_pad + i] = bf16::from_f32(w.get(o * k + i));
            }
        }
        let mut cls_pos = m.embeddings.position_embedding.clone();
        for (x, cls) in cls_pos.iter_mut().zip(&m.embeddings.class_embedding) {
            *x += cls;
        }
        let layers = m
            .layers
            .iter()
            .map(|l| {
                let a = &l.self_attn;
                Ok(Layer {
                    layer_norm1: DeviceLayerNorm::upload(dev, &l.layer_norm1)?,
                    qkv: DeviceLinear::upload_stacked(dev, &[&a.q_proj, &a.k_proj, &a.v_proj])?,
                    out_proj: DeviceLinear::upload(dev, &a.out_proj)?,
                    layer_norm2: DeviceLayerNorm::upload(dev, &l.layer_norm2)?,
                    fc1: DeviceLinear::upload(dev, &l.mlp.fc1)?,
                    fc2: DeviceLinear::upload(dev, &l.mlp.fc2)?,
                })
            })
            .collect::<phi_kernels::Result<Vec<_>>>()?;
        Ok(ClipVisionModelCuda {
            patch_embedding: dev.upload(&padded)?,
            k_pad,
            cls_pos: upload_f32_as_bf16(dev, &cls_pos)?,
            pre_layrnorm: DeviceLayerNorm::upload(dev, &m.pre_layrnorm)?,
            layers,
            cfg,
        })
    }

    /// Tokens per crop (577) and width (1024).
    pub fn output_dims(&self) -> (usize, usize) {
        (self.cfg.num_positions(), self.cfg.hidden_size)
    }

    /// `pixels [n, 3, 336, 336]` (host f32) → `[n, 577, c]` on the device: the output of the
    /// last loaded layer, CLS first.
    pub fn forward_device(
        &self,
        dev: &Device,
        pixels: &[f32],
        n: usize,
    ) -> Result<CudaSlice<bf16>> {
        let (size, p, g) = (self.cfg.image_size, self.cfg.patch_size, self.cfg.grid());
        self.cfg.check_pixels(pixels, n)?;
        let (t, c) = self.output_dims();
        let rows = n * t;

        // im2col on the host, (channel, ky, kx) column order = the weight's flattening:
        // [n·576, k_pad], bf16.
        let k = 3 * p * p;
        let mut cols = vec![bf16::ZERO; n * g * g * self.k_pad];
        for (row, dst) in cols.chunks_mut(self.k_pad).enumerate() {
            let (b, patch) = (row / (g * g), row % (g * g));
            let (py, px) = (patch / g, patch % g);
            for ch in 0..3 {
                for ky in 0..p {
                    let src = ((b * 3 + ch) * size + py * p + ky) * size + px * p;
                    for kx in 0..p {
                        dst[(ch * p + ky) * p + kx] = bf16::from_f32(pixels[src + kx]);
                    }
                }
            }
            debug_assert!(dst[k..].iter().all(|v| *v == bf16::ZERO));
        }
        let cols = dev.upload(&cols)?;

        // [n, 577, c]: row 0 of each crop is 0 + (CLS + position 0); rows 1.. are the patch GEMM
        // + positions.
        let mut emb: CudaSlice<bf16> = dev.zeros(rows * c)?;
        let ep = cuda::Epilogue::default();
        for b in 0..n {
            let mut dst = emb.slice_mut((b * t + 1) * c..(b + 1) * t * c);
            let a = cols.slice(b * g * g * self.k_pad..(b + 1) * g * g * self.k_pad);
            cuda::gemm_bf16(
                dev,
                &a,
                self.k_pad,
                &self.patch_embedding,
                &mut dst,
                c,
                g * g,
                c,
                self.k_pad,
                false,
                &ep,
            )?;
            let mut crop = emb.slice_mut(b * t * c..(b + 1) * t * c);
            cuda::add_bf16(dev, &self.cls_pos, &mut crop, t * c)?;
        }
        let mut xs: CudaSlice<bf16> = dev.zeros(rows * c)?;
        self.pre_layrnorm.forward(dev, &emb, &mut xs, rows)?;
        drop(emb);

        let heads = self.cfg.num_attention_heads;
        let d = self.cfg.head_dim();
        let inter = self.cfg.intermediate_size;
        let mut normed: CudaSlice<bf16> = dev.zeros(rows * c)?;
        let mut qkv: CudaSlice<bf16> = dev.zeros(rows * 3 * c)?;
        let mut ctx: CudaSlice<bf16> = dev.zeros(rows * c)?;
        let mut hidden: CudaSlice<bf16> = dev.zeros(rows * inter)?;
        let attn = AttnShape::fused_qkv(n, heads, t, d, false, (d as f32).powf(-0.5));
        for l in &self.layers {
            // x = x + out_proj(MHA(LN1(x)))
            l.layer_norm1.forward(dev, &xs, &mut normed, rows)?;
            l.qkv.forward(
                dev,
                &normed,
                c,
                &mut qkv,
                3 * c,
                rows,
                false,
                Activation::Identity,
            )?;
            cuda::flash_attn_bf16(dev, &qkv, &qkv, &qkv, &mut ctx, &attn)?;
            l.out_proj
                .forward(dev, &ctx, c, &mut xs, c, rows, true, Activation::Identity)?;
            // x = x + fc2(quick_gelu(fc1(LN2(x))))
            l.layer_norm2.forward(dev, &xs, &mut normed, rows)?;
            l.fc1.forward(
                dev,
                &normed,
                c,
                &mut hidden,
                inter,
                rows,
                false,
                Activation::QuickGelu,
            )?;
            l.fc2.forward(
                dev,
                &hidden,
                inter,
                &mut xs,
                c,
                rows,
                true,
                Activation::Identity,
            )?;
        }
        Ok(xs)
    }

    /// [`Self::forward_device`], brought back to the host as f32 (`[n, 577, c]`).
    pub fn forward(&self, dev: &Device, pixels: &[f32], n: usize) -> Result<Vec<f32>> {
        let xs = self.forward_device(dev, pixels, n)?;
        Ok(dev.download(&xs)?.iter().map(|v| v.to_f32()).collect())
    }
}
