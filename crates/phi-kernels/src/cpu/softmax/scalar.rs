//! Portable softmax: libm `expf`, f32 sum.

pub(super) fn softmax(xs: &mut [f32], rows: usize, cols: usize) {
    for row in xs.chunks_exact_mut(cols).take(rows) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        let mut sum = 0f32;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        let inv = 1.0 / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}
