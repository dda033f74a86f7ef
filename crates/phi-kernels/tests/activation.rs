//! quick_gelu, gelu_erf and silu_mul on every instruction set against their `_ref`s, plus a
//! dense sweep that pins the polynomial `exp`/`erf` accuracy.

mod common;

use common::{assert_close, isas, poisoned, tol, Rng, Tol};
use phi_kernels::cpu::activation::{
    gelu_erf_ref, gelu_erf_with, quick_gelu_ref, quick_gelu_with, silu_mul_ref, silu_mul_with,
};
use proptest::prelude::*;

const LENS: &[usize] = &[0, 1, 15, 16, 17, 63, 64, 65, 96, 577, 1024, 3072, 577 * 64];

/// Values over the whole interesting range, plus saturating extremes.
fn inputs(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut x = rng.vec(n, 8.0);
    for (i, v) in [
        -100.0,
        -30.0,
        -9.0,
        9.0,
        30.0,
        100.0,
        0.0,
        std::f32::consts::SQRT_2,
        -std::f32::consts::SQRT_2,
    ]
    .into_iter()
    .enumerate()
    {
        if i < n {
            x[i] = v;
        }
    }
    x
}

fn check_in_place(
    name: &str,
    x: &[f32],
    f: impl Fn(phi_kernels::Isa, &mut [f32]),
    r: impl Fn(&mut [f32]),
    t: Tol,
) {
    let mut want = x.to_vec();
    r(&mut want);
    for isa in isas() {
        let mut got = x.to_vec();
        f(isa, &mut got);
        assert_close(&format!("{name} {isa:?} n={}", x.len()), &got, &want, t);
    }
}

#[test]
fn quick_gelu_and_gelu_erf_awkward_lengths() {
    for (s, &n) in LENS.iter().enumerate() {
        let x = inputs(n, s as u64);
        check_in_place(
            "quick_gelu",
            &x,
            quick_gelu_with,
            quick_gelu_ref,
            tol::ACTIVATION,
        );
        check_in_place("gelu_erf", &x, gelu_erf_with, gelu_erf_ref, tol::ACTIVATION);
    }
}

#[test]
fn gelu_erf_dense_sweep() {
    // Every 1/1024 over [-8, 8]: covers both erf polynomials, their seam at |x|/√2 = 1 and the
    // clamp at 4. Tighter than the general activation tolerance.
    let x: Vec<f32> = (-8192..=8192).map(|i| i as f32 / 1024.0).collect();
    let t = Tol {
        atol: 3e-7,
        rtol: 2e-6,
        rel_l2: 3e-7,
    };
    check_in_place("gelu_erf sweep", &x, gelu_erf_with, gelu_erf_ref, t);
    check_in_place("quick_gelu sweep", &x, quick_gelu_with, quick_gelu_ref, t);
}

fn check_silu_mul(rows: usize, inter: usize, seed: u64) {
    let gate_up = inputs(rows * 2 * inter, seed);
    let mut want = poisoned(rows * inter);
    silu_mul_ref(&gate_up, &mut want, rows, inter);
    for isa in isas() {
        let mut got = poisoned(rows * inter);
        silu_mul_with(isa, &gate_up, &mut got, rows, inter);
        assert_close(
            &format!("silu_mul {isa:?} {rows}x{inter}"),
            &got,
            &want,
            tol::ACTIVATION,
        );
    }
}

#[test]
fn silu_mul_awkward_shapes() {
    for (s, &(rows, inter)) in [
        (0, 8),
        (1, 1),
        (1, 3072),
        (15, 17),
        (16, 16),
        (17, 63),
        (64, 65),
        (96, 96),
        (65, 1024),
        (3, 577),
    ]
    .iter()
    .enumerate()
    {
        check_silu_mul(rows, inter, s as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::proptest_cases(24)))]
    #[test]
    fn activations_fuzz(n in 0usize..300, rows in 0usize..8, inter in 1usize..100, seed: u64) {
        let x = inputs(n, seed);
        check_in_place("quick_gelu", &x, quick_gelu_with, quick_gelu_ref, tol::ACTIVATION);
        check_in_place("gelu_erf", &x, gelu_erf_with, gelu_erf_ref, tol::ACTIVATION);
        check_silu_mul(rows, inter, seed);
    }
}
