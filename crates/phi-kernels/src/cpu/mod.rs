//! CPU kernels. One folder per op; each `mod.rs` holds the entry point, the dispatch over
//! [`Isa`](crate::Isa) and the plain `_ref` twin, beside one module per instruction set
//! (`scalar.rs`, `avx2.rs`, `avx512.rs`) that all export the same function signature.
//!
//! Threading: ops split their rows over the global rayon pool once the work is large enough
//! ([`PAR_MIN_ELEMS`]); the ISA modules only ever see a sequential chunk (GEMM and attention,
//! whose blocking is part of the algorithm, split inside their own drivers).

pub mod activation;
pub mod attention;
pub mod embedding;
pub mod gemm;
pub mod layer_norm;
pub(crate) mod math;
pub mod merge_2x2;
pub mod rms_norm;
pub mod rope;
pub mod softmax;

use rayon::prelude::*;

pub use activation::{
    gelu_erf, gelu_erf_ref, quick_gelu, quick_gelu_ref, silu_mul, silu_mul_ref, Activation,
};
pub use attention::{
    attention, attention_kv, attention_kv_ref, attention_ref, AttnDims, AttnLayout,
};
pub use embedding::{embedding, embedding_ref};
pub use gemm::{
    gemm, gemm_fused, gemm_fused_ref, gemm_opts, gemm_opts_ref, gemm_ref, ARows, GemmOpts,
    MergedRows,
};
pub use layer_norm::{layer_norm, layer_norm_ref};
pub use merge_2x2::{merge_2x2, merge_2x2_ref};
pub use rms_norm::{rms_norm, rms_norm_ref};
pub use rope::{rope, rope_ref};
pub use softmax::{softmax, softmax_ref};

/// Below this many elements a row-wise op runs on the calling thread: a rayon fork costs a few
/// microseconds, about what 32k elements of LayerNorm take on one core.
pub(crate) const PAR_MIN_ELEMS: usize = 32 * 1024;

/// Calls `isa_mod::$op(args)` for the chosen path. The caller has checked
/// [`check_isa`] (an `Isa` is only ever used after `is_supported()` said yes).
macro_rules! dispatch {
    ($isa:expr, $op:ident ( $($arg:expr),* $(,)? )) => {
        match $isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `check_isa` asserted `Isa::Avx512.is_supported()` (avx512f/bw/vl detected at
            // run time), which is every feature the `#[target_feature]` function enables.
            $crate::Isa::Avx512 => unsafe { avx512::$op($($arg),*) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `check_isa` asserted `Isa::Avx2.is_supported()` (avx2 and fma detected).
            $crate::Isa::Avx2 => unsafe { avx2::$op($($arg),*) },
            _ => scalar::$op($($arg),*),
        }
    };
}
pub(crate) use dispatch;

/// Panics if `isa` cannot run here. Cheap: `is_x86_feature_detected!` reads a cached word.
#[inline]
pub(crate) fn check_isa(isa: crate::Isa) {
    assert!(
        isa.is_supported(),
        "instruction set {isa:?} is not supported by this CPU"
    );
}

/// Rows per parallel chunk: about four chunks per thread, each at least `PAR_MIN_ELEMS / 4`
/// elements so the fork pays for itself.
fn chunk_rows(rows: usize, row_elems: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let by_threads = rows.div_ceil(4 * threads);
    let by_size = (PAR_MIN_ELEMS / 4).div_ceil(row_elems.max(1));
    by_threads.max(by_size).max(1)
}

/// Runs `f(first_row, chunk)` over chunks of whole rows of `buf`, where row `r` starts at
/// `r * stride` and holds `width` elements (`width <= stride`; the last row may end before a
/// full stride). Sequential for small work, split over the rayon pool otherwise.
pub(crate) fn for_row_chunks<F>(buf: &mut [f32], rows: usize, stride: usize, width: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync + Send,
{
    if rows == 0 || width == 0 {
        return;
    }
    let used = (rows - 1) * stride + width;
    let buf = &mut buf[..used];
    if rows * width <= PAR_MIN_ELEMS || rows == 1 {
        f(0, buf);
        return;
    }
    let per = chunk_rows(rows, width);
    buf.par_chunks_mut(per * stride)
        .enumerate()
        .for_each(|(i, chunk)| f(i * per, chunk));
}

/// Rows in a chunk handed out by [`for_row_chunks`].
#[inline]
pub(crate) fn rows_in(chunk_len: usize, stride: usize) -> usize {
    chunk_len.div_ceil(stride)
}

/// Runs `f(chunk)` over pieces of a flat element-wise buffer, in parallel when large.
pub(crate) fn for_elem_chunks<F>(buf: &mut [f32], f: F)
where
    F: Fn(&mut [f32]) + Sync + Send,
{
    if buf.len() <= PAR_MIN_ELEMS {
        f(buf);
        return;
    }
    let per = chunk_rows(buf.len(), 1).next_multiple_of(64);
    buf.par_chunks_mut(per).for_each(f);
}

/// A raw pointer that may cross threads. Used where parallel tasks write disjoint, interleaved
/// regions of one buffer (GEMM tiles, attention heads) that slices cannot express.
#[derive(Copy, Clone)]
pub(crate) struct SendPtr(pub *mut f32);
impl SendPtr {
    /// The pointer. A method (not `.0`) so closures capture the whole `SendPtr`, which is `Sync`.
    #[inline]
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

// SAFETY: only used to hand each task a base pointer; every user documents why the regions its
// tasks write are disjoint, and the buffer outlives the parallel scope it is used in.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
