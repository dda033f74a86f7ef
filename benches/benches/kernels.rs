//! Criterion benches of the CPU kernels at Phi-3-vision shapes, on the active instruction set
//! (`PHI_KERNELS_ISA` to force one) and the global rayon pool (`RAYON_NUM_THREADS`).
//!
//! Throughput is FLOPs for GEMM and attention (criterion's "elements/s" reads as FLOP/s) and
//! bytes moved for LayerNorm. Ceilings to compare against (shared/machine.md): one core's f32
//! FMA peak is 160-210 GFLOP/s, two cores 330-400; DRAM reads about 12.7 GB/s on one thread.
//! The decode GEMV rotates through more weight bytes than the L3 holds, so it measures DRAM.
//!
//! `cargo bench -p phi3v-benches --bench kernels [-- filter]`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use phi_kernels::cpu::{attention, gemm, layer_norm, AttnDims, AttnLayout};
use phi_kernels::Weight;

/// Deterministic, non-trivial values in [-1, 1).
fn fill(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        })
        .collect()
}

/// (name, m, n, k) with `C[m, n] = A[m, k] · B[n, k]ᵀ`.
const GEMM_SHAPES: &[(&str, usize, usize, usize)] = &[
    ("clip_fc1_577x1024x4096", 577, 4096, 1024),
    ("clip_fc2_577x4096x1024", 577, 1024, 4096),
];

fn bench_gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for &(name, m, n, k) in GEMM_SHAPES {
        let a = fill(m * k, 1);
        let wf = fill(n * k, 2);
        let wb: Vec<bf16> = wf.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        for (dtype, w) in [("f32", Weight::F32(&wf)), ("bf16", Weight::Bf16(&wb))] {
            g.bench_function(BenchmarkId::new(name, dtype), |b| {
                b.iter(|| gemm(black_box(&a), k, w, None, &mut out, n, m, n, k, false))
            });
        }
    }
    g.finish();
}

fn bench_gemv(c: &mut Criterion) {
    // Decode: qkv_proj of Phi-3-mini, one token. Enough distinct weight copies to exceed the L3.
    let (n, k) = (9216, 3072);
    let mut g = c.benchmark_group("gemv");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    g.throughput(Throughput::Elements(2 * (n * k) as u64));
    let a = fill(k, 3);
    let mut out = vec![0f32; n];
    let wf: Vec<Vec<f32>> = (0..3).map(|s| fill(n * k, 10 + s)).collect();
    let mut i = 0;
    g.bench_function(BenchmarkId::new("decode_1x3072x9216", "f32"), |b| {
        b.iter(|| {
            i = (i + 1) % wf.len();
            gemm(
                &a,
                k,
                Weight::F32(&wf[i]),
                None,
                &mut out,
                n,
                1,
                n,
                k,
                false,
            )
        })
    });
    drop(wf);
    let wb: Vec<Vec<bf16>> = (0..5)
        .map(|s| {
            fill(n * k, 20 + s)
                .iter()
                .map(|&x| bf16::from_f32(x))
                .collect()
        })
        .collect();
    g.bench_function(BenchmarkId::new("decode_1x3072x9216", "bf16"), |b| {
        b.iter(|| {
            i = (i + 1) % wb.len();
            gemm(
                &a,
                k,
                Weight::Bf16(&wb[i]),
                None,
                &mut out,
                n,
                1,
                n,
                k,
                false,
            )
        })
    });
    g.finish();
}

fn bench_layer_norm(c: &mut Criterion) {
    let (rows, cols) = (577, 1024);
    let x = fill(rows * cols, 4);
    let (w, b) = (fill(cols, 5), fill(cols, 6));
    let mut out = vec![0f32; rows * cols];
    let mut g = c.benchmark_group("layer_norm");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Bytes((2 * rows * cols * 4) as u64));
    g.bench_function("clip_577x1024", |bch| {
        bch.iter(|| layer_norm(black_box(&x), &w, &b, 1e-5, &mut out, rows, cols))
    });
    g.finish();
}

fn bench_attention(c: &mut Criterion) {
    // CLIP ViT-L/14-336 self-attention of one crop: 577 tokens, 16 heads × 64, non-causal.
    let (t, heads, d) = (577, 16, 64);
    let width = heads * d;
    let (q, k, v) = (fill(t * width, 7), fill(t * width, 8), fill(t * width, 9));
    let mut out = vec![0f32; t * width];
    let l = AttnLayout::packed(t, width);
    let dims = AttnDims {
        batch: 1,
        heads,
        q_len: t,
        kv_len: t,
        head_dim: d,
        causal: false,
        scale: 0.125,
    };
    let mut g = c.benchmark_group("attention");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    // QKᵀ and PV: 2 · 2 · t² · d per head.
    g.throughput(Throughput::Elements((4 * t * t * d * heads) as u64));
    g.bench_function("clip_577x577_d64_h16", |b| {
        b.iter(|| attention(black_box(&q), l, &k, l, &v, l, &mut out, l, &dims))
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_gemm,
    bench_gemv,
    bench_layer_norm,
    bench_attention
);
criterion_main!(benches);
