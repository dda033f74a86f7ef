//! Rotate-half RoPE on every instruction set against `rope_ref`, packed and strided rows.

mod common;

use common::{assert_close, isas, tol, Rng};
use phi_kernels::cpu::rope::{rope_ref, rope_with};
use proptest::prelude::*;

fn check(rows: usize, heads: usize, head_dim: usize, pad: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let row_stride = heads * head_dim + pad;
    // Padding between rows is random on both sides and must come back untouched.
    let x = rng.vec(rows * row_stride, 2.0);
    let (cos, sin) = (rng.vec(rows * head_dim, 1.0), rng.vec(rows * head_dim, 1.0));
    let mut want = x.clone();
    rope_ref(&mut want, rows, row_stride, heads, head_dim, &cos, &sin);
    for isa in isas() {
        let mut got = x.clone();
        rope_with(isa, &mut got, rows, row_stride, heads, head_dim, &cos, &sin);
        assert_close(
            &format!("rope {isa:?} rows {rows} heads {heads} d {head_dim} pad {pad}"),
            &got,
            &want,
            tol::ROPE,
        );
    }
}

#[test]
fn rope_awkward_shapes() {
    // (rows, heads, head_dim, row padding): d = 96 (Phi-3), 64, odd and tiny dims, the
    // decoder's fused-QKV stride (pad = 2·3072) and a parallel split (577 rows × 1024).
    let cases = [
        (0, 2, 64, 0),
        (1, 1, 1, 0),
        (1, 1, 2, 0),
        (3, 2, 64, 5),
        (17, 4, 96, 0),
        (5, 3, 17, 1),
        (2, 2, 15, 0),
        (16, 1, 34, 0),
        (65, 32, 96, 2 * 3072),
        (577, 16, 64, 0),
        (1, 32, 96, 0),
    ];
    for (s, &(rows, heads, d, pad)) in cases.iter().enumerate() {
        check(rows, heads, d, pad, s as u64);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::proptest_cases(24)))]
    #[test]
    fn rope_fuzz(rows in 0usize..12, heads in 1usize..5, head_dim in 1usize..130, pad in 0usize..9, seed: u64) {
        check(rows, heads, head_dim, pad, seed);
    }
}
