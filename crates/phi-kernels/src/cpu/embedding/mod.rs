//! Embedding gather (rows of a weight table widened to f32) and row scatter.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;

use super::{check_isa, dispatch, for_row_chunks, rows_in};
use crate::{isa, Isa, Weight};

/// `out[t, :] = table[ids[t], :]` with `table [vocab, hidden]`. Ids must be `< vocab`.
pub fn embedding(ids: &[u32], table: Weight<'_>, hidden: usize, out: &mut [f32]) {
    embedding_with(isa::active(), ids, table, hidden, out)
}

pub fn embedding_with(isa: Isa, ids: &[u32], table: Weight<'_>, hidden: usize, out: &mut [f32]) {
    check_isa(isa);
    if ids.is_empty() || hidden == 0 {
        return;
    }
    let vocab = table.len() / hidden;
    assert!(
        out.len() >= ids.len() * hidden,
        "embedding: out shorter than [{}, {hidden}]",
        ids.len()
    );
    if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
        panic!("embedding: id {bad} out of range for a vocabulary of {vocab}");
    }
    for_row_chunks(out, ids.len(), hidden, hidden, |t0, out| {
        let n = rows_in(out.len(), hidden);
        dispatch!(isa, embedding(&ids[t0..t0 + n], table, hidden, out))
    });
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
