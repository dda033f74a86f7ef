//! Scaled dot-product attention, `softmax(q kᵀ · scale [+ causal mask]) v`, per batch and head.
//!
//! Layout: element `(b, t, h, d)` of q/k/v/out sits at `b*batch_stride + t*row_stride +
//! h*head_dim + d` of its slice, so q, k and v can be column ranges of one fused projection
//! buffer or rows of a KV cache. Causal: query `i` sits at absolute position
//! `kv_len - q_len + i` and sees keys `0..=that` (prefill with a cache, and decode).
//!
//! Algorithm (FlashAttention-2 on a CPU, f32 throughout): per (batch, head) the keys are
//! transposed once into `Kᵀ [head_dim, kv_pad]`; each task takes `BQ` = 32 query rows and walks
//! the visible keys in tiles of `BK` = 128, computing the 32×128 score tile as a small GEMM
//! (broadcast q, vector loads along keys), then the online softmax (running max `m`, running sum
//! `l`, accumulator rescaled by `exp(m_old - m_new)`), then `O += P·V` (broadcast p, vector
//! loads along head_dim). `O / l` is written after the last tile; a row that sees no key
//! (`q_len > kv_len`, causal) is 0.
//! Decode (`q_len <= 4`) skips the transpose, which would cost as much as the attention itself:
//! the keys are split into chunks over the pool (flash-decoding); each task walks its chunk in
//! 16-key tiles for every head, with direct dot products and the same online softmax, and the
//! per-chunk partial results are merged at the end.
//!
//! Parallelism: (batch, head) pairs over the rayon pool, and inside each, its query blocks.
//!
//! Measured on the dev VM (Skylake-SP, one thread, `examples/timing.rs`): CLIP 577×577, 16 heads
//! × 64: ~59 GFLOP per CPU-second, ~41% of the FMA peak; the online-softmax bookkeeping (row
//! reductions, `exp`) takes about a quarter of the time. On an AVX2 Zen 3 VM (2026-12-05,
//! `cargo xtask bench --compare torch`, 2 threads): CLIP's 53% of the FMA peak, 0.89x torch's
//! SDPA time; the causal 757-token prefill 48%, 0.74x.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;

use half::bf16;
use rayon::prelude::*;

use super::{check_isa, SendPtr};
use crate::{isa, Isa, Weight};
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

impl AttnDims {
    /// Keys query row `i` sees: all of them, or under the causal mask those up to its absolute
    /// position `kv_len - q_len + i` (0 when that is before the first key).
    #[inline]
    pub fn visible(&self, i: usize) -> usize {
        if self.causal {
            (self.kv_len + i + 1)
                .saturating_sub(self.q_len)
                .min(self.kv_len)
        } else {
            self.kv_len
        }
    }
}

/// Strides of one operand, in elements: `(b, t, h, e)` sits at
/// `b·batch_stride + t·row_stride + h·head_stride + e`, where `head_stride` defaults to
/// `head_dim` (the heads side by side within a row, as projections write them).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct AttnLayout {
    pub batch_stride: usize,
    pub row_stride: usize,
    pub head_stride: Option<usize>,
}

impl AttnLayout {
    /// Rows of `heads * head_dim` packed back to back, batches back to back.
    pub fn packed(len: usize, width: usize) -> Self {
        AttnLayout {
            batch_stride: len * width,
            row_stride: width,
            head_stride: None,
        }
    }

    /// Head-major `[batch][heads][capacity][head_dim]`: each head's rows contiguous (a KV cache
    /// laid out so that decode streams each head's keys sequentially).
    pub fn head_major(heads: usize, capacity: usize, head_dim: usize) -> Self {
        AttnLayout {
            batch_stride: heads * capacity * head_dim,
            row_stride: head_dim,
            head_stride: Some(capacity * head_dim),
        }
    }

    /// Offset of element 0 of `(b, t, h)`.
    #[inline]
    pub fn offset(&self, b: usize, t: usize, h: usize, head_dim: usize) -> usize {
        b * self.batch_stride + t * self.row_stride + h * self.head_stride.unwrap_or(head_dim)
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

/// Query rows per block task: each key/value tile fetched from L2 serves 32 rows (in register
/// groups of 8 or 4) while it sits in L1; with 8 rows per block the tile streaming from L2
/// was the bottleneck.
pub(crate) const BQ: usize = 32;
/// Keys per online-softmax tile. The per-row softmax bookkeeping (two reductions, one rescale)
/// is paid once per tile, so 128 keys cost half the overhead of 64 (measured +12% at d=64).
pub(crate) const BK: usize = 128;
/// Up to this many query rows, attention runs the decode path (no Kᵀ).
const DECODE_MAX_Q: usize = 4;

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
    attention_kv_with(
        isa,
        q,
        ql,
        Weight::F32(k),
        kl,
        Weight::F32(v),
        vl,
        out,
        ol,
        dims,
    )
}

/// [`attention`] with keys and values in f32 or bf16 (a bf16 KV cache): bf16 rows are widened
/// into f32 tiles as they are read, so the cache is streamed at half the bytes.
#[allow(clippy::too_many_arguments)]
pub fn attention_kv(
    q: &[f32],
    ql: AttnLayout,
    k: Weight<'_>,
    kl: AttnLayout,
    v: Weight<'_>,
    vl: AttnLayout,
    out: &mut [f32],
    ol: AttnLayout,
    dims: &AttnDims,
) {
    attention_kv_with(isa::active(), q, ql, k, kl, v, vl, out, ol, dims)
}

/// [`attention_kv`] on a given instruction set: the one dispatch point of attention.
#[allow(clippy::too_many_arguments)]
pub fn attention_kv_with(
    isa: Isa,
    q: &[f32],
    ql: AttnLayout,
    k: Weight<'_>,
    kl: AttnLayout,
    v: Weight<'_>,
    vl: AttnLayout,
    out: &mut [f32],
    ol: AttnLayout,
    dims: &AttnDims,
) {
    check_isa(isa);
    let &AttnDims {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim: d,
        causal: _,
        scale,
    } = dims;
    if batch == 0 || heads == 0 || q_len == 0 || d == 0 {
        return;
    }
    let width = heads * d;
    check_layout("q", q.len(), ql, batch, q_len, heads, d);
    check_layout("k", k.len(), kl, batch, kv_len, heads, d);
    check_layout("v", v.len(), vl, batch, kv_len, heads, d);
    check_layout("out", out.len(), ol, batch, q_len, heads, d);
    // Tasks write out rows in parallel: they must not overlap.
    assert!(
        ol.head_stride.is_none(),
        "attention: out must keep the heads side by side in a row"
    );
    assert!(ol.row_stride >= width, "attention: out rows overlap");
    assert!(
        batch == 1 || ol.batch_stride >= (q_len - 1) * ol.row_stride + width,
        "attention: out batches overlap"
    );

    let visible = |i: usize| dims.visible(i);
    if q_len <= DECODE_MAX_Q {
        // SAFETY: the layouts were checked to cover every (b, t, h) slot read or written (the
        // output is only written after the parallel part, from this thread), and the ISA was
        // checked by `check_isa`.
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => attend_decode::<avx512::Avx512>(q, ql, k, kl, v, vl, out, ol, dims),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => attend_decode::<avx2::Avx2>(q, ql, k, kl, v, vl, out, ol, dims),
                _ => attend_decode::<scalar::Scalar>(q, ql, k, kl, v, vl, out, ol, dims),
            }
        }
        return;
    }

    let out_ptr = SendPtr(out.as_mut_ptr());
    let kv_pad = kv_len.next_multiple_of(32);
    (0..batch * heads).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / heads, bh % heads);
        // Kᵀ, and V copied to contiguous rows: in a [t, heads·d] layout the rows of one head are
        // heads·d·4 bytes apart (4 KiB for CLIP), so a 64-row tile maps onto a couple of L1 sets.
        let mut kt = vec![0f32; d * kv_pad];
        let mut vc = vec![0f32; kv_len * d];
        let mut row = vec![0f32; d];
        for j in 0..kv_len {
            k.widen_into(kl.offset(b, j, h, d), &mut row);
            for (e, &x) in row.iter().enumerate() {
                kt[e * kv_pad + j] = x;
            }
            v.widen_into(vl.offset(b, j, h, d), &mut vc[j * d..(j + 1) * d]);
        }
        let (kt, vc) = (&kt, &vc);
        (0..q_len.div_ceil(BQ)).into_par_iter().for_each(|qb| {
            let i0 = qb * BQ;
            let nq = BQ.min(q_len - i0);
            let args = BlockArgs {
                q: q[ql.offset(b, i0, h, d)..].as_ptr(),
                q_rs: ql.row_stride,
                nq,
                vis: std::array::from_fn(|r| if r < nq { visible(i0 + r) } else { 0 }),
                kt: kt.as_ptr(),
                kv_pad,
                v: vc.as_ptr(),
                v_rs: d,
                out: out_ptr.get().wrapping_add(ol.offset(b, i0, h, d)),
                o_rs: ol.row_stride,
                d,
                scale,
            };
            // SAFETY: as for the decode tasks; Kᵀ is d × kv_pad with kv_pad a multiple of 32.
            unsafe {
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => attend_block::<avx512::Avx512>(&args),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => attend_block::<avx2::Avx2>(&args),
                    _ => attend_block::<scalar::Scalar>(&args),
                }
            }
        });
    });
}

/// Panics unless `len` elements cover every `(b, t, h, e)` slot of one operand.
fn check_layout(
    name: &str,
    len: usize,
    l: AttnLayout,
    batch: usize,
    rows: usize,
    heads: usize,
    d: usize,
) {
    if rows == 0 {
        return;
    }
    let need = l.offset(batch - 1, rows - 1, heads - 1, d) + d;
    assert!(
        len >= need,
        "attention: {name} has {len} elements, layout {l:?} needs {need}"
    );
}

/// One block of `nq <= BQ` query rows of one (batch, head). Pointers are at head column 0.
#[derive(Copy, Clone)]
pub(crate) struct BlockArgs {
    pub q: *const f32,
    pub q_rs: usize,
    pub nq: usize,
    /// Keys visible to each row (0 for rows past `nq`); non-decreasing.
    pub vis: [usize; BQ],
    /// Kᵀ `[d, kv_pad]`, zero past kv_len.
    pub kt: *const f32,
    pub kv_pad: usize,
    pub v: *const f32,
    pub v_rs: usize,
    pub out: *mut f32,
    pub o_rs: usize,
    pub d: usize,
    pub scale: f32,
}

/// One query row of one (batch, head) against its keys (decode). Pointers are at head column 0
/// of query row / key row 0.
#[derive(Copy, Clone)]
pub(crate) struct RowArgs {
    pub q: *const f32,
    pub k: *const f32,
    pub k_rs: usize,
    pub d: usize,
    pub scale: f32,
}

/// The vector pieces of one instruction set; the online-softmax bookkeeping is shared
/// ([`attend_block`], [`attend_row`]). All methods require the CPU to support the ISA.
pub(crate) trait AttnOps {
    /// `s[i·BK + j] = scale · q_i · Kᵀ[:, j0 + j]` for rows `i < nq` (rounded up to the ISA's
    /// row group; extra rows repeat row `nq - 1`) and `j < bk` (lanes up to the next multiple of
    /// the ISA's key step may be written too).
    ///
    /// # Safety
    /// `j0 + bk <= kv_pad`; `a`'s pointers valid as documented on [`BlockArgs`].
    unsafe fn scores(a: &BlockArgs, j0: usize, bk: usize, s: &mut [f32; BQ * BK]);

    /// `s[j] = scale · q · k_{j0 + j}` for `j < bk` (direct dot products, decode).
    ///
    /// # Safety
    /// Keys `j0..j0+bk` readable through `a`.
    unsafe fn dots(a: &RowArgs, j0: usize, bk: usize, s: &mut [f32]);

    /// [`AttnOps::dots`] against bf16 keys read where they are (key `j` at `k + j·k_rs`; `a.k`
    /// is not used). The default widens them into `scratch` (`bk·d` floats) first; an ISA
    /// that can widen in registers reads the cache once, overlapping the stream with the dot
    /// products.
    ///
    /// # Safety
    /// Keys `0..bk` readable for `d` values; `scratch.len() >= bk·d`.
    unsafe fn dots_bf16(
        a: &RowArgs,
        k: *const bf16,
        k_rs: usize,
        bk: usize,
        s: &mut [f32],
        scratch: &mut [f32],
    ) {
        widen_rows(k, k_rs, bk, a.d, scratch);
        let args = RowArgs {
            k: scratch.as_ptr(),
            k_rs: a.d,
            ..*a
        };
        Self::dots(&args, 0, bk, s)
    }

    /// [`AttnOps::pv_row`] over bf16 values read where they are (row `j` at `v + j·v_rs`), as
    /// [`AttnOps::dots_bf16`].
    ///
    /// # Safety
    /// As [`AttnOps::dots_bf16`] for the values; `o.len() >= d`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_row_bf16(
        v: *const bf16,
        v_rs: usize,
        bk: usize,
        d: usize,
        p: &[f32],
        alpha: f32,
        o: &mut [f32],
        scratch: &mut [f32],
    ) {
        widen_rows(v, v_rs, bk, d, scratch);
        Self::pv_row(scratch.as_ptr(), d, 0, bk, d, p, alpha, o)
    }

    /// `max(s[..valid])`, `valid >= 1`.
    unsafe fn row_max(s: &[f32], valid: usize) -> f32;

    /// `s[j] = exp(s[j] - m)` for `j < valid`, `0` for `valid <= j < bk`; returns the sum.
    unsafe fn exp_sum(s: &mut [f32], valid: usize, bk: usize, m: f32) -> f32;

    /// The online-softmax step for one score tile: for each row `i < BQ` with
    /// `valid = clamp(vis[i] - j0, 0, bk)` visible keys in the tile, turns `s` into
    /// `P = exp(s - m_new)` (0 past `valid`), sets `alpha[i] = exp(m[i] - m_new)` and updates
    /// the running max `m` and sum `l`. Rows with no visible key get `P = 0`, `alpha = 1`.
    ///
    /// The default composes [`AttnOps::row_max`] and [`AttnOps::exp_sum`]; an ISA may fuse it.
    #[allow(clippy::too_many_arguments)]
    unsafe fn softmax_tile(
        s: &mut [f32; BQ * BK],
        vis: &[usize; BQ],
        j0: usize,
        bk: usize,
        m: &mut [f32; BQ],
        l: &mut [f32; BQ],
        alpha: &mut [f32; BQ],
    ) {
        online_softmax_tile(
            s,
            vis,
            j0,
            bk,
            m,
            l,
            alpha,
            |row, valid| Self::row_max(row, valid),
            |row, valid, bk, m| Self::exp_sum(row, valid, bk, m),
            f32::exp,
        )
    }

    /// `o_i = alpha_i · o_i + Σ_{j<bk} p[i·BK + j] · v_{j0 + j}` for rows `i < rows` (rounded up
    /// to the ISA's row group, `<= BQ`) of `o [BQ, d_pad]` (`d_pad` = d rounded up to 32; lanes
    /// past d stay 0).
    ///
    /// # Safety
    /// Value rows `j0..j0+bk` readable through `v`/`v_rs` for `d` columns.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv(
        v: *const f32,
        v_rs: usize,
        j0: usize,
        bk: usize,
        d: usize,
        rows: usize,
        p: &[f32; BQ * BK],
        alpha: &[f32; BQ],
        o: &mut [f32],
    );

    /// `o = alpha · o + Σ_{j<bk} p[j] · v_{j0 + j}` over `d` columns (decode).
    ///
    /// # Safety
    /// As [`AttnOps::pv`]; `o.len() >= d`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pv_row(
        v: *const f32,
        v_rs: usize,
        j0: usize,
        bk: usize,
        d: usize,
        p: &[f32],
        alpha: f32,
        o: &mut [f32],
    );
}

/// The body of [`AttnOps::softmax_tile`], with the ISA's row max, `exp`-and-sum and scalar
/// `exp` for the rescale factor. Inlined, so an ISA's `#[target_feature]` wrapper gets one
/// call per tile with every piece inlined (the default pays three calls per row).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn online_softmax_tile(
    s: &mut [f32; BQ * BK],
    vis: &[usize; BQ],
    j0: usize,
    bk: usize,
    m: &mut [f32; BQ],
    l: &mut [f32; BQ],
    alpha: &mut [f32; BQ],
    row_max: impl Fn(&[f32], usize) -> f32,
    exp_sum: impl Fn(&mut [f32], usize, usize, f32) -> f32,
    exp: impl Fn(f32) -> f32,
) {
    for i in 0..BQ {
        let row = &mut s[i * BK..(i + 1) * BK];
        let valid = vis[i].saturating_sub(j0).min(bk);
        if valid == 0 {
            // Masked (causal) or padding row: contributes nothing, O unchanged.
            row[..bk].fill(0.0);
            alpha[i] = 1.0;
            continue;
        }
        let m_new = m[i].max(row_max(row, valid));
        // exp(-inf) = 0 on the first visible tile: O and l start from zero anyway.
        alpha[i] = exp(m[i] - m_new);
        l[i] = l[i] * alpha[i] + exp_sum(row, valid, bk, m_new);
        m[i] = m_new;
    }
}

/// Rows `0..rows` of `d` bf16 values, `rs` apart from `src`, widened into `dst [rows, d]`.
///
/// # Safety
/// The rows are readable; `dst.len() >= rows·d`.
unsafe fn widen_rows(src: *const bf16, rs: usize, rows: usize, d: usize, dst: &mut [f32]) {
    for j in 0..rows {
        let row = std::slice::from_raw_parts(src.add(j * rs), d);
        Weight::Bf16(row).widen_into(0, &mut dst[j * d..(j + 1) * d]);
    }
}

/// Online softmax over key tiles for one block of query rows.
///
/// # Safety
/// See [`BlockArgs`]: every pointer covers the rows and columns it describes.
pub(crate) unsafe fn attend_block<T: AttnOps>(a: &BlockArgs) {
    // The block's query rows, copied contiguous for the same L1-aliasing reason as V.
    let mut qc = vec![0f32; a.nq * a.d];
    for (i, row) in qc.chunks_exact_mut(a.d).enumerate() {
        row.copy_from_slice(std::slice::from_raw_parts(a.q.add(i * a.q_rs), a.d));
    }
    let a = &BlockArgs {
        q: qc.as_ptr(),
        q_rs: a.d,
        ..*a
    };
    let d_pad = a.d.next_multiple_of(32);
    let mut o = vec![0f32; BQ * d_pad];
    let mut s = [0f32; BQ * BK];
    let mut m = [f32::NEG_INFINITY; BQ];
    let mut l = [0f32; BQ];
    let max_vis = a.vis.iter().copied().max().unwrap_or(0);
    for j0 in (0..max_vis).step_by(BK) {
        let bk = BK.min(max_vis - j0);
        T::scores(a, j0, bk, &mut s);
        let mut alpha = [1f32; BQ];
        T::softmax_tile(&mut s, &a.vis, j0, bk, &mut m, &mut l, &mut alpha);
        T::pv(a.v, a.v_rs, j0, bk, a.d, a.nq, &s, &alpha, &mut o);
    }
    for i in 0..a.nq {
        let inv = if l[i] > 0.0 { 1.0 / l[i] } else { 0.0 };
        let dst = std::slice::from_raw_parts_mut(a.out.add(i * a.o_rs), a.d);
        for (y, &x) in dst.iter_mut().zip(&o[i * d_pad..]) {
            *y = x * inv;
        }
    }
}

/// Keys per decode task at least: below this a task is too short to pay for its fork (64 keys
/// of Phi-3's 32 heads are 768 KiB of bf16 K and V, some 30 µs of reading). With the chunks
/// balanced over the threads (see `attend_decode`), one decode row against a bf16 cache of
/// 350 keys took 0.174 against 0.218 ms (2 threads, 3 alternating pairs), 200 keys 0.098
/// against 0.166 and 700 keys 0.319 against 0.388.
const DECODE_CHUNK_MIN: usize = 64;
/// Keys per decode tile for row-major K/V: every head walks the same few rows while they are
/// in L2, so they are read row by row instead of once per head at `row_stride` intervals
/// (head-major K/V take `BK`-key tiles head by head instead).
const DECODE_TILE: usize = 16;

/// Decode (`q_len <= DECODE_MAX_Q`), split over the keys ("flash-decoding"): each task takes a
/// chunk of keys for every head and query row, runs the online softmax over it with direct dot
/// products, and leaves a partial `(m, l, O)`; the partials are merged at the end with weights
/// `exp(m_c - max_c m_c)`.
///
/// # Safety
/// The layouts were checked by `attention_with` and the CPU supports `T`'s ISA.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_decode<T: AttnOps>(
    q: &[f32],
    ql: AttnLayout,
    k: Weight<'_>,
    kl: AttnLayout,
    v: Weight<'_>,
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
        causal: _,
        scale,
    } = dims;
    let visible = |i: usize| dims.visible(i);
    let threads = rayon::current_num_threads().max(1);
    // Two chunks per thread where the keys allow, else as many as allow `DECODE_CHUNK_MIN`
    // each, in whole rounds of the threads: chunks of a fixed minimum split 350 keys into 256
    // and 94, and the thread with 256 set the pace.
    let most = (kv_len / DECODE_CHUNK_MIN).clamp(1, 2 * threads);
    let n_chunks = if most >= threads {
        most / threads * threads
    } else {
        most
    };
    let chunk = kv_len.div_ceil(n_chunks).max(1);
    let n_chunks = kv_len.div_ceil(chunk).max(1);
    let d_pad = d.next_multiple_of(32);
    let slots = q_len * heads;

    // Partial state per (batch, chunk): m and l per (query, head) slot, O [slots, d_pad].
    let parts: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..batch * n_chunks)
        .into_par_iter()
        .map(|t| {
            let (b, c) = (t / n_chunks, t % n_chunks);
            let (c0, c1) = (c * chunk, ((c + 1) * chunk).min(kv_len));
            let mut m = vec![f32::NEG_INFINITY; slots];
            let mut l = vec![0f32; slots];
            let mut o = vec![0f32; slots * d_pad];
            let mut s = [0f32; BK];
            // bf16 K/V: the tile's rows widened here (from the stream, into L1/L2).
            let (mut kbuf, mut vbuf) = match (k, v) {
                (Weight::F32(_), Weight::F32(_)) => (Vec::new(), Vec::new()),
                _ => (vec![0f32; BK * d], vec![0f32; BK * d]),
            };
            // One tile of keys j0..j0+tile for query row i of head h.
            let mut step = |i: usize, h: usize, j0: usize, tile: usize| {
                let valid = visible(i).saturating_sub(j0).min(tile);
                if valid == 0 {
                    return;
                }
                let slot = i * heads + h;
                // A bf16 cache is read in place (widened in registers where the ISA can);
                // f32 is read in place; f16 is widened into the tile buffers here.
                let bf16 = match (k, v) {
                    (Weight::Bf16(ks), Weight::Bf16(vs)) => Some((
                        ks[kl.offset(b, j0, h, d)..].as_ptr(),
                        vs[vl.offset(b, j0, h, d)..].as_ptr(),
                    )),
                    _ => None,
                };
                // Key j of the tile sits at k + (jt + j)·k_rs (likewise v).
                let (kp, k_rs, vp, v_rs, jt) = match (k, v) {
                    (Weight::F32(ks), Weight::F32(vs)) => (
                        ks.as_ptr().wrapping_add(kl.offset(b, 0, h, d)),
                        kl.row_stride,
                        vs.as_ptr().wrapping_add(vl.offset(b, 0, h, d)),
                        vl.row_stride,
                        j0,
                    ),
                    _ if bf16.is_some() => (
                        std::ptr::null(),
                        kl.row_stride,
                        std::ptr::null(),
                        vl.row_stride,
                        0,
                    ),
                    _ => {
                        for j in 0..valid {
                            k.widen_into(kl.offset(b, j0 + j, h, d), &mut kbuf[j * d..][..d]);
                            v.widen_into(vl.offset(b, j0 + j, h, d), &mut vbuf[j * d..][..d]);
                        }
                        (kbuf.as_ptr(), d, vbuf.as_ptr(), d, 0)
                    }
                };
                let args = RowArgs {
                    q: q[ql.offset(b, i, h, d)..].as_ptr(),
                    k: kp,
                    k_rs,
                    d,
                    scale,
                };
                // SAFETY: keys jt..jt+valid lie inside k and v (layouts checked) or the widened
                // tile, bf16 ones from j0 on; the tile buffers hold BK·d >= valid·d floats and
                // s holds BK >= tile scores.
                unsafe {
                    match bf16 {
                        Some((kb, _)) => T::dots_bf16(&args, kb, k_rs, valid, &mut s, &mut kbuf),
                        None => T::dots(&args, jt, valid, &mut s),
                    }
                    let m_new = m[slot].max(T::row_max(&s, valid));
                    // exp(-inf) = 0 on the first visible tile: O and l start at zero.
                    let alpha = (m[slot] - m_new).exp();
                    l[slot] = l[slot] * alpha + T::exp_sum(&mut s, valid, valid, m_new);
                    m[slot] = m_new;
                    let o = &mut o[slot * d_pad..][..d_pad];
                    match bf16 {
                        Some((_, vb)) => {
                            T::pv_row_bf16(vb, v_rs, valid, d, &s, alpha, o, &mut vbuf)
                        }
                        None => T::pv_row(vp, v_rs, jt, valid, d, &s, alpha, o),
                    }
                }
            };
            if kl.head_stride.is_some() && vl.head_stride.is_some() {
                // Head-major (the KV cache): each head's keys are contiguous, so walk them
                // head by head in long tiles, one sequential stream at a time.
                for h in 0..heads {
                    for j0 in (c0..c1).step_by(BK) {
                        for i in 0..q_len {
                            step(i, h, j0, BK.min(c1 - j0));
                        }
                    }
                }
            } else {
                for j0 in (c0..c1).step_by(DECODE_TILE) {
                    for i in 0..q_len {
                        for h in 0..heads {
                            step(i, h, j0, DECODE_TILE.min(c1 - j0));
                        }
                    }
                }
            }
            (m, l, o)
        })
        .collect();

    let mut acc = vec![0f32; d];
    for b in 0..batch {
        let parts = &parts[b * n_chunks..(b + 1) * n_chunks];
        for i in 0..q_len {
            for h in 0..heads {
                let slot = i * heads + h;
                let mx = parts
                    .iter()
                    .fold(f32::NEG_INFINITY, |a, p| a.max(p.0[slot]));
                acc.fill(0.0);
                let mut lsum = 0f32;
                for (m, l, o) in parts {
                    if m[slot] == f32::NEG_INFINITY {
                        continue; // this chunk saw no key for the slot
                    }
                    let w = (m[slot] - mx).exp();
                    lsum += w * l[slot];
                    for (a, &x) in acc.iter_mut().zip(&o[slot * d_pad..]) {
                        *a += w * x;
                    }
                }
                let inv = if lsum > 0.0 { 1.0 / lsum } else { 0.0 };
                let dst = &mut out[ol.offset(b, i, h, d)..][..d];
                for (y, &a) in dst.iter_mut().zip(&acc) {
                    *y = a * inv;
                }
            }
        }
    }
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
    attention_kv_ref(q, ql, Weight::F32(k), kl, Weight::F32(v), vl, out, ol, dims)
}

/// The oracle of [`attention_kv`].
#[allow(clippy::too_many_arguments)]
pub fn attention_kv_ref(
    q: &[f32],
    ql: AttnLayout,
    k: Weight<'_>,
    kl: AttnLayout,
    v: Weight<'_>,
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
        causal: _,
        scale,
    } = dims;
    let mut scores = vec![0f64; kv_len];
    for b in 0..batch {
        for h in 0..heads {
            for i in 0..q_len {
                let qo = ql.offset(b, i, h, d);
                let visible = dims.visible(i);
                let mut max = f64::NEG_INFINITY;
                for (j, s) in scores.iter_mut().enumerate().take(visible) {
                    let ko = kl.offset(b, j, h, d);
                    let mut acc = 0f64;
                    for e in 0..d {
                        acc += q[qo + e] as f64 * k.get(ko + e) as f64;
                    }
                    *s = acc * scale as f64;
                    max = max.max(*s);
                }
                let mut sum = 0f64;
                for s in scores.iter_mut().take(visible) {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                let oo = ol.offset(b, i, h, d);
                for e in 0..d {
                    let mut acc = 0f64;
                    for (j, s) in scores.iter().enumerate().take(visible) {
                        acc += s * v.get(vl.offset(b, j, h, d) + e) as f64;
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
