//! Row softmax in place, max-subtracted, f32.

use crate::{isa, Isa};

pub fn softmax(xs: &mut [f32], rows: usize, cols: usize) {
    softmax_with(isa::active(), xs, rows, cols)
}

pub fn softmax_with(isa: Isa, xs: &mut [f32], rows: usize, cols: usize) {
    let _ = isa;
    softmax_ref(xs, rows, cols)
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
