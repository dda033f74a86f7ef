//! Attention on every instruction set against `attention_ref`: head_dim 64/96 and odd sizes,
//! causal and not, q_len != kv_len (prefill with cache, decode, more queries than keys),
//! batch > 1, fused-QKV and padded layouts, then proptest.

mod common;

use common::{assert_close, isas, tol, Rng};
use phi_kernels::cpu::attention::{attention_ref, attention_with, AttnDims, AttnLayout};
use proptest::prelude::*;

#[derive(Copy, Clone, Debug)]
struct Case {
    batch: usize,
    heads: usize,
    q_len: usize,
    kv_len: usize,
    d: usize,
    causal: bool,
    /// q, k and v as column ranges of one fused `[t, 3·heads·d]` buffer (needs q_len == kv_len).
    fused: bool,
    /// Extra elements per row and per batch of every operand.
    pad_row: usize,
    pad_batch: usize,
}

fn case(batch: usize, heads: usize, q_len: usize, kv_len: usize, d: usize, causal: bool) -> Case {
    Case {
        batch,
        heads,
        q_len,
        kv_len,
        d,
        causal,
        fused: false,
        pad_row: 0,
        pad_batch: 0,
    }
}

fn layout(len: usize, width: usize, c: &Case) -> AttnLayout {
    let row_stride = width + c.pad_row;
    AttnLayout {
        batch_stride: len * row_stride + c.pad_batch,
        row_stride,
        head_stride: None,
    }
}

fn run(c: Case, seed: u64) {
    let Case {
        batch,
        heads,
        q_len,
        kv_len,
        d,
        causal,
        fused,
        ..
    } = c;
    let width = heads * d;
    let dims = AttnDims {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim: d,
        causal,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let mut rng = Rng::new(seed);
    // Larger q·k spread than unit vectors give, so the softmax is far from uniform.
    let (q, k, v, ql, kl, vl);
    let fused_buf;
    if fused {
        assert_eq!(q_len, kv_len);
        let l = layout(q_len, 3 * width, &c);
        fused_buf = rng.vec(batch * l.batch_stride, 3.0);
        q = &fused_buf[..];
        k = &fused_buf[width..];
        v = &fused_buf[2 * width..];
        (ql, kl, vl) = (l, l, l);
    } else {
        ql = layout(q_len, width, &c);
        kl = layout(kv_len, width, &c);
        vl = layout(kv_len, width, &c);
        fused_buf = [
            rng.vec(batch * ql.batch_stride, 3.0),
            rng.vec(batch * kl.batch_stride, 3.0),
            rng.vec(batch * vl.batch_stride, 1.0),
        ]
        .concat();
        let (a, rest) = fused_buf.split_at(batch * ql.batch_stride);
        let (b, cc) = rest.split_at(batch * kl.batch_stride);
        (q, k, v) = (a, b, cc);
    }
    let ol = layout(q_len, width, &c);
    // Padding in `out` is NaN in both buffers; NaN == NaN is not accepted by `assert_close`, so
    // compare only the slots, after checking that the padding stayed NaN.
    let mut want = vec![f32::NAN; batch * ol.batch_stride];
    attention_ref(q, ql, k, kl, v, vl, &mut want, ol, &dims);
    let slots = |buf: &[f32]| -> Vec<f32> {
        let mut s = Vec::new();
        for b in 0..batch {
            for t in 0..q_len {
                s.extend_from_slice(&buf[b * ol.batch_stride + t * ol.row_stride..][..width]);
            }
        }
        s
    };
    let want_slots = slots(&want);
    for isa in isas() {
        let mut got = vec![f32::NAN; batch * ol.batch_stride];
        attention_with(isa, q, ql, k, kl, v, vl, &mut got, ol, &dims);
        let what = format!("attention {isa:?} {c:?}");
        let written = got.iter().filter(|x| !x.is_nan()).count();
        assert_eq!(
            written,
            batch * q_len * width,
            "{what}: wrote outside the output slots"
        );
        assert_close(&what, &slots(&got), &want_slots, tol::ATTENTION);
    }
}

#[test]
fn attention_model_shapes() {
    // CLIP: 16 heads × 64, non-causal, 577 tokens (two heads keep the f64 reference quick).
    run(case(1, 2, 577, 577, 64, false), 1);
    // Phi-3 prefill: 96-wide heads, causal, fused QKV buffer.
    run(
        Case {
            fused: true,
            ..case(1, 3, 65, 65, 96, true)
        },
        2,
    );
    // Prefill on top of a cache, and decode against a long cache.
    run(case(1, 2, 17, 96, 96, true), 3);
    run(case(2, 4, 1, 577, 96, true), 4);
    run(case(1, 32, 1, 63, 96, true), 5);
    // Decode split over several key chunks, rows seeing different prefixes, then merged.
    run(case(1, 2, 4, 1100, 64, true), 6);
    run(case(2, 3, 3, 700, 17, false), 7);
}

#[test]
fn attention_awkward_shapes() {
    let cases = [
        case(1, 1, 1, 1, 1, false),
        case(1, 1, 1, 1, 1, true),
        case(1, 2, 17, 17, 17, true),
        case(2, 3, 65, 65, 64, false),
        case(2, 1, 16, 16, 64, true),
        case(1, 2, 15, 63, 96, false),
        case(1, 2, 63, 15, 96, false),
        // More queries than keys, causal: the first rows see nothing and are 0.
        case(1, 2, 20, 10, 64, true),
        // Decode path (q_len <= 4) and the smallest block-path query count.
        case(1, 3, 4, 100, 64, true),
        case(1, 3, 5, 100, 64, true),
        case(3, 2, 2, 65, 17, false),
        // No keys at all: every output is 0.
        case(1, 2, 3, 0, 16, false),
        case(1, 2, 9, 0, 16, true),
        // Decode rows that see no key (q_len > kv_len, causal).
        case(1, 2, 4, 2, 16, true),
    ];
    for (s, &c) in cases.iter().enumerate() {
        run(c, 10 + s as u64);
    }
}

#[test]
fn attention_every_head_dim_up_to_256() {
    for (s, d) in [
        1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 95, 96, 97, 127, 128, 129, 200, 255,
        256,
    ]
    .into_iter()
    .enumerate()
    {
        run(case(1, 1, 9, 70, d, true), 100 + s as u64);
        run(case(1, 1, 2, 70, d, false), 200 + s as u64);
    }
}

#[test]
fn attention_strided_layouts() {
    for (s, &(fused, pad_row, pad_batch)) in
        [(false, 5, 0), (false, 0, 7), (false, 3, 11), (true, 2, 9)]
            .iter()
            .enumerate()
    {
        for &(q_len, kv_len) in &[(33, 33), (1, 33)] {
            if fused && q_len != kv_len {
                continue;
            }
            run(
                Case {
                    fused,
                    pad_row,
                    pad_batch,
                    ..case(2, 3, q_len, kv_len, 64, true)
                },
                300 + s as u64,
            );
            run(
                Case {
                    fused,
                    pad_row,
                    pad_batch,
                    ..case(2, 2, q_len, kv_len, 96, false)
                },
                400 + s as u64,
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::proptest_cases(24)))]
    #[test]
    fn attention_fuzz(
        batch in 1usize..3, heads in 1usize..4, q_len in 1usize..40, kv_len in 0usize..80, d in 1usize..100,
        causal: bool, pad_row in 0usize..4, pad_batch in 0usize..4, seed: u64,
    ) {
        run(Case { batch, heads, q_len, kv_len, d, causal, fused: false, pad_row, pad_batch }, seed);
    }
}

/// K and V in the head-major KV-cache layout (`[batch][heads][capacity][d]`, capacity > kv_len)
/// against the reference on the same values packed row-major: prefill with a cache, decode with
/// one and three queries, both head dims.
#[test]
fn head_major_kv_matches_packed() {
    for &(batch, heads, q_len, kv_len, d) in &[
        (1, 3, 1, 50, 96),
        (1, 4, 3, 200, 64),
        (2, 2, 17, 40, 96),
        (1, 2, 40, 40, 33),
    ] {
        let cap = kv_len + 5;
        let width = heads * d;
        let dims = AttnDims {
            batch,
            heads,
            q_len,
            kv_len,
            head_dim: d,
            causal: true,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let mut rng = Rng::new(kv_len as u64);
        let q = rng.vec(batch * q_len * width, 3.0);
        let (k, v) = (
            rng.vec(batch * kv_len * width, 3.0),
            rng.vec(batch * kv_len * width, 1.0),
        );
        let packed_q = AttnLayout::packed(q_len, width);
        let packed_kv = AttnLayout::packed(kv_len, width);
        let hm = AttnLayout::head_major(heads, cap, d);
        // The same K/V, head-major, NaN in the unused capacity.
        let mut kh = vec![f32::NAN; batch * hm.batch_stride];
        let mut vh = kh.clone();
        for b in 0..batch {
            for t in 0..kv_len {
                for h in 0..heads {
                    let src = packed_kv.offset(b, t, h, d);
                    let dst = hm.offset(b, t, h, d);
                    kh[dst..dst + d].copy_from_slice(&k[src..src + d]);
                    vh[dst..dst + d].copy_from_slice(&v[src..src + d]);
                }
            }
        }
        let mut want = vec![0f32; batch * q_len * width];
        attention_ref(
            &q, packed_q, &k, packed_kv, &v, packed_kv, &mut want, packed_q, &dims,
        );
        for isa in isas() {
            let mut got = vec![f32::NAN; batch * q_len * width];
            attention_with(
                isa, &q, packed_q, &kh, hm, &vh, hm, &mut got, packed_q, &dims,
            );
            assert_close(
                &format!("head-major KV {isa:?} b{batch} h{heads} q{q_len} kv{kv_len} d{d}"),
                &got,
                &want,
                tol::ATTENTION,
            );
        }
    }
}

/// bf16 keys and values (the `--dtype bf16` KV cache), head-major and row-major, prefill and
/// decode, against the reference on the same bf16 values.
#[test]
fn bf16_kv_matches_the_reference() {
    use half::bf16;
    use phi_kernels::cpu::attention::{attention_kv_ref, attention_kv_with};
    use phi_kernels::Weight;
    for &(heads, q_len, kv_len, d, head_major) in &[
        (3, 1, 300, 96, true),
        (2, 3, 129, 64, true),
        (2, 20, 50, 96, true),
        (4, 1, 77, 64, false),
        (2, 33, 33, 40, false),
        // Decode over a bf16 cache read in place, d not a multiple of 16, several tiles.
        (2, 2, 290, 40, true),
        (1, 1, 260, 48, false),
    ] {
        let width = heads * d;
        let dims = AttnDims {
            batch: 1,
            heads,
            q_len,
            kv_len,
            head_dim: d,
            causal: true,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let kvl = if head_major {
            AttnLayout::head_major(heads, kv_len + 3, d)
        } else {
            AttnLayout::packed(kv_len, width)
        };
        let mut rng = Rng::new(kv_len as u64 + 7);
        let q = rng.vec(q_len * width, 3.0);
        let to_bf16 = |x: Vec<f32>| -> Vec<bf16> { x.iter().map(|&v| bf16::from_f32(v)).collect() };
        let k = to_bf16(rng.vec(kvl.batch_stride, 3.0));
        let v = to_bf16(rng.vec(kvl.batch_stride, 1.0));
        let ql = AttnLayout::packed(q_len, width);
        let mut want = vec![0f32; q_len * width];
        attention_kv_ref(
            &q,
            ql,
            Weight::Bf16(&k),
            kvl,
            Weight::Bf16(&v),
            kvl,
            &mut want,
            ql,
            &dims,
        );
        for isa in isas() {
            let mut got = vec![f32::NAN; q_len * width];
            attention_kv_with(
                isa,
                &q,
                ql,
                Weight::Bf16(&k),
                kvl,
                Weight::Bf16(&v),
                kvl,
                &mut got,
                ql,
                &dims,
            );
            assert_close(
                &format!(
                    "bf16 KV {isa:?} h{heads} q{q_len} kv{kv_len} d{d} head_major={head_major}"
                ),
                &got,
                &want,
                tol::ATTENTION,
            );
        }
    }
}
