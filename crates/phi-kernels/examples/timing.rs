//! Quick kernel timings against the machine's FMA peak (see shared/machine.md):
//! - `cargo run --release -p phi-kernels --example timing [threads...]`: GEMM GFLOP/s table,
//!   best of 12 calls (`ISA` to pick one, `SHAPES="M,N,K;M,N,K"` for other shapes);
//! - `timing peak`, `timing once M N K f32|bf16 ITERS`, `timing attn T HEADS D causal|full ITERS`
//!   (`Q_LEN=1` for decode against T cached keys, `KV=bf16` from a bf16 cache, `LAYERS` caches
//!   in turn, `THREADS` for the pool, default 1; attn prints its best call):
//!   one-thread runs for `perf stat -e task-clock` (CPU time is immune to other processes sharing
//!   the cores; compare against `timing peak` measured the same way);
//! - `timing ratio ROUNDS M N K` / `timing ratio ROUNDS kernel KC PANELS CALLS`: each call's rate
//!   over the FMA peak probed around it, the steadiest figure on a shared machine (`THREADS`,
//!   `LDC_PAD` to pad C's rows, `QUIET` for the probe rate a round needs to count as quiet);
//! - `timing fused swiglu|ln|merge ROUNDS M N K`: the fused GEMM and the same work in separate
//!   passes, alternating, each round's ratio fused / separate and the median (`THREADS`,
//!   default 2; bf16 weights, f32 products; `SHARED` GEMMs reading one LayerNorm; merge takes
//!   M = 2509, one image at 16 crops);
//! - `timing cold ROUNDS M N K`: bf16 weights read from DRAM as in the model (rotating over
//!   1.1 GiB of copies on huge pages, `HUGE=0` for 4 KiB ones), for short prompts and decode
//!   (`PRECISION=bf16`, `THREADS`, default 2).

use std::time::Instant;

use half::bf16;
use phi_kernels::cpu::gemm::gemm_with;
use phi_kernels::{Isa, Weight};

fn bench(isa: Isa, m: usize, n: usize, k: usize, w: Weight<'_>, a: &[f32], c: &mut [f32]) -> f64 {
    let flops = 2.0 * (m * n * k) as f64;
    gemm_with(isa, a, k, w, None, c, n, m, n, k, false);
    let mut best = f64::MAX;
    for _ in 0..12 {
        let t = Instant::now();
        gemm_with(isa, a, k, w, None, c, n, m, n, k, false);
        best = best.min(t.elapsed().as_secs_f64());
    }
    flops / best / 1e9
}

/// One core's f32 FMA ceiling: 12 independent `vfmadd` chains (as in shared/machine.md).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_peak_avx512() -> f64 {
    fma_peak_iters(20_000_000)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn fma_peak_iters(iters: u64) -> f64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_set1_ps(1.0); 12];
    let (x, y) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
    let t = Instant::now();
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm512_fmadd_ps(*a, x, y);
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let sink: f32 = acc.iter().map(|a| _mm512_reduce_add_ps(*a)).sum();
    std::hint::black_box(sink);
    (iters * 12 * 32) as f64 / secs / 1e9
}

/// The environment variable `name` parsed, or `default` when unset or unparsable.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Phi-3-vision's row order for one image of 4×4 sub-crops (crop 0 the global view): merged
/// token indices, -1 for sub_GN, -2 for glb_GN (as `phi_projector::hd_token_sources`).
fn merge_sources() -> Vec<i32> {
    let mut out = Vec::new();
    for a in 0..4 {
        for i in 0..12 {
            for b in 0..4 {
                out.extend((0..12).map(|j| (1 + a * 4 + b) * 144 + i * 12 + j));
            }
            out.push(-1);
        }
    }
    out.push(-2);
    for i in 0..12 {
        out.extend((0..12).map(|j| i * 12 + j));
        out.push(-1);
    }
    out
}

/// `timing fused swiglu|ln|merge ROUNDS M N K` (merge: M = 2509, K = 4·CLIP width).
fn fused(args: &[String]) {
    use phi_kernels::cpu::{
        gemm_fused, gemm_opts, layer_norm, merge_2x2, silu_mul, ARows, GemmOpts, MergedRows,
    };
    let num = |i: usize| -> usize { args[i].parse().expect("ROUNDS M N K") };
    let (rounds, m, n, k) = (num(3), num(4), num(5), num(6));
    let threads = env_or("THREADS", 2);
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .unwrap();
    let val = |i: usize| ((i * 2_654_435_761) % 2001) as f32 / 1000.0 - 1.0;
    let a: Vec<f32> = (0..m * k).map(val).collect();
    let wb: Vec<bf16> = (0..n * k).map(|i| bf16::from_f32(val(i + 7))).collect();
    let w = Weight::Bf16(&wb);
    let (g, b): (Vec<f32>, Vec<f32>) = ((0..k).map(val).collect(), (0..k).map(val).collect());
    let mut c = vec![0f32; m * n];
    let mut act = vec![0f32; m * n / 2];
    let mut normed = vec![0f32; m * k];
    let opts = GemmOpts::default();
    let mode = args[2].as_str();
    let shared = env_or("SHARED", 1);
    // The merge's inputs, only when timing it (17 crops of CLIP output is 40 MB at k = 4096).
    let merge = mode == "merge";
    let sources = merge_sources();
    let (c_in, crops) = (k / 4, if merge { 17 } else { 0 });
    let feat: Vec<f32> = (0..crops * 577 * c_in).map(val).collect();
    let lits: [&[f32]; 2] = [&g[..], &b[..]];
    let mut merged = vec![0f32; crops * 144 * k];
    let mut run = |fused: bool| {
        let t = Instant::now();
        if merge {
            assert_eq!(m, sources.len(), "merge: M must be 2509");
            if fused {
                let rows = MergedRows {
                    feat: &feat,
                    grid_stride: 577 * c_in,
                    first: c_in,
                    g: 24,
                    c: c_in,
                    sources: &sources,
                    literals: &lits,
                };
                gemm_fused(ARows::Merged(&rows), w, &mut c, n, m, n, k, &opts, None);
            } else {
                for (crop, out) in merged.chunks_exact_mut(144 * k).enumerate() {
                    let patches = &feat[(crop * 577 + 1) * c_in..(crop + 1) * 577 * c_in];
                    merge_2x2(patches, out, 1, 24, c_in);
                }
                for (row, &s) in normed.chunks_exact_mut(k).zip(&sources) {
                    match s {
                        s if s >= 0 => row.copy_from_slice(&merged[s as usize * k..][..k]),
                        s => row.copy_from_slice(lits[(-1 - s) as usize]),
                    }
                }
                gemm_opts(&normed, k, w, &mut c, n, m, n, k, &opts);
            }
            return t.elapsed().as_secs_f64();
        }
        let swiglu = mode == "swiglu";
        match (swiglu, fused) {
            (true, true) => gemm_fused(
                ARows::dense(&a, k),
                w,
                &mut c,
                n,
                m,
                n,
                k,
                &opts,
                Some((&mut act, n / 2)),
            ),
            (true, false) => {
                gemm_opts(&a, k, w, &mut c, n, m, n, k, &opts);
                silu_mul(&c, &mut act, m, n / 2);
            }
            // `SHARED` GEMMs read one norm (CLIP's q, k and v: 3): fused, each makes it again.
            (false, true) => {
                let a = ARows::LayerNorm {
                    x: &a,
                    weight: &g,
                    bias: &b,
                    eps: 1e-5,
                };
                for _ in 0..shared {
                    gemm_fused(a, w, &mut c, n, m, n, k, &opts, None)
                }
            }
            (false, false) => {
                layer_norm(&a, &g, &b, 1e-5, &mut normed, m, k);
                for _ in 0..shared {
                    gemm_opts(&normed, k, w, &mut c, n, m, n, k, &opts);
                }
            }
        }
        t.elapsed().as_secs_f64()
    };
    pool.install(|| {
        run(true);
        run(false);
        let mut ratios = Vec::new();
        for r in 0..rounds {
            // Alternate which goes first, so drift favours neither.
            let (f, s) = if r % 2 == 0 {
                let f = run(true);
                (f, run(false))
            } else {
                let s = run(false);
                (run(true), s)
            };
            println!(
                "round {r}: fused {:.2} ms separate {:.2} ms ratio {:.3}",
                f * 1e3,
                s * 1e3,
                f / s
            );
            ratios.push(f / s);
        }
        ratios.sort_by(f64::total_cmp);
        println!(
            "median ratio fused/separate {:.3}",
            ratios[ratios.len() / 2]
        );
    });
}

fn main() {
    // `timing once M N K f32|bf16 ITERS`: one shape on `THREADS` threads (default 1), for
    // `perf stat -e task-clock` (CPU time is immune to other processes sharing the cores).
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("fused") {
        return fused(&args);
    }
    #[cfg(target_arch = "x86_64")]
    if args.get(1).map(String::as_str) == Some("peak") {
        // SAFETY: the caller runs this on an AVX-512 machine (the mode is for measurement only).
        std::hint::black_box(unsafe { fma_peak_avx512() });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if args.get(1).map(String::as_str) == Some("kernel") {
        // `timing kernel KC PANELS CALLS`: the microkernel alone on cached panels.
        let p = |i: usize| args[i].parse::<usize>().unwrap();
        std::hint::black_box(phi_kernels::cpu::gemm::microkernel_probe(p(2), p(3), p(4)));
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if args.get(1).map(String::as_str) == Some("ratio") {
        // `timing ratio ROUNDS M N K` (one-thread f32 GEMM) or `timing ratio ROUNDS kernel KC
        // PANELS CALLS` (the microkernel alone): the rate as a fraction of the FMA peak probed
        // right before and after each call. The neighbour's load changes within seconds and
        // hurts cache-bound code far more than the FMA probe, so rounds where either probe
        // dipped are reported apart ("quiet": both probes above QUIET GFLOP/s, default 149, the
        // undisturbed probe here being 152).
        let p = |i: usize| args[i].parse::<usize>().unwrap();
        let rounds = p(2);
        let mut run: Box<dyn FnMut() -> f64 + Send> = if args[3] == "kernel" {
            let (kc, panels, calls) = (p(4), p(5), p(6));
            Box::new(move || phi_kernels::cpu::gemm::microkernel_probe(kc, panels, calls))
        } else {
            let (m, n, k) = (p(3), p(4), p(5));
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect();
            let wf: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1)
                .collect();
            let ldc = n + env_or("LDC_PAD", 0);
            let mut cbuf = vec![0f32; m * ldc + 16];
            Box::new(move || {
                let off = cbuf.as_ptr().align_offset(64);
                let c = &mut cbuf[off..off + m * ldc];
                gemm_with(
                    Isa::Avx512,
                    &a,
                    k,
                    Weight::F32(&wf),
                    None,
                    c,
                    ldc,
                    m,
                    n,
                    k,
                    false,
                );
                2.0 * (m * n * k) as f64
            })
        };
        // THREADS=2: the rate against twice the one-core probe (both cores are alike).
        let threads: usize = env_or("THREADS", 1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let quiet_at: f64 = env_or("QUIET", 149.0);
        let samples: Vec<(f64, f64)> = pool.install(|| {
            run();
            (0..rounds)
                .map(|_| {
                    // SAFETY: measurement mode, run on AVX-512 machines only.
                    let before = unsafe { fma_peak_iters(2_000_000) };
                    let t = Instant::now();
                    let rate = run() / t.elapsed().as_secs_f64() / 1e9;
                    // SAFETY: as above.
                    let after = unsafe { fma_peak_iters(2_000_000) };
                    let per_core = rate / threads as f64;
                    (before.min(after), per_core / before.max(after))
                })
                .collect()
        });
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).map_or(f64::NAN, |x| 100.0 * x)
        };
        let quiet: Vec<f64> = samples
            .iter()
            .filter(|s| s.0 > quiet_at)
            .map(|s| s.1)
            .collect();
        println!(
            "{} ({threads} threads): of the FMA peak, quiet median {:.1}% ({} rounds), all median {:.1}%",
            args[3..].join(" "),
            median(quiet.clone()),
            quiet.len(),
            median(samples.iter().map(|s| s.1).collect()),
        );
        return;
    }
    if args.get(1).map(String::as_str) == Some("cold") {
        // `timing cold ROUNDS M N K`: bf16 weights streamed from DRAM, as in the model (each call
        // on the next of enough copies to fill 1.1 GiB, so none is cached), f32 or bf16
        // products (PRECISION=bf16), on `THREADS` threads (default 2). Prints the median time
        // per call and the weight bytes per second.
        let p = |i: usize| args[i].parse::<usize>().unwrap();
        let (rounds, m, n, k) = (p(2), p(3), p(4), p(5));
        let copies = ((1.1 * (1u64 << 30) as f64) / (2 * n * k) as f64).ceil() as usize + 1;
        // On huge pages, as the resident weights are (`HUGE=0` for 4 KiB pages).
        let (mut huge, mut small);
        let pool: &mut [bf16] = if env_or("HUGE", 1) == 1 {
            huge = phi_kernels::HugeBuf::<bf16>::zeroed(copies * n * k).unwrap();
            &mut huge
        } else {
            small = vec![bf16::ZERO; copies * n * k];
            &mut small
        };
        pool.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = bf16::from_f32(((i * 5 % 11) as f32 - 5.0) * 0.1));
        let pool = &*pool;
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let mut c = vec![0f32; m * n];
        let precision = if std::env::var("PRECISION").as_deref() == Ok("bf16") {
            phi_kernels::DType::BF16
        } else {
            phi_kernels::DType::F32
        };
        let opts = phi_kernels::cpu::GemmOpts {
            precision,
            ..Default::default()
        };
        let threads: usize = env_or("THREADS", 2);
        let pool_rt = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        let mut ts: Vec<f64> = pool_rt.install(|| {
            (0..rounds.max(copies))
                .map(|r| {
                    let w = Weight::Bf16(&pool[(r % copies) * n * k..(r % copies + 1) * n * k]);
                    let t = Instant::now();
                    phi_kernels::cpu::gemm_opts(&a, k, w, &mut c, n, m, n, k, &opts);
                    t.elapsed().as_secs_f64()
                })
                .skip(copies.min(rounds / 2))
                .collect()
        });
        ts.sort_by(f64::total_cmp);
        let med = ts[ts.len() / 2];
        println!(
            "cold {m}x{n}x{k} bf16 weights ({threads} threads): best {:.1} GB/s; median {:.2} ms, {:.1} GB/s of weights, {:.1} GFLOP/s",
            (2 * n * k) as f64 / ts[0] / 1e9,
            med * 1e3,
            (2 * n * k) as f64 / med / 1e9,
            (2 * m * n * k) as f64 / med / 1e9
        );
        return;
    }
    if args.get(1).map(String::as_str) == Some("attn") {
        let p = |i: usize| args[i].parse::<usize>().unwrap();
        let (t, heads, d, iters) = (p(2), p(3), p(4), p(6));
        // Q_LEN=1 for decode against a cache of T keys.
        let q_len = env_or("Q_LEN", t);
        let width = heads * d;
        let q: Vec<f32> = (0..t * width)
            .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
            .collect();
        let mut out = vec![0f32; t * width];
        let l = phi_kernels::cpu::AttnLayout::packed(t, width);
        let dims = phi_kernels::cpu::AttnDims {
            batch: 1,
            heads,
            q_len,
            kv_len: t,
            head_dim: d,
            causal: args[5] == "causal",
            scale: 1.0 / (d as f32).sqrt(),
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(env_or("THREADS", 1))
            .build()
            .unwrap();
        // KV=bf16: keys and values from a head-major bf16 cache (the decoder's), 2 threads'
        // pool size from THREADS.
        if std::env::var("KV").as_deref() == Ok("bf16") {
            // LAYERS=N: N caches, one per call in turn (32 at 1939 keys is 0.76 GB, past the
            // caches, as a decode step reads them).
            // K and V are separate buffers (one buffer for both would read V from cache).
            let layers = env_or("LAYERS", 1);
            let caches: Vec<Vec<bf16>> = (0..2 * layers)
                .map(|c| {
                    q.iter()
                        .map(|&x| bf16::from_f32(x * (1 + c % 2) as f32))
                        .collect()
                })
                .collect();
            let kvl = phi_kernels::cpu::AttnLayout::head_major(heads, t, d);
            let threads = env_or("THREADS", 1);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let start = Instant::now();
            pool.install(|| {
                for it in 0..iters {
                    let (kc, vc) = (&caches[2 * (it % layers)], &caches[2 * (it % layers) + 1]);
                    phi_kernels::cpu::attention_kv(
                        &q,
                        l,
                        Weight::Bf16(kc),
                        kvl,
                        Weight::Bf16(vc),
                        kvl,
                        &mut out,
                        l,
                        &dims,
                    );
                }
            });
            let per = start.elapsed().as_secs_f64() / iters as f64;
            let bytes = (2 * t * width * 2) as f64;
            println!(
                "bf16 KV head-major, {t} keys: {:.3} ms per call, {:.1} GB/s of K+V",
                per * 1e3,
                bytes / per / 1e9
            );
            return;
        }
        // Best call of `iters`, in GFLOP/s of the scores and P·V products (the visible half of
        // them under the causal mask).
        let pairs: usize = (0..q_len).map(|i| dims.visible(i)).sum();
        let flops = (4 * pairs * d * heads) as f64;
        let mut best = f64::MAX;
        pool.install(|| {
            for _ in 0..iters {
                let t0 = Instant::now();
                phi_kernels::cpu::attention(&q, l, &q, l, &q, l, &mut out, l, &dims);
                best = best.min(t0.elapsed().as_secs_f64());
            }
        });
        println!(
            "attention {q_len}x{t}x{d}x{heads} {}: best {:.3} ms, {:.1} GFLOP/s",
            args[5],
            best * 1e3,
            flops / best / 1e9
        );
        return;
    }
    if args.get(1).map(String::as_str) == Some("once") {
        let p = |i: usize| args[i].parse::<usize>().unwrap();
        let (m, n, k, iters) = (p(2), p(3), p(4), p(6));
        let a = vec![0.5f32; m * k];
        let wf = vec![0.25f32; n * k];
        let wb = vec![bf16::from_f32(0.25); n * k];
        let w = if args[5] == "bf16" {
            Weight::Bf16(&wb)
        } else {
            Weight::F32(&wf)
        };
        let mut c = vec![0f32; m * n];
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(env_or("THREADS", 1))
            .build()
            .unwrap();
        pool.install(|| {
            for _ in 0..iters {
                phi_kernels::cpu::gemm(&a, k, w, None, &mut c, n, m, n, k, false);
            }
        });
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if Isa::Avx512.is_supported() {
        // SAFETY: AVX-512F was just detected.
        println!("one-core AVX-512 FMA peak now: {:.1} GFLOP/s", unsafe {
            fma_peak_avx512()
        });
    }
    let threads: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|s| s.parse().ok())
        .collect();
    let threads = if threads.is_empty() {
        vec![1, 2]
    } else {
        threads
    };
    // SHAPES="M,N,K;M,N,K" replaces the default shapes.
    let shapes: Vec<(usize, usize, usize)> = match std::env::var("SHAPES") {
        Ok(list) => list
            .split(';')
            .map(|mnk| {
                let v: Vec<usize> = mnk.split(',').map(|x| x.trim().parse().unwrap()).collect();
                (v[0], v[1], v[2])
            })
            .collect(),
        Err(_) => vec![(577, 4096, 1024), (577, 1024, 4096), (1, 9216, 3072)],
    };
    for &t in &threads {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .unwrap();
        pool.install(|| {
            let only = std::env::var("ISA").ok().map(|s| Isa::parse(&s).expect("ISA=scalar|avx2|avx512"));
            for isa in Isa::available().into_iter().rev().filter(|i| only.is_none_or(|o| o == *i)) {
                for &(m, n, k) in &shapes {
                    let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1).collect();
                    let wf: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.1).collect();
                    let wb: Vec<bf16> = wf.iter().map(|&x| bf16::from_f32(x)).collect();
                    let mut c = vec![0f32; m * n];
                    let f = bench(isa, m, n, k, Weight::F32(&wf), &a, &mut c);
                    let b = bench(isa, m, n, k, Weight::Bf16(&wb), &a, &mut c);
                    println!(
                        "threads {t} {:>6} m={m:<4} n={n:<5} k={k:<5}  f32 {f:7.1} GFLOP/s  bf16 {b:7.1} GFLOP/s",
                        isa.name()
                    );
                }
            }
        });
    }
}
