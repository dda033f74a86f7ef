//! Row softmax in place, max-subtracted, f32 (polynomial `exp` on the vector paths, see
//! `cpu/math`).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod scalar;

use super::{check_isa, dispatch, for_row_chunks, rows_in};
use crate::{isa, Isa};

pub fn softmax(xs: &mut [f32], rows: usize, cols: usize) {
    softmax_with(isa::active(), xs, rows, cols)
}

pub fn softmax_with(isa: Isa, xs: &mut [f32], rows: usize, cols: usize) {
    check_isa(isa);
    assert!(
        xs.len() >= rows * cols,
        "softmax: buffer shorter than [{rows}, {cols}]"
    );
    for_row_chunks(xs, rows, cols, cols, |_, xs| {
        let n = rows_in(xs.len(), cols);
        dispatch!(isa, softmax(xs, n, cols))
    });
}

pub fn softmax_ref(xs: &mut [f32], rows: usize, cols: usize) {
    for r in 0..rows {
        let row = &mut xs[r * cols..(r + 1) * cols];
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        for v in row.iter_mut() {
            *v = (((*v - max) as f64).exp() / sum) as f32;
        }
    }
}
