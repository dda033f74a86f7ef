//! Row softmax on every instruction set against `softmax_ref`.

mod common;

use common::{assert_close, isas, tol, Rng};
use phi_kernels::cpu::softmax::{softmax_ref, softmax_with};
use proptest::prelude::*;

fn check(rows: usize, cols: usize, scale: f32, seed: u64) {
    let x = Rng::new(seed).vec(rows * cols, scale);
    let mut want = x.clone();
    softmax_ref(&mut want, rows, cols);
    for isa in isas() {
        let mut got = x.clone();
        softmax_with(isa, &mut got, rows, cols);
        assert_close(
            &format!("softmax {isa:?} {rows}x{cols} scale {scale}"),
            &got,
            &want,
            tol::SOFTMAX,
        );
    }
}

#[test]
fn softmax_awkward_shapes() {
    let shapes = [
        (0, 5),
        (4, 0),
        (1, 1),
        (1, 3072),
        (15, 17),
        (16, 16),
        (17, 15),
        (63, 64),
        (65, 63),
        (96, 96),
        (577, 577),
        (17, 1024),
    ];
    for (s, &(rows, cols)) in shapes.iter().enumerate() {
        for scale in [1.0, 30.0] {
            check(rows, cols, scale, s as u64);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::proptest_cases(24)))]
    #[test]
    fn softmax_fuzz(rows in 0usize..10, cols in 1usize..300, scale in 0.1f32..50.0, seed: u64) {
        check(rows, cols, scale, seed);
    }
}
