//! Portable gather: each row widened by `Weight::widen_into`.

use crate::Weight;

/// Ids already checked against the vocabulary by `embedding_with`.
pub(super) fn embedding(ids: &[u32], table: Weight<'_>, hidden: usize, out: &mut [f32]) {
    for (&id, row) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
        table.widen_into(id as usize * hidden, row);
    }
}
