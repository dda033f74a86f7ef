//! AVX2 gather: rows widened 8 lanes at a time (bf16 shift, f16 `vcvtph2ps` when F16C).

use crate::cpu::math::avx2::widen;
use crate::Weight;

/// # Safety
/// The CPU supports AVX2+FMA; ids checked against the vocabulary by `embedding_with`.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn embedding(ids: &[u32], table: Weight<'_>, hidden: usize, out: &mut [f32]) {
    for (&id, row) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
        let start = id as usize * hidden;
        assert!(start + hidden <= table.len());
        widen(table, start, hidden, row);
    }
}
