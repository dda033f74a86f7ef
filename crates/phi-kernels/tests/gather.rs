//! The copy kernels (merge_2x2, embedding) on every instruction set: bit-exact against `_ref`.

mod common;

use common::{assert_close, isas, poisoned, OwnedWeight, Rng, EXACT, WDTYPES};
use phi_kernels::cpu::embedding::{embedding_ref, embedding_with};
use phi_kernels::cpu::merge_2x2::{merge_2x2_ref, merge_2x2_with};
use phi_kernels::Isa;
use proptest::prelude::*;

fn check_merge(n: usize, g: usize, c: usize, seed: u64) {
    let feat = Rng::new(seed).vec(n * g * g * c, 1.0);
    let len = n * (g / 2) * (g / 2) * 4 * c;
    let mut want = poisoned(len);
    merge_2x2_ref(&feat, &mut want, n, g, c);
    for isa in isas() {
        let mut got = poisoned(len);
        merge_2x2_with(isa, &feat, &mut got, n, g, c);
        assert_close(
            &format!("merge_2x2 {isa:?} n {n} g {g} c {c}"),
            &got,
            &want,
            EXACT,
        );
    }
}

#[test]
fn merge_2x2_awkward_shapes() {
    // (n, grid, channels): the real CLIP grid is 24×24 with c = 1024.
    for (s, &(n, g, c)) in [
        (0, 4, 3),
        (1, 2, 1),
        (2, 4, 3),
        (1, 24, 17),
        (3, 24, 64),
        (1, 2, 1024),
        (2, 24, 1024),
        (1, 6, 15),
    ]
    .iter()
    .enumerate()
    {
        check_merge(n, g, c, s as u64);
    }
}

fn check_embedding(vocab: usize, hidden: usize, tokens: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut ids: Vec<u32> = (0..tokens)
        .map(|_| rng.below(vocab as u64) as u32)
        .collect();
    if tokens >= 2 {
        ids[0] = 0;
        ids[1] = vocab as u32 - 1;
    }
    for dtype in WDTYPES {
        let table = OwnedWeight::random(&mut rng, vocab * hidden, 1.0, dtype);
        let mut want = poisoned(tokens * hidden);
        embedding_ref(&ids, table.view(), hidden, &mut want);
        for isa in isas() {
            let mut got = poisoned(tokens * hidden);
            embedding_with(isa, &ids, table.view(), hidden, &mut got);
            assert_close(
                &format!("embedding {isa:?} {dtype:?} hidden {hidden} tokens {tokens}"),
                &got,
                &want,
                EXACT,
            );
        }
    }
}

#[test]
fn embedding_awkward_shapes() {
    for (s, &(vocab, hidden, tokens)) in [
        (1, 1, 1),
        (5, 1, 0),
        (100, 17, 15),
        (100, 64, 65),
        (33, 96, 16),
        (50, 3072, 17),
        (1000, 16, 577),
    ]
    .iter()
    .enumerate()
    {
        check_embedding(vocab, hidden, tokens, s as u64);
    }
}

#[test]
#[should_panic(expected = "out of range")]
fn embedding_rejects_out_of_range_ids() {
    let table = vec![0f32; 4 * 3];
    let mut out = vec![0f32; 3];
    embedding_with(
        Isa::Scalar,
        &[4],
        phi_kernels::Weight::F32(&table),
        3,
        &mut out,
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::proptest_cases(24)))]
    #[test]
    fn gather_fuzz(n in 0usize..3, half in 1usize..7, c in 1usize..40, vocab in 1usize..50, hidden in 1usize..70,
                   tokens in 0usize..20, seed: u64) {
        check_merge(n, 2 * half, c, seed);
        check_embedding(vocab, hidden, tokens, seed);
    }
}
