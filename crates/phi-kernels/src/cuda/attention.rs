//! Flash attention (prefill and CLIP) and flash-decoding over the KV cache
//! (`kernels/attention.cu`).

use super::{check_len, int, require, require_aligned, Arg, CudaSlice, Device, DevicePtr, Family};
use crate::Result;
use half::bf16;

// From the launch lines in kernels/attention.cu.
const FA_BLOCK: u32 = 128;
const FA_BR: usize = 64;
const FA_SMEM: u32 = 0;
const DECODE_BLOCK: u32 = 128;
const COMBINE_BLOCK: u32 = 128;

/// The shape and layout of one attention call. Element `(b, row, h, c)` of Q is at
/// `q_off + b·q_batch_stride + row·q_row_stride + h·head_dim + c`; K and V likewise with the
/// `kv_` strides (a fused QKV buffer gives all three from one buffer with offsets), O with the
/// `o_` strides.
#[derive(Copy, Clone, Debug)]
pub struct AttnShape {
    pub batch: usize,
    pub heads: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub head_dim: usize,
    pub causal: bool,
    pub scale: f32,
    pub q_off: usize,
    pub k_off: usize,
    pub v_off: usize,
    pub q_batch_stride: usize,
    pub q_row_stride: usize,
    pub kv_batch_stride: usize,
    pub kv_row_stride: usize,
    pub o_batch_stride: usize,
    pub o_row_stride: usize,
}

impl AttnShape {
    /// Self-attention over one fused QKV buffer `[batch, len, 3·heads·head_dim]` (q | k | v, the
    /// QKV projection's output, read in place), output packed `[batch, len, heads·head_dim]`.
    pub fn fused_qkv(
        batch: usize,
        heads: usize,
        len: usize,
        head_dim: usize,
        causal: bool,
        scale: f32,
    ) -> Self {
        let w = heads * head_dim;
        AttnShape {
            batch,
            heads,
            q_len: len,
            kv_len: len,
            head_dim,
            causal,
            scale,
            q_off: 0,
            k_off: w,
            v_off: 2 * w,
            q_batch_stride: len * 3 * w,
            q_row_stride: 3 * w,
            kv_batch_stride: len * 3 * w,
            kv_row_stride: 3 * w,
            o_batch_stride: len * w,
            o_row_stride: w,
        }
    }
}

fn span(batch: usize, bstride: usize, rows: usize, rstride: usize, width: usize) -> usize {
    if batch == 0 || rows == 0 {
        0
    } else {
        (batch - 1) * bstride + (rows - 1) * rstride + width
    }
}

/// Softmax attention per (batch, head) with `s` as above; head_dim 64 or 96.
pub fn flash_attn_bf16(
    dev: &Device,
    q: &impl DevicePtr<bf16>,
    k: &impl DevicePtr<bf16>,
    v: &impl DevicePtr<bf16>,
    o: &mut impl DevicePtr<bf16>,
    s: &AttnShape,
) -> Result<()> {
    let name = match s.head_dim {
        64 => "flash_attn_d64_bf16",
        96 => "flash_attn_d96_bf16",
        d => {
            return Err(crate::Error::CudaArgs {
                kernel: "flash_attn_bf16",
                msg: format!("head_dim {d} (64 or 96)"),
            })
        }
    };
    let width = s.heads * s.head_dim;
    require(
        name,
        [
            s.q_off,
            s.k_off,
            s.v_off,
            s.q_row_stride,
            s.kv_row_stride,
            s.o_row_stride,
            s.q_batch_stride,
            s.kv_batch_stride,
            s.o_batch_stride,
        ]
        .iter()
        .all(|x| x % 8 == 0),
        || "offsets and strides must be multiples of 8 (16-byte cp.async)".into(),
    )?;
    require(name, !s.causal || s.kv_len >= s.q_len, || {
        format!("causal with kv_len {} < q_len {}", s.kv_len, s.q_len)
    })?;
    check_len(
        name,
        "Q",
        q,
        s.q_off + span(s.batch, s.q_batch_stride, s.q_len, s.q_row_stride, width),
    )?;
    check_len(
        name,
        "K",
        k,
        s.k_off + span(s.batch, s.kv_batch_stride, s.kv_len, s.kv_row_stride, width),
    )?;
    check_len(
        name,
        "V",
        v,
        s.v_off + span(s.batch, s.kv_batch_stride, s.kv_len, s.kv_row_stride, width),
    )?;
    check_len(
        name,
        "O",
        o,
        span(s.batch, s.o_batch_stride, s.q_len, s.o_row_stride, width),
    )?;
    let el = std::mem::size_of::<bf16>() as u64;
    let (pq, pk, pv) = (
        dev.ptr(q) + s.q_off as u64 * el,
        dev.ptr(k) + s.k_off as u64 * el,
        dev.ptr(v) + s.v_off as u64 * el,
    );
    require_aligned(name, &[("Q", pq), ("K", pk), ("V", pv)])?;
    let args = [
        Arg::Ptr(pq),
        Arg::Ptr(pk),
        Arg::Ptr(pv),
        Arg::Ptr(dev.ptr(o)),
        Arg::I32(int(name, "heads", s.heads)?),
        Arg::I32(int(name, "q_len", s.q_len)?),
        Arg::I32(int(name, "kv_len", s.kv_len)?),
        Arg::I64(s.q_batch_stride as i64),
        Arg::I32(int(name, "q_row_stride", s.q_row_stride)?),
        Arg::I64(s.kv_batch_stride as i64),
        Arg::I32(int(name, "kv_row_stride", s.kv_row_stride)?),
        Arg::I64(s.o_batch_stride as i64),
        Arg::I32(int(name, "o_row_stride", s.o_row_stride)?),
        Arg::F32(s.scale),
        Arg::I32(s.causal as i32),
    ];
    let grid = (
        s.q_len.div_ceil(FA_BR) as u32,
        int(name, "heads", s.heads)? as u32,
        int(name, "batch", s.batch)? as u32,
    );
    dev.launch(Family::Attention, name, grid, FA_BLOCK, FA_SMEM, &args)
}

/// One query per head (`q [heads, head_dim]`) against the first `kv_len` positions of a
/// head-major cache (`[heads, capacity, head_dim]`, `head_stride = capacity · head_dim`),
/// split along the keys into `splits` pieces that are combined at the end.
#[allow(clippy::too_many_arguments)]
pub fn flash_decode_bf16(
    dev: &Device,
    q: &impl DevicePtr<bf16>,
    k_cache: &impl DevicePtr<bf16>,
    v_cache: &impl DevicePtr<bf16>,
    o: &mut impl DevicePtr<bf16>,
    heads: usize,
    kv_len: usize,
    head_dim: usize,
    head_stride: usize,
    splits: usize,
    scale: f32,
) -> Result<()> {
    const K: &str = "flash_decode_bf16";
    require(
        K,
        head_dim.is_multiple_of(8)
            && head_dim <= 128
            && head_stride.is_multiple_of(8)
            && splits >= 1,
        || {
            format!("head_dim {head_dim} (multiple of 8, <= 128), head_stride {head_stride} (multiple of 8), splits {splits} >= 1")
        },
    )?;
    require(K, kv_len * head_dim <= head_stride, || {
        format!("kv_len {kv_len} exceeds the cache's capacity")
    })?;
    check_len(K, "q", q, heads * head_dim)?;
    check_len(K, "o", o, heads * head_dim)?;
    if heads > 0 {
        check_len(
            K,
            "K cache",
            k_cache,
            (heads - 1) * head_stride + kv_len * head_dim,
        )?;
        check_len(
            K,
            "V cache",
            v_cache,
            (heads - 1) * head_stride + kv_len * head_dim,
        )?;
    }
    let part_o: CudaSlice<f32> = dev.zeros(heads * splits * head_dim)?;
    let part_ml: CudaSlice<f32> = dev.zeros(heads * splits * 2)?;
    let (pq, pk, pv) = (dev.ptr(q), dev.ptr(k_cache), dev.ptr(v_cache));
    require_aligned(K, &[("q", pq), ("K cache", pk), ("V cache", pv)])?;
    let args = [
        Arg::Ptr(pq),
        Arg::Ptr(pk),
        Arg::Ptr(pv),
        Arg::Ptr(dev.ptr(&part_o)),
        Arg::Ptr(dev.ptr(&part_ml)),
        Arg::I32(int(K, "heads", heads)?),
        Arg::I32(int(K, "kv_len", kv_len)?),
        Arg::I32(int(K, "head_dim", head_dim)?),
        Arg::I64(head_stride as i64),
        Arg::I32(int(K, "splits", splits)?),
        Arg::F32(scale),
    ];
    dev.launch(
        Family::Attention,
        K,
        (splits as u32, heads as u32, 1),
        DECODE_BLOCK,
        0,
        &args,
    )?;
    let args = [
        Arg::Ptr(dev.ptr(&part_o)),
        Arg::Ptr(dev.ptr(&part_ml)),
        Arg::Ptr(dev.ptr(o)),
        Arg::I32(heads as i32),
        Arg::I32(head_dim as i32),
        Arg::I32(splits as i32),
    ];
    dev.launch(
        Family::Attention,
        "flash_decode_combine_bf16",
        (heads as u32, 1, 1),
        COMBINE_BLOCK,
        0,
        &args,
    )
}
