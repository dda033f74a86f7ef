//! Criterion benches of the CPU kernels at Phi-3-vision shapes, on the active instruction set
//! (`PHI_KERNELS_ISA` to force one) and the global rayon pool (`RAYON_NUM_THREADS`).
//!
//! Throughput is FLOPs for GEMM and attention (criterion's "elements/s" reads as FLOP/s) and
//! bytes moved for LayerNorm. Ceilings to compare against (shared/machine.md): one core's f32
//! FMA peak is 160-210 GFLOP/s, two cores 330-400; DRAM reads about 12.7 GB/s on one thread.
//! The decode GEMVs rotate through more weight bytes than the L3 holds (1.25 GiB of distinct
//! copies), so they measure DRAM. Names carry the shapes (`m x k x n` for GEMM).
//! The prefill T = 2509 and x17-crop shapes take seconds per call: filter them out for quick runs
//! (`-- --skip 2509 --skip x17`). `cargo xtask bench` prints the same shapes as one table next to
//! ceilings measured in the same run.
//!
//! `cargo bench -p phi3v-benches --bench kernels [-- filter]`

use std::hint::black_box;
use std::time::Duration;

use criterion::{
    criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode, Throughput,
};
use half::bf16;
use phi_kernels::cpu::{
    attention, gelu_erf, gemm, gemm_fused, gemm_opts, layer_norm, quick_gelu, rms_norm, silu_mul,
    ARows, Activation, AttnDims, AttnLayout, GemmOpts, MergedRows,
};
use phi_kernels::{DType, HugeBuf, Weight};

/// Deterministic, non-trivial values in [-1, 1).
fn fill(n: usize, seed: u32) -> Vec<f32> {
    values(seed).take(n).collect()
}

/// [`fill`]'s values as an endless stream (to fill a buffer in place).
fn values(seed: u32) -> impl Iterator<Item = f32> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    std::iter::repeat_with(move || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        (x >> 8) as f32 / (1u32 << 23) as f32 - 1.0
    })
}

/// (name, m, n, k) with `C[m, n] = A[m, k] · B[n, k]ᵀ`; names are `m x k x n`.
const GEMM_SHAPES: &[(&str, usize, usize, usize)] = &[
    ("clip_qkv_out_577x1024x1024", 577, 1024, 1024),
    ("clip_fc1_577x1024x4096", 577, 4096, 1024),
    ("clip_fc2_577x4096x1024", 577, 1024, 4096),
    ("clip_qkv_out_x17_9809x1024x1024", 577 * 17, 1024, 1024),
    ("clip_fc1_x17_9809x1024x4096", 577 * 17, 4096, 1024),
    ("clip_fc2_x17_9809x4096x1024", 577 * 17, 1024, 4096),
    ("projector_fc1_2509x4096x3072", 2509, 3072, 4096),
    ("projector_fc2_2509x3072x3072", 2509, 3072, 3072),
    ("prefill_qkv_757x3072x9216", 757, 9216, 3072),
    ("prefill_o_757x3072x3072", 757, 3072, 3072),
    ("prefill_gate_up_757x3072x16384", 757, 16384, 3072),
    ("prefill_down_757x8192x3072", 757, 3072, 8192),
    ("prefill_qkv_2509x3072x9216", 2509, 9216, 3072),
    ("prefill_o_2509x3072x3072", 2509, 3072, 3072),
    ("prefill_gate_up_2509x3072x16384", 2509, 16384, 3072),
    ("prefill_down_2509x8192x3072", 2509, 3072, 8192),
];

fn bench_gemm(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemm");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for &(name, m, n, k) in GEMM_SHAPES {
        let a = fill(m * k, 1);
        let wf = fill(n * k, 2);
        let wb: Vec<bf16> = wf.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        // Weight dtype, and the precision of the products: "bf16_products" rounds the
        // activations to bf16 as `--dtype bf16` does.
        for (label, w, precision) in [
            ("f32", Weight::F32(&wf), DType::F32),
            ("bf16", Weight::Bf16(&wb), DType::F32),
            ("bf16_products", Weight::Bf16(&wb), DType::BF16),
        ] {
            let opts = GemmOpts {
                precision,
                ..GemmOpts::default()
            };
            g.bench_function(BenchmarkId::new(name, label), |b| {
                b.iter(|| gemm_opts(black_box(&a), k, w, &mut out, n, m, n, k, &opts))
            });
        }
    }
    g.finish();
}

/// Bytes of distinct weight copies a decode GEMV rotates through: well over the 480 MiB L3.
const GEMV_POOL_BYTES: usize = 5 << 28;

/// Decode GEMVs, `m x k x n` (one token of `m` sequences decoded together): (name, m, n, k).
const GEMV_SHAPES: &[(&str, usize, usize, usize)] = &[
    ("decode_qkv_1x3072x9216", 1, 9216, 3072),
    ("decode_gate_up_1x3072x16384", 1, 16384, 3072),
    ("decode_down_1x8192x3072", 1, 3072, 8192),
    ("decode_lm_head_1x3072x32064", 1, 32064, 3072),
    ("decode2_qkv_2x3072x9216", 2, 9216, 3072),
    ("decode3_qkv_3x3072x9216", 3, 9216, 3072),
    ("decode4_qkv_4x3072x9216", 4, 9216, 3072),
    ("decode4_gate_up_4x3072x16384", 4, 16384, 3072),
    ("decode8_qkv_8x3072x9216", 8, 9216, 3072),
    ("prompt16_qkv_16x3072x9216", 16, 9216, 3072),
];

fn bench_gemv(c: &mut Criterion) {
    let mut g = c.benchmark_group("gemv");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    // Criterion's bytes/s here are weight bytes read per call: compare with DRAM bandwidth.
    // On huge pages, as the resident weights are (see `HugeBuf`).
    let mut pool = HugeBuf::<bf16>::zeroed(GEMV_POOL_BYTES / 2).expect("GEMV weight pool");
    for (v, x) in pool.iter_mut().zip(values(20)) {
        *v = bf16::from_f32(x);
    }
    for &(name, m, n, k) in GEMV_SHAPES {
        let per = n * k;
        let copies = pool.len() / per;
        let a = fill(m * k, 3);
        let mut out = vec![0f32; m * n];
        let mut i = 0;
        g.throughput(Throughput::Bytes((per * 2) as u64));
        g.bench_function(BenchmarkId::new(name, "bf16"), |b| {
            b.iter(|| {
                i = (i + 1) % copies;
                let w = Weight::Bf16(&pool[i * per..(i + 1) * per]);
                gemm(black_box(&a), k, w, None, &mut out, n, m, n, k, false)
            })
        });
    }
    drop(pool);
    // f32 weights for the qkv shape, over a pool of the same size.
    let (name, _, n, k) = GEMV_SHAPES[0];
    let mut pool = HugeBuf::<f32>::zeroed(GEMV_POOL_BYTES / 4).expect("GEMV weight pool");
    for (v, x) in pool.iter_mut().zip(values(30)) {
        *v = x;
    }
    let per = n * k;
    let copies = pool.len() / per;
    let a = fill(k, 3);
    let mut out = vec![0f32; n];
    let mut i = 0;
    g.throughput(Throughput::Bytes((per * 4) as u64));
    g.bench_function(BenchmarkId::new(name, "f32"), |b| {
        b.iter(|| {
            i = (i + 1) % copies;
            let w = Weight::F32(&pool[i * per..(i + 1) * per]);
            gemm(black_box(&a), k, w, None, &mut out, n, 1, n, k, false)
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

fn bench_rms_norm(c: &mut Criterion) {
    let (rows, cols) = (757, 3072);
    let x = fill(rows * cols, 4);
    let w = fill(cols, 5);
    let mut out = vec![0f32; rows * cols];
    let mut g = c.benchmark_group("rms_norm");
    g.sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2));
    g.throughput(Throughput::Bytes((2 * rows * cols * 4) as u64));
    g.bench_function("decoder_757x3072", |bch| {
        bch.iter(|| rms_norm(black_box(&x), &w, 1e-5, &mut out, rows, cols))
    });
    g.finish();
}

/// (name, tokens, heads, head_dim, causal): CLIP ViT-L/14-336 self-attention of one crop, and the
/// decoder's causal prefill.
const ATTN_SHAPES: &[(&str, usize, usize, usize, bool)] = &[
    ("clip_577x577_d64_h16", 577, 16, 64, false),
    ("prefill_causal_757_d96_h32", 757, 32, 96, true),
    ("prefill_causal_2509_d96_h32", 2509, 32, 96, true),
];

fn bench_attention(c: &mut Criterion) {
    let mut g = c.benchmark_group("attention");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for &(name, t, heads, d, causal) in ATTN_SHAPES {
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
            causal,
            scale: 1.0 / (d as f32).sqrt(),
        };
        // QKᵀ and PV: 2 · 2 · t² · d per head, half of it under a causal mask.
        let flops = 4 * t * t * d * heads;
        g.throughput(Throughput::Elements(
            (if causal { flops / 2 } else { flops }) as u64,
        ));
        g.bench_function(name, |b| {
            b.iter(|| attention(black_box(&q), l, &k, l, &v, l, &mut out, l, &dims))
        });
    }
    g.finish();
}

/// CLIP's fc1 with QuickGELU fused into the GEMM's epilogue against the GEMM then a separate
/// pass, and the projector's fc1 with GELU likewise: what the fusion saves.
fn bench_epilogue(c: &mut Criterion) {
    let mut g = c.benchmark_group("epilogue");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let shapes = [
        (
            "clip_fc1_quick_gelu_577x1024x4096",
            577,
            4096,
            1024,
            Activation::QuickGelu,
        ),
        (
            "projector_fc1_gelu_2509x4096x3072",
            2509,
            3072,
            4096,
            Activation::GeluErf,
        ),
    ];
    for (name, m, n, k, activation) in shapes {
        let a = fill(m * k, 1);
        let wb: Vec<bf16> = fill(n * k, 2).iter().map(|&x| bf16::from_f32(x)).collect();
        let w = Weight::Bf16(&wb);
        let bias = fill(n, 3);
        let mut out = vec![0f32; m * n];
        g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
        let fused = GemmOpts {
            bias: Some(&bias),
            activation,
            ..GemmOpts::default()
        };
        g.bench_function(BenchmarkId::new(name, "fused"), |b| {
            b.iter(|| gemm_opts(black_box(&a), k, w, &mut out, n, m, n, k, &fused))
        });
        g.bench_function(BenchmarkId::new(name, "separate"), |b| {
            b.iter(|| {
                gemm(
                    black_box(&a),
                    k,
                    w,
                    Some(&bias),
                    &mut out,
                    n,
                    m,
                    n,
                    k,
                    false,
                );
                match activation {
                    Activation::QuickGelu => quick_gelu(&mut out),
                    _ => gelu_erf(&mut out),
                }
            })
        });
    }
    g.finish();
}

/// The fusions into a GEMM's A packing and epilogue, each against the same work in separate
/// passes: LayerNorm into CLIP's q_proj (one crop), SwiGLU into gate_up at a 757-token prefill,
/// and the 2×2 merge with the separator rows into the projector's first layer (one image at 16
/// crops). bf16 weights, f32 products.
fn bench_fusion(c: &mut Criterion) {
    let mut g = c.benchmark_group("fusion");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    let weights = |n: usize, k: usize| -> Vec<bf16> {
        fill(n * k, 2).iter().map(|&x| bf16::from_f32(x)).collect()
    };
    let opts = GemmOpts::default();

    let (m, k, n) = (577, 1024, 1024);
    let (x, gamma, beta) = (fill(m * k, 1), fill(k, 5), fill(k, 6));
    let wb = weights(n, k);
    let w = Weight::Bf16(&wb);
    let mut out = vec![0f32; m * n];
    let mut normed = vec![0f32; m * k];
    g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
    let a = ARows::LayerNorm {
        x: &x,
        weight: &gamma,
        bias: &beta,
        eps: 1e-5,
    };
    let name = "clip_ln_q_proj_577x1024x1024";
    g.bench_function(BenchmarkId::new(name, "fused"), |b| {
        b.iter(|| gemm_fused(black_box(a), w, &mut out, n, m, n, k, &opts, None))
    });
    g.bench_function(BenchmarkId::new(name, "separate"), |b| {
        b.iter(|| {
            layer_norm(black_box(&x), &gamma, &beta, 1e-5, &mut normed, m, k);
            gemm_opts(&normed, k, w, &mut out, n, m, n, k, &opts)
        })
    });

    let (m, k, n) = (757, 3072, 16384);
    let x = fill(m * k, 1);
    let wb = weights(n, k);
    let w = Weight::Bf16(&wb);
    let mut gate_up = vec![0f32; m * n];
    let mut act = vec![0f32; m * n / 2];
    g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
    let name = "prefill_gate_up_swiglu_757x3072x16384";
    g.bench_function(BenchmarkId::new(name, "fused"), |b| {
        b.iter(|| {
            let glu = Some((&mut act[..], n / 2));
            let a = ARows::dense(black_box(&x), k);
            gemm_fused(a, w, &mut gate_up, n, m, n, k, &opts, glu)
        })
    });
    g.bench_function(BenchmarkId::new(name, "separate"), |b| {
        b.iter(|| {
            gemm_opts(black_box(&x), k, w, &mut gate_up, n, m, n, k, &opts);
            silu_mul(&gate_up, &mut act, m, n / 2)
        })
    });

    // One image at 16 crops: 17 crops of CLIP output [577, 1024] in the projector's row order.
    let (c_in, k, n) = (1024, 4096, 3072);
    let sources = phi_projector::hd_token_sources(4, 4, 0).expect("a 4x4 grid");
    let m = sources.len();
    let feat = fill(17 * 577 * c_in, 1);
    let (sub, glb) = (fill(k, 5), fill(k, 6));
    let lits: [&[f32]; 2] = [&sub, &glb];
    let rows = MergedRows {
        feat: &feat,
        grid_stride: 577 * c_in,
        first: c_in,
        g: 24,
        c: c_in,
        sources: &sources,
        literals: &lits,
    };
    let wb = weights(n, k);
    let w = Weight::Bf16(&wb);
    let mut out = vec![0f32; m * n];
    g.throughput(Throughput::Elements(2 * (m * n * k) as u64));
    let name = "projector_merge_fc1_2509x4096x3072";
    g.bench_function(BenchmarkId::new(name, "fused"), |b| {
        b.iter(|| {
            gemm_fused(
                ARows::Merged(black_box(&rows)),
                w,
                &mut out,
                n,
                m,
                n,
                k,
                &opts,
                None,
            )
        })
    });
    g.bench_function(BenchmarkId::new(name, "separate"), |b| {
        b.iter(|| {
            // The projector's own layout pass (merge, grid, separators), then the GEMM.
            let a = phi_projector::hd_feature_transform(black_box(&feat), 4, 4, c_in, &sub, &glb)
                .expect("17 crops for a 4x4 grid");
            gemm_opts(&a, k, w, &mut out, n, m, n, k, &opts)
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_gemm,
    bench_epilogue,
    bench_fusion,
    bench_gemv,
    bench_layer_norm,
    bench_rms_norm,
    bench_attention
);
criterion_main!(benches);
