//! AVX-512 gather: rows widened 16 lanes at a time (bf16 shift, f16 `vcvtph2ps`).

use crate::cpu::math::avx512::widen;
use crate::Weight;

/// # Safety
/// The CPU supports AVX-512F/BW/VL; ids checked against the vocabulary by `embedding_with`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn embedding(ids: &[u32], table: Weight<'_>, hidden: usize, out: &mut [f32]) {
    for (&id, row) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
        let start = id as usize * hidden;
        assert!(start + hidden <= table.len());
        widen(table, start, hidden, row);
    }
}
