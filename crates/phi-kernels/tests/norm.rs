//! LayerNorm and RMSNorm on every instruction set against their `_ref`s.

mod common;

use common::{assert_close, isas, poisoned, tol, Rng};
use phi_kernels::cpu::layer_norm::{layer_norm_ref, layer_norm_with};
use phi_kernels::cpu::rms_norm::{rms_norm_ref, rms_norm_with};
use proptest::prelude::*;

/// (rows, cols): tile edges of 8/16-lane paths, the parallel split (577×1024, 65×3072).
const SHAPES: &[(usize, usize)] = &[
    (0, 64),
    (3, 0),
    (1, 1),
    (1, 3072),
    (15, 17),
    (16, 16),
    (17, 15),
    (63, 64),
    (65, 63),
    (64, 65),
    (96, 96),
    (577, 1024),
    (65, 3072),
];

fn check_layer_norm(rows: usize, cols: usize, offset: f32, seed: u64) {
    let mut rng = Rng::new(seed);
    // `offset` moves the mean far from 0, where one-pass variance would cancel.
    let x: Vec<f32> = rng
        .vec(rows * cols, 2.0)
        .iter()
        .map(|v| v + offset)
        .collect();
    let (w, b) = (rng.vec(cols, 1.5), rng.vec(cols, 0.5));
    let mut want = poisoned(rows * cols);
    layer_norm_ref(&x, &w, &b, 1e-5, &mut want, rows, cols);
    for isa in isas() {
        let mut got = poisoned(rows * cols);
        layer_norm_with(isa, &x, &w, &b, 1e-5, &mut got, rows, cols);
        assert_close(
            &format!("layer_norm {isa:?} {rows}x{cols} offset {offset}"),
            &got,
            &want,
            tol::NORM,
        );
    }
}

fn check_rms_norm(rows: usize, cols: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let x = rng.vec(rows * cols, 3.0);
    let w = rng.vec(cols, 1.5);
    let mut want = poisoned(rows * cols);
    rms_norm_ref(&x, &w, 1e-6, &mut want, rows, cols);
    for isa in isas() {
        let mut got = poisoned(rows * cols);
        rms_norm_with(isa, &x, &w, 1e-6, &mut got, rows, cols);
        assert_close(
            &format!("rms_norm {isa:?} {rows}x{cols}"),
            &got,
            &want,
            tol::NORM,
        );
    }
}

#[test]
fn layer_norm_awkward_shapes() {
    for (s, &(rows, cols)) in SHAPES.iter().enumerate() {
        check_layer_norm(rows, cols, 0.0, s as u64);
        check_layer_norm(rows, cols, 20.0, s as u64);
    }
}

#[test]
fn rms_norm_awkward_shapes() {
    for (s, &(rows, cols)) in SHAPES.iter().enumerate() {
        check_rms_norm(rows, cols, s as u64);
    }
}

#[test]
fn norms_leave_rows_past_the_end_alone() {
    // Buffers longer than rows·cols: the tail must not be written.
    for isa in isas() {
        let (rows, cols) = (3, 17);
        let x = Rng::new(1).vec(rows * cols + 5, 1.0);
        let w = vec![1.0; cols];
        let mut out = vec![7.0; rows * cols + 5];
        layer_norm_with(isa, &x, &w, &w, 1e-5, &mut out, rows, cols);
        rms_norm_with(isa, &x, &w, 1e-5, &mut out, rows, cols);
        assert!(out[rows * cols..].iter().all(|&v| v == 7.0), "{isa:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::proptest_cases(24)))]
    #[test]
    fn norms_fuzz(rows in 0usize..20, cols in 1usize..200, offset in -10f32..10.0, seed: u64) {
        check_layer_norm(rows, cols, offset, seed);
        check_rms_norm(rows, cols, seed);
    }
}
