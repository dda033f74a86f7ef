//! Embedding gather (rows of a weight table widened to f32) and row scatter.

use crate::{isa, Isa, Weight};

/// `out[t, :] = table[ids[t], :]` with `table [vocab, hidden]`. Ids must be `< vocab`.
pub fn embedding(ids: &[u32], table: Weight<'_>, hidden: usize, out: &mut [f32]) {
    embedding_with(isa::active(), ids, table, hidden, out)
}

pub fn embedding_with(isa: Isa, ids: &[u32], table: Weight<'_>, hidden: usize, out: &mut [f32]) {
    let _ = isa;
    embedding_ref(ids, table, hidden, out)
}

pub fn embedding_ref(ids: &[u32], table: Weight<'_>, hidden: usize, out: &mut [f32]) {
    for (t, &id) in ids.iter().enumerate() {
        for e in 0..hidden {
            out[t * hidden + e] = table.get(id as usize * hidden + e);
        }
    }
}

/// `dst[rows[i], :] = src[i, :]` for `i` in order, rows `width` wide.
pub fn scatter_rows(dst: &mut [f32], rows: &[usize], src: &[f32], width: usize) {
    for (i, &r) in rows.iter().enumerate() {
        dst[r * width..(r + 1) * width].copy_from_slice(&src[i * width..(i + 1) * width]);
    }
}
