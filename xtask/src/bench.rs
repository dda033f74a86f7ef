//! `cargo xtask bench`: the kernels at Phi-3-vision's real shapes, each row next to a ceiling
//! measured by a short probe in the same process (f32 FMA peak, DRAM read bandwidth), printed as
//! one table and optionally written as JSON.
//!
//! Timing: one warm-up call, then the median of several repeats, the repeat count bounded so that
//! a row costs about a second. GEMM `dtype`: `f32` (f32 weights), `bf16w` (bf16 weights
//! widened exactly, f32 products: `--dtype f32` on a bf16 checkpoint) and `bf16` (bf16 products:
//! activations rounded to bf16, as `--dtype bf16`, on AMX / AVX512-BF16 where the CPU has them,
//! else on the f32 kernels); elsewhere the weight dtype, activations f32. GEMM and attention are compared with the FMA peak at the same thread count; the decode
//! GEMV (bf16 weights rotating through more than 1 GiB of distinct copies, so they come from DRAM)
//! and the norms with the DRAM read bandwidth (the norms' buffers fit in cache, so they can
//! exceed it).
//!
//! `--compare torch` then sends every timed row, once, to `xtask/python/bench_torch.py` in the
//! reference venv `.pyref/` (created by `fixtures::ensure_venv` when missing), which times the same
//! op and shape in PyTorch at the row's thread count with the same warm-up/median rule (GEMM as
//! `a @ w.T`, bf16 rows with a and w both bf16, bf16w rows in f32; the decode GEMV rotating over >1 GiB of weight
//! copies; `scaled_dot_product_attention`; `layer_norm`; RMSNorm written out), and the table gains
//! `torch` and `torch_ratio` (our time / torch's) columns, the JSON rows `torch_seconds` and
//! `torch_ratio`.

use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use half::bf16;
use phi_kernels::cpu::gemm::Bf16Kernel;
use phi_kernels::cpu::{
    attention, gemm, gemm_fused, gemm_opts, layer_norm, rms_norm, silu_mul, ARows, AttnDims,
    AttnLayout, GemmOpts, MergedRows,
};
use phi_kernels::{DType, HugeBuf, Isa, Weight};
use rayon::prelude::*;

/// What `cargo xtask bench` was asked for.
pub struct Opts {
    pub threads: Option<usize>,
    pub json: Option<PathBuf>,
    pub full: bool,
    pub compare: Option<String>,
    /// Substrings; a row runs when its name contains one of them (all rows when empty).
    pub filter: Vec<String>,
}

/// Throughput of one row.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rate {
    Gflops(f64),
    Gbps(f64),
}

impl Rate {
    fn value(self) -> f64 {
        match self {
            Rate::Gflops(v) | Rate::Gbps(v) => v,
        }
    }

    fn scaled(self, f: f64) -> Rate {
        match self {
            Rate::Gflops(v) => Rate::Gflops(v * f),
            Rate::Gbps(v) => Rate::Gbps(v * f),
        }
    }
}

/// One line of the table / one JSON object.
#[derive(Clone, Debug)]
pub struct Row {
    pub name: String,
    pub shape: String,
    pub dtype: String,
    pub threads: usize,
    pub seconds: f64,
    pub rate: Rate,
    /// Which probe the ceiling comes from (`fma_avx512`, `dram_read`, ...).
    pub ceiling_name: String,
    /// The probe's figure, in the same unit as `rate`.
    pub ceiling: f64,
    /// What was timed, for `--compare torch`.
    pub op: Op,
    /// PyTorch's time for the same op and shape (`--compare torch`).
    pub torch_seconds: Option<f64>,
}

/// The operation and shape a row times (what `xtask/python/bench_torch.py` needs to redo it).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    /// `[m,k]·[n,k]ᵀ`
    Gemm {
        m: usize,
        k: usize,
        n: usize,
    },
    /// `[m,k]·[n,k]ᵀ` (`m` <= 4) over weights rotating through more than 1 GiB.
    Gemv {
        m: usize,
        k: usize,
        n: usize,
    },
    Attention {
        t: usize,
        heads: usize,
        d: usize,
        causal: bool,
    },
    LayerNorm {
        rows: usize,
        cols: usize,
    },
    RmsNorm {
        rows: usize,
        cols: usize,
    },
    /// A GEMM with the op before or after it fused (see [`Fusion`]), or (rows named
    /// `*_separate`) the same two passes run one after the other; torch runs its chain for both.
    Fused {
        fusion: Fusion,
        m: usize,
        k: usize,
        n: usize,
    },
}

/// What a fused row joins to its GEMM (`[m,k]·[n,k]ᵀ`, bf16 weights, f32 products).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fusion {
    /// LayerNorm of A made inside the packing, bias in the epilogue (CLIP's q/k/v over 17 crops).
    LayerNorm,
    /// SwiGLU of the `[gate; up]` output in the epilogue (the decoder's gate_up at prefill).
    SwiGlu,
    /// A gathered from 2×2-merged CLIP patches and separator rows inside the packing, bias and
    /// GELU in the epilogue (the projector's first layer over 17 crops).
    Merge,
}

impl Fusion {
    fn kind(self) -> &'static str {
        match self {
            Fusion::LayerNorm => "layer_norm_gemm",
            Fusion::SwiGlu => "gemm_swiglu",
            Fusion::Merge => "merge_gemm",
        }
    }
}

/// Epsilon of both norms' rows.
const NORM_EPS: f64 = 1e-5;

impl Row {
    pub fn pct_of_ceiling(&self) -> f64 {
        if self.ceiling > 0.0 {
            100.0 * self.rate.value() / self.ceiling
        } else {
            f64::NAN
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        let mut o = serde_json::Map::new();
        o.insert("name".into(), self.name.clone().into());
        o.insert("shape".into(), self.shape.clone().into());
        // bf16w (bf16 weights, f32 products) is an f32 matmul to torch.
        let dtype = if self.dtype == "bf16w" {
            "f32"
        } else {
            &self.dtype
        };
        o.insert("dtype".into(), dtype.into());
        o.insert("threads".into(), self.threads.into());
        o.insert("seconds".into(), self.seconds.into());
        match self.rate {
            Rate::Gflops(v) => o.insert("gflops".into(), v.into()),
            Rate::Gbps(v) => o.insert("gbps".into(), v.into()),
        };
        o.insert("ceiling".into(), self.ceiling.into());
        o.insert("ceiling_name".into(), self.ceiling_name.clone().into());
        o.insert("pct_of_ceiling".into(), self.pct_of_ceiling().into());
        if let (Some(t), Some(r)) = (self.torch_seconds, self.torch_ratio()) {
            o.insert("torch_seconds".into(), t.into());
            o.insert("torch_ratio".into(), r.into());
        }
        serde_json::Value::Object(o)
    }

    /// Ours / torch time (below 1: ours is faster); `None` without a torch time.
    pub fn torch_ratio(&self) -> Option<f64> {
        self.torch_seconds
            .filter(|&t| t > 0.0)
            .map(|t| self.seconds / t)
    }

    /// Unique among a run's rows (names repeat across dtypes and thread counts).
    pub fn torch_key(&self) -> String {
        format!("{}/{}/{}t", self.name, self.dtype, self.threads)
    }

    /// This row as one request object for `bench_torch.py`.
    pub fn torch_request(&self) -> serde_json::Value {
        let mut o = serde_json::Map::new();
        o.insert("name".into(), self.torch_key().into());
        let kind = match self.op {
            Op::Gemm { m, k, n } => {
                o.insert("m".into(), m.into());
                o.insert("k".into(), k.into());
                o.insert("n".into(), n.into());
                "gemm"
            }
            Op::Gemv { m, k, n } => {
                o.insert("m".into(), m.into());
                o.insert("k".into(), k.into());
                o.insert("n".into(), n.into());
                "gemv"
            }
            Op::Attention {
                t,
                heads,
                d,
                causal,
            } => {
                o.insert("t".into(), t.into());
                o.insert("heads".into(), heads.into());
                o.insert("d".into(), d.into());
                o.insert("causal".into(), causal.into());
                "attention"
            }
            Op::Fused { fusion, m, k, n } => {
                o.insert("m".into(), m.into());
                o.insert("k".into(), k.into());
                o.insert("n".into(), n.into());
                fusion.kind()
            }
            Op::LayerNorm { rows, cols } | Op::RmsNorm { rows, cols } => {
                o.insert("rows".into(), rows.into());
                o.insert("cols".into(), cols.into());
                o.insert("eps".into(), NORM_EPS.into());
                if matches!(self.op, Op::LayerNorm { .. }) {
                    "layer_norm"
                } else {
                    "rms_norm"
                }
            }
        };
        o.insert("kind".into(), kind.into());
        // bf16w (bf16 weights, f32 products) is an f32 matmul to torch.
        let dtype = if self.dtype == "bf16w" {
            "f32"
        } else {
            &self.dtype
        };
        o.insert("dtype".into(), dtype.into());
        o.insert("threads".into(), self.threads.into());
        serde_json::Value::Object(o)
    }
}

/// The request `bench_torch.py` reads: one object per row.
pub fn torch_request(rows: &[Row]) -> serde_json::Value {
    serde_json::Value::Array(rows.iter().map(Row::torch_request).collect())
}

/// Fills `torch_seconds` from the script's `{key: seconds}` answer; errors on a missing row.
pub fn apply_torch_times(rows: &mut [Row], answer: &serde_json::Value) -> Result<()> {
    let map = answer
        .as_object()
        .context("bench_torch.py: expected a JSON object {name: seconds}")?;
    for r in rows {
        let key = r.torch_key();
        let t = map
            .get(&key)
            .and_then(|v| v.as_f64())
            .with_context(|| format!("bench_torch.py: no time for {key}"))?;
        r.torch_seconds = Some(t);
    }
    Ok(())
}

/// Formats rows as a Markdown table.
pub fn format_table(rows: &[Row]) -> String {
    let torch = rows.iter().any(|r| r.torch_seconds.is_some());
    let mut s = String::new();
    s.push_str("| op | shape | dtype | threads | time | rate | ceiling | % of ceiling |");
    s.push_str(if torch {
        " torch | torch_ratio |\n"
    } else {
        "\n"
    });
    s.push_str("|---|---|---|---:|---:|---:|---|---:|");
    s.push_str(if torch { "---:|---:|\n" } else { "\n" });
    for r in rows {
        let (rate, unit) = match r.rate {
            Rate::Gflops(v) => (v, "GFLOP/s"),
            Rate::Gbps(v) => (v, "GB/s"),
        };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.1} {} | {} {:.1} | {:.1}% |",
            r.name,
            r.shape,
            r.dtype,
            r.threads,
            fmt_time(r.seconds),
            rate,
            unit,
            r.ceiling_name,
            r.ceiling,
            r.pct_of_ceiling()
        ));
        if torch {
            match (r.torch_seconds, r.torch_ratio()) {
                (Some(t), Some(q)) => s.push_str(&format!(" {} | {:.2}x |", fmt_time(t), q)),
                _ => s.push_str(" - | - |"),
            }
        }
        s.push('\n');
    }
    s
}

fn fmt_time(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.3} s")
    } else if s >= 1e-3 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{:.1} µs", s * 1e6)
    }
}

// ---------------------------------------------------------------------------------------------
// Ceiling probes
// ---------------------------------------------------------------------------------------------

/// Ceilings measured in this process, per thread count.
pub struct Ceilings {
    /// (threads, GFLOP/s)
    fma: Vec<(usize, f64)>,
    fma_name: &'static str,
    /// (threads, GB/s)
    dram: Vec<(usize, f64)>,
    /// (threads, GFLOP/s) of the bf16 product kernel's instruction (AMX `tdpbf16ps` or
    /// `vdpbf16ps`); empty where bf16 products run on the f32 kernels (their ceiling is `fma`).
    bf16: Vec<(usize, f64)>,
    bf16_name: &'static str,
}

impl Ceilings {
    fn fma(&self, threads: usize) -> (String, f64) {
        let v = self
            .fma
            .iter()
            .find(|(t, _)| *t == threads)
            .map(|x| x.1)
            .unwrap_or(f64::NAN);
        (format!("{}_{}t", self.fma_name, threads), v)
    }
    /// Probe by probe, the better of `self` and `other` (two probes of the same machine).
    fn better(&self, other: &Ceilings) -> Ceilings {
        let pairwise = |a: &[(usize, f64)], b: &[(usize, f64)]| {
            a.iter()
                .zip(b)
                .map(|(&(t, x), &(_, y))| (t, x.max(y)))
                .collect()
        };
        Ceilings {
            fma: pairwise(&self.fma, &other.fma),
            fma_name: self.fma_name,
            dram: pairwise(&self.dram, &other.dram),
            bf16: pairwise(&self.bf16, &other.bf16),
            bf16_name: self.bf16_name,
        }
    }

    /// The figure of the probe a row names (`fma_avx512_2t`, `dram_read_1t`, `amx_2t`, ...).
    fn named(&self, name: &str) -> Option<f64> {
        let fma = self.fma.iter().map(|&(t, v)| (self.fma(t).0, v));
        let dram = self.dram.iter().map(|&(t, v)| (self.dram(t).0, v));
        let bf16 = self.bf16.iter().map(|&(t, v)| (self.bf16(t).0, v));
        fma.chain(dram)
            .chain(bf16)
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// The ceiling of bf16 products: the bf16 kernel's own probe, or the FMA peak where they run
    /// on the f32 kernels.
    fn bf16(&self, threads: usize) -> (String, f64) {
        match self.bf16.iter().find(|(t, _)| *t == threads) {
            Some(&(_, v)) => (format!("{}_{threads}t", self.bf16_name), v),
            None => self.fma(threads),
        }
    }

    fn dram(&self, threads: usize) -> (String, f64) {
        let v = self
            .dram
            .iter()
            .find(|(t, _)| *t == threads)
            .map(|x| x.1)
            .unwrap_or(f64::NAN);
        (format!("dram_read_{threads}t"), v)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FmaKind {
    Avx512,
    Avx2,
    Scalar,
}

fn fma_kind() -> FmaKind {
    #[cfg(target_arch = "x86_64")]
    {
        match phi_kernels::isa::active() {
            Isa::Avx512 if is_x86_feature_detected!("avx512f") => return FmaKind::Avx512,
            Isa::Avx512 | Isa::Avx2 | Isa::Scalar
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") =>
            {
                return FmaKind::Avx2
            }
            _ => {}
        }
    }
    FmaKind::Scalar
}

/// Runs `iters` iterations of 12 independent FMA chains; returns the FLOPs done.
fn fma_loop(kind: FmaKind, iters: u64) -> f64 {
    match kind {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `fma_kind` checked the CPU features.
        FmaKind::Avx512 => unsafe {
            black_box(fma_avx512(iters));
            iters as f64 * 12.0 * 16.0 * 2.0
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        FmaKind::Avx2 => unsafe {
            black_box(fma_avx2(iters));
            iters as f64 * 12.0 * 8.0 * 2.0
        },
        _ => {
            let mut acc = [1.0f32; 12];
            for _ in 0..iters {
                for a in acc.iter_mut() {
                    *a = a.mul_add(0.999_999, 1e-7);
                }
                black_box(&mut acc);
            }
            black_box(acc);
            iters as f64 * 12.0 * 2.0
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn fma_avx512(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm512_set1_ps(0.999_999);
    let a = _mm512_set1_ps(1e-7);
    let (mut c0, mut c1, mut c2, mut c3) = (
        _mm512_set1_ps(0.1),
        _mm512_set1_ps(0.2),
        _mm512_set1_ps(0.3),
        _mm512_set1_ps(0.4),
    );
    let (mut c4, mut c5, mut c6, mut c7) = (
        _mm512_set1_ps(0.5),
        _mm512_set1_ps(0.6),
        _mm512_set1_ps(0.7),
        _mm512_set1_ps(0.8),
    );
    let (mut c8, mut c9, mut c10, mut c11) = (
        _mm512_set1_ps(0.9),
        _mm512_set1_ps(1.0),
        _mm512_set1_ps(1.1),
        _mm512_set1_ps(1.2),
    );
    for _ in 0..iters {
        c0 = _mm512_fmadd_ps(c0, m, a);
        c1 = _mm512_fmadd_ps(c1, m, a);
        c2 = _mm512_fmadd_ps(c2, m, a);
        c3 = _mm512_fmadd_ps(c3, m, a);
        c4 = _mm512_fmadd_ps(c4, m, a);
        c5 = _mm512_fmadd_ps(c5, m, a);
        c6 = _mm512_fmadd_ps(c6, m, a);
        c7 = _mm512_fmadd_ps(c7, m, a);
        c8 = _mm512_fmadd_ps(c8, m, a);
        c9 = _mm512_fmadd_ps(c9, m, a);
        c10 = _mm512_fmadd_ps(c10, m, a);
        c11 = _mm512_fmadd_ps(c11, m, a);
    }
    let s = _mm512_add_ps(
        _mm512_add_ps(_mm512_add_ps(c0, c1), _mm512_add_ps(c2, c3)),
        _mm512_add_ps(_mm512_add_ps(c4, c5), _mm512_add_ps(c6, c7)),
    );
    let s = _mm512_add_ps(
        s,
        _mm512_add_ps(_mm512_add_ps(c8, c9), _mm512_add_ps(c10, c11)),
    );
    _mm512_reduce_add_ps(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_avx2(iters: u64) -> f32 {
    use std::arch::x86_64::*;
    let m = _mm256_set1_ps(0.999_999);
    let a = _mm256_set1_ps(1e-7);
    let (mut c0, mut c1, mut c2, mut c3) = (
        _mm256_set1_ps(0.1),
        _mm256_set1_ps(0.2),
        _mm256_set1_ps(0.3),
        _mm256_set1_ps(0.4),
    );
    let (mut c4, mut c5, mut c6, mut c7) = (
        _mm256_set1_ps(0.5),
        _mm256_set1_ps(0.6),
        _mm256_set1_ps(0.7),
        _mm256_set1_ps(0.8),
    );
    let (mut c8, mut c9, mut c10, mut c11) = (
        _mm256_set1_ps(0.9),
        _mm256_set1_ps(1.0),
        _mm256_set1_ps(1.1),
        _mm256_set1_ps(1.2),
    );
    for _ in 0..iters {
        c0 = _mm256_fmadd_ps(c0, m, a);
        c1 = _mm256_fmadd_ps(c1, m, a);
        c2 = _mm256_fmadd_ps(c2, m, a);
        c3 = _mm256_fmadd_ps(c3, m, a);
        c4 = _mm256_fmadd_ps(c4, m, a);
        c5 = _mm256_fmadd_ps(c5, m, a);
        c6 = _mm256_fmadd_ps(c6, m, a);
        c7 = _mm256_fmadd_ps(c7, m, a);
        c8 = _mm256_fmadd_ps(c8, m, a);
        c9 = _mm256_fmadd_ps(c9, m, a);
        c10 = _mm256_fmadd_ps(c10, m, a);
        c11 = _mm256_fmadd_ps(c11, m, a);
    }
    let s = _mm256_add_ps(
        _mm256_add_ps(_mm256_add_ps(c0, c1), _mm256_add_ps(c2, c3)),
        _mm256_add_ps(_mm256_add_ps(c4, c5), _mm256_add_ps(c6, c7)),
    );
    let s = _mm256_add_ps(
        s,
        _mm256_add_ps(_mm256_add_ps(c8, c9), _mm256_add_ps(c10, c11)),
    );
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), s);
    out.iter().sum()
}

/// One thread's share of a timed run: waits for the others at `barrier`, then times `work`
/// itself.
fn timed_share<F: Fn(usize)>(
    barrier: &std::sync::Barrier,
    work: &F,
    t: usize,
) -> (Instant, Instant) {
    barrier.wait();
    let start = Instant::now();
    work(t);
    (start, Instant::now())
}

/// The wall time of threads started together: from the first one's start to the last one's
/// end, as each thread saw them. When the thread that only launched the work took the start,
/// it came late whenever that thread had to wait for a core (as many busy threads as cores,
/// plus it): a 2-thread DRAM probe so timed read up to 28.5 GB/s (24 passes, two runs), where
/// 48 passes timed by the readers themselves, minutes later, never passed 26.4.
fn span(marks: impl IntoIterator<Item = (Instant, Instant)>) -> Duration {
    let (first, last) = marks
        .into_iter()
        .reduce(|(s0, e0), (s1, e1)| (s0.min(s1), e0.max(e1)))
        .expect("at least one thread");
    last - first
}

/// Runs `work(thread index)` on `threads` threads at once (they start together at a barrier);
/// returns the wall time (see [`span`]).
///
/// When the rayon pool has `threads` workers, they are the threads: threads of a probe's own
/// would share the cores with those workers, which spin and yield for a while after each
/// parallel loop (a decode step is about 200 of them). Right after a parallel loop, 8
/// alternating pairs of DRAM probes read medians of 25.95 and 25.25 GB/s on the workers
/// against 25.25 and 22.95 on threads of their own (two runs, 15 of 16 pairs to the workers).
fn on_threads<F: Fn(usize) + Sync>(threads: usize, work: F) -> Duration {
    let barrier = std::sync::Barrier::new(threads);
    if rayon::current_num_threads() == threads {
        return span(rayon::broadcast(|ctx| {
            timed_share(&barrier, &work, ctx.index())
        }));
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (barrier, work) = (&barrier, &work);
                s.spawn(move || timed_share(barrier, work, t))
            })
            .collect();
        span(
            handles
                .into_iter()
                .map(|h| h.join().expect("a probe thread panicked")),
        )
    })
}

/// FMA peak on `threads` threads at once, GFLOP/s: best of three ~0.15 s runs.
fn probe_fma(kind: FmaKind, threads: usize) -> f64 {
    probe_peak(threads, 1 << 16, |iters| fma_loop(kind, iters))
}

/// The peak of `run(iters)` (a loop that does FLOPs in proportion to `iters` and returns how
/// many) on `threads` threads at once, GFLOP/s: the iteration count calibrated on one thread to
/// about 0.15 s, then the best of three runs.
fn probe_peak(threads: usize, start_iters: u64, run: impl Fn(u64) -> f64 + Sync) -> f64 {
    let mut iters = start_iters;
    let per_iter = loop {
        let t0 = Instant::now();
        let flops = run(iters);
        let dt = t0.elapsed().as_secs_f64();
        if dt > 0.01 {
            let per_iter = flops / iters as f64;
            iters = ((iters as f64) * 0.15 / dt) as u64;
            break per_iter;
        }
        iters *= 4;
    };
    let flops = per_iter * iters as f64 * threads as f64;
    (0..3)
        .map(|_| {
            let dt = on_threads(threads, |_| {
                run(iters);
            });
            flops / dt.as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

/// Sum of a slice read as `STREAMS` interleaved sequential streams (one per sub-range, 256 bytes
/// from each in turn), like a GEMV reading several weight rows at once: one stream per core
/// leaves the DRAM bandwidth that more outstanding prefetches would reach unused.
const STREAMS: usize = 8;

fn stream_sum(x: &[f32]) -> f32 {
    let block = 64;
    let per = x.len() / STREAMS / block * block;
    let parts: Vec<&[f32]> = (0..STREAMS).map(|s| &x[s * per..(s + 1) * per]).collect();
    let rest: f32 = x[STREAMS * per..].iter().sum();
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: checked above.
        return unsafe { stream_sum_avx512(&parts, per) } + rest;
    }
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: checked above.
        return unsafe { stream_sum_avx2(&parts, per) } + rest;
    }
    let mut acc = [0f32; 32];
    for j in (0..per).step_by(block) {
        for p in &parts {
            for (i, v) in p[j..j + block].iter().enumerate() {
                acc[i % 32] += v;
            }
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// How far ahead of each stream the probe prefetches, in bytes. The probe is meant to read
/// as fast as anything can, and the decode GEMV prefetches (see `GEMV_PF_BYTES`): relying on
/// the hardware prefetchers alone, the probe read 2.5-4% less than with a software prefetch
/// (2 threads, 1 GiB passes, 6 rounds alternating none / 512 / 1024 / 2048 bytes ahead, in two
/// runs: medians 24.3 / 24.9 / 25.25 / 25.2 GB/s, and 25.05 / 25.95 / 25.85 / 25.65).
const PROBE_PF: usize = 512;

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn stream_sum_avx512(parts: &[&[f32]], per: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm512_setzero_ps(); 4];
    for j in (0..per).step_by(64) {
        for p in parts {
            let p = p.as_ptr().add(j);
            // The line two turns ahead: see `PROBE_PF`.
            for l in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PROBE_PF / 4 + 16 * l) as *const i8);
            }
            a[0] = _mm512_add_ps(a[0], _mm512_loadu_ps(p));
            a[1] = _mm512_add_ps(a[1], _mm512_loadu_ps(p.add(16)));
            a[2] = _mm512_add_ps(a[2], _mm512_loadu_ps(p.add(32)));
            a[3] = _mm512_add_ps(a[3], _mm512_loadu_ps(p.add(48)));
        }
    }
    let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    _mm512_reduce_add_ps(s)
}

/// [`stream_sum_avx512`] in 256-bit vectors. Without it, AVX2 machines ran the portable loop,
/// which an AMD EPYC (Zen 3) VM read at 15 GB/s on two threads while the decode GEMV streamed
/// its weights at 27: a ceiling below what the model reaches.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn stream_sum_avx2(parts: &[&[f32]], per: usize) -> f32 {
    use std::arch::x86_64::*;
    let mut a = [_mm256_setzero_ps(); 8];
    for j in (0..per).step_by(64) {
        for p in parts {
            let p = p.as_ptr().add(j);
            for l in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PROBE_PF / 4 + 16 * l) as *const i8);
            }
            for (v, acc) in a.iter_mut().enumerate() {
                *acc = _mm256_add_ps(*acc, _mm256_loadu_ps(p.add(8 * v)));
            }
        }
    }
    let mut s = _mm256_setzero_ps();
    for v in a {
        s = _mm256_add_ps(s, v);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), s);
    lanes.iter().sum()
}

/// A 1 GiB buffer (twice the 480 MiB L3 this machine reports) on huge pages, as the resident
/// weights are (see `HugeBuf`), for reading DRAM bandwidth again and again without paying for
/// the mapping each time.
pub struct DramProbe {
    buf: HugeBuf<f32>,
}

impl DramProbe {
    /// The bytes it keeps resident.
    pub const BYTES: usize = 1 << 30;

    pub fn new() -> DramProbe {
        let mut buf = HugeBuf::<f32>::zeroed(Self::BYTES / 4).expect("1 GiB for the DRAM probe");
        // Touch every page (fresh anonymous memory is mapped lazily).
        buf.par_chunks_mut(1 << 20)
            .enumerate()
            .for_each(|(i, c)| c.fill((i % 7) as f32 * 0.25));
        DramProbe { buf }
    }

    /// Read bandwidth in GB/s on `threads` threads (see [`on_threads`]), each reading its own
    /// contiguous part: the best of `passes` passes over the whole buffer.
    pub fn gbps(&self, threads: usize, passes: usize) -> f64 {
        let (buf, n) = (&self.buf[..], self.buf.len());
        let per = n.div_ceil(threads);
        let read = |t: usize| {
            let lo = (t * per).min(n);
            let hi = ((t + 1) * per).min(n);
            black_box(stream_sum(&buf[lo..hi]));
        };
        (0..passes)
            .map(|_| {
                let dt = on_threads(threads, read);
                (n * 4) as f64 / dt.as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max)
    }
}

/// The ceilings for each thread count; DRAM read bandwidth is the best of five passes over
/// `dram`.
fn probe(thread_counts: &[usize], dram: &DramProbe) -> Ceilings {
    let kind = fma_kind();
    let fma = thread_counts
        .iter()
        .map(|&t| (t, probe_fma(kind, t)))
        .collect();
    let fma_name = match kind {
        FmaKind::Avx512 => "fma_avx512",
        FmaKind::Avx2 => "fma_avx2",
        FmaKind::Scalar => "fma_scalar",
    };
    Ceilings {
        fma,
        fma_name,
        dram: thread_counts
            .iter()
            .map(|&threads| (threads, dram.gbps(threads, 5)))
            .collect(),
        bf16: thread_counts
            .iter()
            .filter_map(|&t| Some((t, probe_bf16(t)?)))
            .collect(),
        bf16_name: phi_kernels::cpu::gemm::bf16_kernel().name(),
    }
}

/// Peak of the bf16 product instruction on `threads` threads at once, GFLOP/s, as
/// [`probe_fma`]; None where bf16 products run on the f32 kernels.
fn probe_bf16(threads: usize) -> Option<f64> {
    use phi_kernels::cpu::gemm::bf16_peak_loop;
    bf16_peak_loop(1)?;
    Some(probe_peak(threads, 1 << 10, |iters| {
        bf16_peak_loop(iters).unwrap_or(0.0)
    }))
}

// ---------------------------------------------------------------------------------------------
// Kernel rows
// ---------------------------------------------------------------------------------------------

/// Deterministic values in [-1, 1), filled in parallel.
fn fill(n: usize, seed: u32) -> Vec<f32> {
    let mut v = vec![0f32; n];
    fill_as(&mut v, seed, |x| x);
    v
}

/// [`fill`]'s values written into `out` through `cast`.
fn fill_as<T: Send>(out: &mut [T], seed: u32, cast: impl Fn(f32) -> T + Sync) {
    out.par_chunks_mut(1 << 16).enumerate().for_each(|(ci, c)| {
        let mut x = (seed ^ (ci as u32).wrapping_mul(0x9E37_79B9))
            .wrapping_mul(2_654_435_761)
            .max(1);
        for o in c {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *o = cast((x >> 8) as f32 / (1u32 << 23) as f32 - 1.0);
        }
    });
}

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.par_iter().map(|&v| bf16::from_f32(v)).collect()
}

/// Median seconds of `f` after one warm-up call: at least 3 repeats (1 when one call takes more
/// than 2 s), at most 15, about `budget` seconds in all.
fn time_median(budget: f64, mut f: impl FnMut()) -> f64 {
    let t0 = Instant::now();
    f();
    let warm = t0.elapsed().as_secs_f64();
    let reps = if warm > 2.0 {
        1
    } else {
        ((budget / warm.max(1e-9)) as usize).clamp(3, 15)
    };
    let mut ts: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64()
        })
        .collect();
    median(&mut ts)
}

fn median(ts: &mut [f64]) -> f64 {
    ts.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = ts.len();
    if n % 2 == 1 {
        ts[n / 2]
    } else {
        0.5 * (ts[n / 2 - 1] + ts[n / 2])
    }
}

/// Whether a row named `name` passes the command line's filter words.
/// Whether a row named `name` is wanted: some filter is part of its name. A filter `NAME/DTYPE`
/// (`clip_fc1/bf16`) asks for one dtype of the GEMM rows; [`wanted_dtype`] checks that part.
fn wanted(filter: &[String], name: &str) -> bool {
    filter.is_empty() || filter.iter().any(|f| matches(f, name, None))
}

fn wanted_dtype(filter: &[String], name: &str, dtype: &str) -> bool {
    filter.is_empty() || filter.iter().any(|f| matches(f, name, Some(dtype)))
}

/// One filter against a row's name and (when given) its dtype.
fn matches(filter: &str, name: &str, dtype: Option<&str>) -> bool {
    match filter.split_once('/') {
        Some((n, d)) => name.contains(n) && dtype.is_none_or(|x| x == d),
        None => name.contains(filter),
    }
}

struct Ctx<'a> {
    ceil: &'a Ceilings,
    filter: &'a [String],
    rows: Vec<Row>,
    /// For the decode GEMV rows' own DRAM ceiling, probed right before and after each.
    dram: &'a DramProbe,
}

impl Ctx<'_> {
    fn wants(&self, name: &str) -> bool {
        wanted(self.filter, name)
    }

    fn push(&mut self, row: Row) {
        eprintln!(
            "  {:<28} {:<16} {:<5} {}t  {:>10}  {:.1}% of {}",
            row.name,
            row.shape,
            row.dtype,
            row.threads,
            fmt_time(row.seconds),
            row.pct_of_ceiling(),
            row.ceiling_name
        );
        self.rows.push(row);
    }

    /// `C[m,n] = A[m,k]·B[n,k]ᵀ` with f32 weights, bf16 weights, and bf16 products, on the
    /// current rayon pool.
    fn gemm_rows(&mut self, name: &str, m: usize, k: usize, n: usize) {
        if !self.wants(name) {
            return;
        }
        let threads = rayon::current_num_threads();
        let a = fill(m * k, 1);
        let wf = fill(n * k, 2);
        let wb = to_bf16(&wf);
        let mut c = vec![0f32; m * n];
        let flops = 2.0 * (m * n * k) as f64;
        for (dtype, w, precision) in [
            ("f32", Weight::F32(&wf), DType::F32),
            ("bf16w", Weight::Bf16(&wb), DType::F32),
            ("bf16", Weight::Bf16(&wb), DType::BF16),
        ] {
            if !wanted_dtype(self.filter, name, dtype) {
                continue;
            }
            let opts = GemmOpts {
                precision,
                ..GemmOpts::default()
            };
            let s = time_median(1.0, || {
                gemm_opts(black_box(&a), k, w, &mut c, n, m, n, k, &opts)
            });
            black_box(&c);
            let (ceiling_name, ceiling) = if precision == DType::BF16 {
                self.ceil.bf16(threads)
            } else {
                self.ceil.fma(threads)
            };
            self.push(Row {
                name: name.into(),
                shape: format!("{m}x{k}x{n}"),
                dtype: dtype.into(),
                threads,
                seconds: s,
                rate: Rate::Gflops(flops / s / 1e9),
                ceiling_name,
                ceiling,
                op: Op::Gemm { m, k, n },
                torch_seconds: None,
            });
        }
    }

    /// Decode GEMV `m×k · [n,k]ᵀ` (`m` sequences decoded together, or a short prompt), each
    /// call on another copy of the weights in `pool`.
    fn gemv_row(&mut self, name: &str, pool: &[bf16], m: usize, k: usize, n: usize) {
        if !self.wants(name) {
            return;
        }
        let threads = rayon::current_num_threads();
        let per = n * k;
        let copies = pool.len() / per;
        assert!(copies >= 2, "GEMV pool too small for {n}x{k}");
        let a = fill(m * k, 3);
        let mut c = vec![0f32; m * n];
        let mut call = |i: usize| {
            let w = Weight::Bf16(&pool[i * per..(i + 1) * per]);
            gemm(black_box(&a), k, w, None, &mut c, n, m, n, k, false);
        };
        // Up to four rows the weights' bytes bound the time, past that the FMAs (with eight
        // rows, 2·8 FLOPs per 2-byte weight outrun any DRAM here). This host's DRAM bandwidth
        // drifts by a third within minutes, so the probes at the start and end of the run can
        // miss what a DRAM-bound row met (a GEMV read 110-114% of them in one run): those rows
        // get the better of two probes taken right before and after them.
        let dram_bound = m <= 4;
        let near = || {
            if dram_bound {
                self.dram.gbps(threads, 2)
            } else {
                0.0
            }
        };
        let before = near();
        // Warm-up: one pass over every copy (also evicts whatever the previous row left cached).
        let t0 = Instant::now();
        for i in 0..copies {
            call(i);
        }
        let one = t0.elapsed().as_secs_f64() / copies as f64;
        let reps = ((0.8 / one.max(1e-9)) as usize).clamp(copies, 4 * copies);
        let mut ts: Vec<f64> = (0..reps)
            .map(|r| {
                let t0 = Instant::now();
                call(r % copies);
                t0.elapsed().as_secs_f64()
            })
            .collect();
        let s = median(&mut ts);
        let after = near();
        let (rate, (ceiling_name, ceiling)) = if dram_bound {
            let near = (format!("dram_read_{threads}t_near"), before.max(after));
            (Rate::Gbps((per * 2) as f64 / s / 1e9), near)
        } else {
            (
                Rate::Gflops(2.0 * (m * per) as f64 / s / 1e9),
                self.ceil.fma(threads),
            )
        };
        self.push(Row {
            name: name.into(),
            shape: format!("{m}x{k}x{n}"),
            dtype: "bf16".into(),
            threads,
            seconds: s,
            rate,
            ceiling_name,
            ceiling,
            op: Op::Gemv { m, k, n },
            torch_seconds: None,
        });
    }

    fn attention_row(&mut self, name: &str, t: usize, heads: usize, d: usize, causal: bool) {
        if !self.wants(name) {
            return;
        }
        let threads = rayon::current_num_threads();
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
        let mut flops = 4.0 * (t * t * d * heads) as f64;
        if causal {
            flops /= 2.0;
        }
        let s = time_median(1.0, || {
            attention(black_box(&q), l, &k, l, &v, l, &mut out, l, &dims)
        });
        black_box(&out);
        let (ceiling_name, ceiling) = self.ceil.fma(threads);
        self.push(Row {
            name: name.into(),
            shape: format!(
                "{t}x{t}x{d}x{heads}h{}",
                if causal { " causal" } else { "" }
            ),
            dtype: "f32".into(),
            threads,
            seconds: s,
            rate: Rate::Gflops(flops / s / 1e9),
            ceiling_name,
            ceiling,
            op: Op::Attention {
                t,
                heads,
                d,
                causal,
            },
            torch_seconds: None,
        });
    }

    /// A fused GEMM and, as `{name}_separate`, the same work as separate passes (the unfused
    /// op writes its whole output, the GEMM reads it back), both with bf16 weights and f32
    /// products; GFLOP/s count the GEMM's FLOPs only.
    fn fused_rows(
        &mut self,
        name: &str,
        fusion: Fusion,
        m: usize,
        k: usize,
        n: usize,
    ) -> Result<()> {
        if !self.wants(name) {
            return Ok(());
        }
        let threads = rayon::current_num_threads();
        let w = to_bf16(&fill(n * k, 2));
        let w = Weight::Bf16(&w);
        let bias = fill(n, 3);
        let mut c = vec![0f32; m * n];
        let eps = NORM_EPS as f32;
        let (fused_s, separate_s) = match fusion {
            Fusion::LayerNorm => {
                let x = fill(m * k, 1);
                let (g, b) = (fill(k, 5), fill(k, 6));
                let opts = GemmOpts {
                    bias: Some(&bias),
                    ..GemmOpts::default()
                };
                let a = ARows::LayerNorm {
                    x: &x,
                    weight: &g,
                    bias: &b,
                    eps,
                };
                let fused = time_median(1.0, || {
                    gemm_fused(black_box(a), w, &mut c, n, m, n, k, &opts, None)
                });
                let mut normed = vec![0f32; m * k];
                let separate = time_median(1.0, || {
                    layer_norm(black_box(&x), &g, &b, eps, &mut normed, m, k);
                    gemm_opts(&normed, k, w, &mut c, n, m, n, k, &opts)
                });
                (fused, separate)
            }
            Fusion::SwiGlu => {
                let a = fill(m * k, 1);
                let opts = GemmOpts::default();
                let mut act = vec![0f32; m * n / 2];
                let fused = time_median(1.0, || {
                    let glu = Some((&mut act[..], n / 2));
                    gemm_fused(
                        ARows::dense(black_box(&a), k),
                        w,
                        &mut c,
                        n,
                        m,
                        n,
                        k,
                        &opts,
                        glu,
                    )
                });
                let separate = time_median(1.0, || {
                    gemm_opts(black_box(&a), k, w, &mut c, n, m, n, k, &opts);
                    silu_mul(&c, &mut act, m, n / 2)
                });
                black_box(&act);
                (fused, separate)
            }
            Fusion::Merge => {
                // One image at 16 crops (a 4×4 grid and the global view): 17 crops of
                // [577, c] CLIP output, c = k/4, gathered in the projector's token order.
                let (c_in, grid) = (k / 4, 24);
                let sources = phi_projector::hd_token_sources(4, 4, 0)?;
                assert_eq!(sources.len(), m, "the projector row is one 16-crop image");
                let crops = 17;
                let feat = fill(crops * (grid * grid + 1) * c_in, 1);
                let (sub, glb) = (fill(k, 5), fill(k, 6));
                let lits: [&[f32]; 2] = [&sub, &glb];
                let rows = MergedRows {
                    feat: &feat,
                    grid_stride: (grid * grid + 1) * c_in,
                    first: c_in,
                    g: grid,
                    c: c_in,
                    sources: &sources,
                    literals: &lits,
                };
                let opts = GemmOpts {
                    bias: Some(&bias),
                    activation: phi_kernels::cpu::Activation::GeluErf,
                    ..GemmOpts::default()
                };
                let fused = time_median(1.0, || {
                    gemm_fused(
                        ARows::Merged(black_box(&rows)),
                        w,
                        &mut c,
                        n,
                        m,
                        n,
                        k,
                        &opts,
                        None,
                    )
                });
                // Unfused: the projector's own layout pass (merge, grid, separators), then
                // the GEMM.
                let mut separate_err = None;
                let separate = time_median(1.0, || {
                    match phi_projector::hd_feature_transform(
                        black_box(&feat),
                        4,
                        4,
                        c_in,
                        &sub,
                        &glb,
                    ) {
                        Ok(a) => gemm_opts(&a, k, w, &mut c, n, m, n, k, &opts),
                        Err(e) => separate_err = Some(e),
                    }
                });
                if let Some(e) = separate_err {
                    return Err(e.into());
                }
                (fused, separate)
            }
        };
        black_box(&c);
        let flops = 2.0 * (m * n * k) as f64;
        let (ceiling_name, ceiling) = self.ceil.fma(threads);
        for (suffix, s) in [("", fused_s), ("_separate", separate_s)] {
            self.push(Row {
                name: format!("{name}{suffix}"),
                shape: format!("{m}x{k}x{n}"),
                dtype: "bf16w".into(),
                threads,
                seconds: s,
                rate: Rate::Gflops(flops / s / 1e9),
                ceiling_name: ceiling_name.clone(),
                ceiling,
                op: Op::Fused { fusion, m, k, n },
                torch_seconds: None,
            });
        }
        Ok(())
    }

    /// LayerNorm (`rms == false`) or RMSNorm over `rows × cols`; bytes = read x + write out.
    fn norm_row(&mut self, name: &str, rows: usize, cols: usize, rms: bool) {
        if !self.wants(name) {
            return;
        }
        let threads = rayon::current_num_threads();
        let x = fill(rows * cols, 4);
        let (w, b) = (fill(cols, 5), fill(cols, 6));
        let mut out = vec![0f32; rows * cols];
        let s = time_median(0.5, || {
            if rms {
                rms_norm(black_box(&x), &w, NORM_EPS as f32, &mut out, rows, cols)
            } else {
                layer_norm(black_box(&x), &w, &b, NORM_EPS as f32, &mut out, rows, cols)
            }
        });
        black_box(&out);
        let bytes = (2 * rows * cols * 4) as f64;
        let (ceiling_name, ceiling) = self.ceil.dram(threads);
        self.push(Row {
            name: name.into(),
            shape: format!("{rows}x{cols}"),
            dtype: "f32".into(),
            threads,
            seconds: s,
            rate: Rate::Gbps(bytes / s / 1e9),
            ceiling_name,
            ceiling,
            op: if rms {
                Op::RmsNorm { rows, cols }
            } else {
                Op::LayerNorm { rows, cols }
            },
            torch_seconds: None,
        });
    }
}

/// Decode GEMV rows over bf16 weights: (name, m, k, n). `decode4_*`: four sequences decoded
/// together (`phi3v serve`'s default --max-active); `decode8_*`, eight. `prompt16_*`: a
/// 16-token prompt (a chat's follow-up turn), whose products are FMA-bound, not DRAM-bound.
const GEMV_ROWS: &[(&str, usize, usize, usize)] = &[
    ("decode_qkv", 1, 3072, 9216),
    ("decode_gate_up", 1, 3072, 16384),
    ("decode_down", 1, 8192, 3072),
    ("decode_lm_head", 1, 3072, 32064),
    ("decode2_qkv", 2, 3072, 9216),
    ("decode3_qkv", 3, 3072, 9216),
    ("decode4_qkv", 4, 3072, 9216),
    ("decode4_gate_up", 4, 3072, 16384),
    ("decode4_down", 4, 8192, 3072),
    ("decode8_qkv", 8, 3072, 9216),
    ("prompt16_qkv", 16, 3072, 9216),
    ("prompt16_gate_up", 16, 3072, 16384),
    ("prompt16_down", 16, 8192, 3072),
];

/// The rows at the current pool's thread count.
fn run_rows(ctx: &mut Ctx<'_>, full: bool, gemv_pool: &[bf16]) -> Result<()> {
    // CLIP ViT-L/14-336, one crop of 577 tokens.
    ctx.gemm_rows("clip_qkv_out", 577, 1024, 1024);
    ctx.gemm_rows("clip_fc1", 577, 1024, 4096);
    ctx.gemm_rows("clip_fc2", 577, 4096, 1024);
    if full {
        // All 17 crops of one image at num_crops 16 in one GEMM.
        ctx.gemm_rows("clip_qkv_out_x17", 577 * 17, 1024, 1024);
        ctx.gemm_rows("clip_fc1_x17", 577 * 17, 1024, 4096);
        ctx.gemm_rows("clip_fc2_x17", 577 * 17, 4096, 1024);
    }
    // Projector over 17 crops' merged tokens (2509).
    ctx.gemm_rows("projector_fc1", 2509, 4096, 3072);
    ctx.gemm_rows("projector_fc2", 2509, 3072, 3072);
    // Decoder prefill.
    let ts: &[usize] = if full { &[757, 2509] } else { &[757] };
    for &t in ts {
        ctx.gemm_rows(&format!("prefill{t}_qkv"), t, 3072, 9216);
        ctx.gemm_rows(&format!("prefill{t}_o"), t, 3072, 3072);
        ctx.gemm_rows(&format!("prefill{t}_gate_up"), t, 3072, 16384);
        ctx.gemm_rows(&format!("prefill{t}_down"), t, 8192, 3072);
    }
    // Decode GEMVs over rotating bf16 weights.
    for &(name, m, k, n) in GEMV_ROWS {
        ctx.gemv_row(name, gemv_pool, m, k, n);
    }
    // Attention.
    ctx.attention_row("attn_clip", 577, 16, 64, false);
    for &t in ts {
        ctx.attention_row(&format!("attn_prefill{t}"), t, 32, 96, true);
    }
    // Fusions, each beside the same work in separate passes: LN1 into q_proj over 17 crops,
    // SwiGLU into gate_up at a 757-token prefill, the merge into the projector's first layer.
    ctx.fused_rows(
        "fused_ln_q_proj_x17",
        Fusion::LayerNorm,
        577 * 17,
        1024,
        1024,
    )?;
    ctx.fused_rows("fused_gate_up_swiglu757", Fusion::SwiGlu, 757, 3072, 16384)?;
    ctx.fused_rows("fused_merge_projector_fc1", Fusion::Merge, 2509, 4096, 3072)?;
    // Norms.
    ctx.norm_row("layer_norm_clip", 577, 1024, false);
    ctx.norm_row("rms_norm_decoder", 757, 3072, true);
    Ok(())
}

pub fn run(opts: Opts) -> Result<()> {
    // Resolve the reference environment before the (long) timing, so a failed install fails fast.
    let torch_python = match opts.compare.as_deref() {
        None => None,
        Some("torch") => Some(torch_python()?),
        Some(what) => bail!("`--compare {what}`: only `torch` is supported"),
    };
    if let Some(n) = opts.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("building the global rayon pool")?;
    }
    let isa = phi_kernels::isa::init().context("PHI_KERNELS_ISA")?;
    let threads = rayon::current_num_threads();
    let mut counts = vec![1];
    if threads > 1 {
        counts.push(threads);
    }

    let started = Instant::now();
    eprintln!("probing ceilings ...");
    // One 1 GiB buffer for every DRAM probe of the run (each fresh one is mapped and touched).
    let dram = DramProbe::new();
    let ceil = probe(&counts, &dram);
    // One 1.25 GiB pool of bf16 weights that every decode GEMV slices its copies from (only
    // filled when a decode row is wanted: it takes a few seconds).
    let wants_gemv = GEMV_ROWS.iter().any(|r| wanted(&opts.filter, r.0));
    let gemv_pool = {
        let n = if wants_gemv {
            (5usize << 30) / 4 / 2
        } else {
            0
        };
        // On huge pages, as the resident weights are (see `HugeBuf`).
        let mut pool = HugeBuf::<bf16>::zeroed(n).context("the decode GEMV's weight pool")?;
        fill_as(&mut pool, 11, bf16::from_f32);
        pool
    };

    // With --compare torch, both sides are timed twice in alternation (ours, torch, ours,
    // torch) and each keeps its better time: the neighbours on a shared machine come and go
    // within seconds, and one pass each would let them pick the winner.
    let rounds = if torch_python.is_some() { 2 } else { 1 };
    let mut rows: Vec<Row> = Vec::new();
    for round in 0..rounds {
        let mut ctx = Ctx {
            ceil: &ceil,
            filter: &opts.filter,
            rows: Vec::new(),
            dram: &dram,
        };
        if round > 0 {
            eprintln!("round {} of {rounds} ...", round + 1);
        }
        run_rows(&mut ctx, opts.full, &gemv_pool)?;
        if threads > 1 {
            // The single-thread CLIP GEMMs (the issue's "90% of one core's FMA peak" target).
            let one = rayon::ThreadPoolBuilder::new().num_threads(1).build()?;
            one.install(|| {
                ctx.gemm_rows("clip_qkv_out", 577, 1024, 1024);
                ctx.gemm_rows("clip_fc1", 577, 1024, 4096);
                ctx.gemm_rows("clip_fc2", 577, 4096, 1024);
            });
        }
        if let Some(python) = &torch_python {
            eprintln!("timing the same rows in PyTorch ({TORCH_SCRIPT}) ...");
            let answer = run_torch(python, &ctx.rows)?;
            apply_torch_times(&mut ctx.rows, &answer)?;
        }
        rows = if round == 0 {
            ctx.rows
        } else {
            keep_best(rows, ctx.rows)
        };
    }
    drop(gemv_pool);

    // The neighbours on a shared machine can depress one probe; a second one after the rows,
    // the better of the two kept, gives the harder ceiling for us.
    eprintln!("probing ceilings again ...");
    let ceil = ceil.better(&probe(&counts, &dram));
    for r in &mut rows {
        if let Some(v) = ceil.named(&r.ceiling_name) {
            r.ceiling = v;
        }
    }
    println!(
        "# kernels at Phi-3-vision shapes (isa {}, rayon pool: {} threads)",
        isa.name(),
        threads,
    );
    println!("#");
    println!("# ceilings measured in this run (each probe run before and after the rows, the better kept):");
    for &(t, v) in &ceil.fma {
        println!(
            "#   {:<18} {:>8.1} GFLOP/s",
            format!("{}_{}t", ceil.fma_name, t),
            v
        );
    }
    for &(t, v) in &ceil.dram {
        println!("#   {:<18} {:>8.1} GB/s", format!("dram_read_{t}t"), v);
    }
    for &(t, v) in &ceil.bf16 {
        println!("#   {:<18} {:>8.1} GFLOP/s", ceil.bf16(t).0, v);
    }
    println!(
        "# bf16 products run on: {}",
        match phi_kernels::cpu::gemm::bf16_kernel() {
            Bf16Kernel::Amx => "AMX (tdpbf16ps), ceiling amx_Nt",
            Bf16Kernel::Avx512Bf16 => "AVX512-BF16 (vdpbf16ps), ceiling dpbf16_Nt",
            Bf16Kernel::F32 => "the f32 kernels (no AMX / AVX512-BF16 here), ceiling the FMA peak",
        }
    );
    println!("#");
    println!("# GEMM dtype: f32 / bf16w = f32 products with f32 / bf16 weights, bf16 = bf16 products (bf16 weights,");
    println!("# activations rounded to bf16, f32 sums; AMX/AVX512-BF16 if present). GEMM/attention vs the FMA peak at the row's thread");
    println!("# count; decode GEMV (bf16 weights rotating over >1 GiB) vs DRAM reads probed just before and after the row");
    println!("# (`_near`, the better of the two), 8 rows of A and more vs the FMA peak; norms (cache-resident) vs DRAM reads.");
    println!();

    if let Some(python) = &torch_python {
        let version = torch_version(python).unwrap_or_else(|| "?".into());
        println!(
            "# torch {version} ({VENV_PYTHON}): the same shapes, torch.set_num_threads(row's threads), \
             inference_mode; bf16 GEMM/GEMV rows"
        );
        println!(
            "# run `a @ w.T` with a and w both in bf16, bf16w rows in f32. torch_ratio = our time / torch's \
             (below 1: ours is faster). Each side timed in two alternating rounds, the better kept."
        );
        println!();
    }
    let ctx = Ctx {
        ceil: &ceil,
        filter: &opts.filter,
        rows,
        dram: &dram,
    };
    print!("{}", format_table(&ctx.rows));
    println!(
        "\n{} rows in {:.1} s",
        ctx.rows.len(),
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = &opts.json {
        let v = serde_json::Value::Array(ctx.rows.iter().map(Row::to_json).collect());
        std::fs::write(path, serde_json::to_string_pretty(&v)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// --compare torch
// ---------------------------------------------------------------------------------------------

const TORCH_SCRIPT: &str = "xtask/python/bench_torch.py";
const VENV_PYTHON: &str = ".pyref/bin/python";

/// The reference venv's python, created by `cargo xtask fixtures`' installer when missing.
pub(crate) fn torch_python() -> Result<PathBuf> {
    let root = crate::root();
    if !root.join(VENV_PYTHON).is_file() {
        eprintln!(
            "bench: --compare torch needs the reference environment .pyref/ (PyTorch), which is \
             missing; creating it as `cargo xtask fixtures` does (first time: ~2.7 GB, a few minutes)"
        );
    }
    crate::fixtures::ensure_venv(&root).context("setting up .pyref for --compare torch")
}

/// Runs `bench_torch.py` once over all rows (request on stdin) and returns its JSON answer.
/// Row by row, the better time of two rounds for ours and for torch (the rows of both rounds
/// come in the same order).
fn keep_best(a: Vec<Row>, b: Vec<Row>) -> Vec<Row> {
    a.into_iter()
        .zip(b)
        .map(|(mut x, y)| {
            debug_assert_eq!(x.torch_key(), y.torch_key());
            if y.seconds < x.seconds {
                x.rate = x.rate.scaled(x.seconds / y.seconds);
                x.seconds = y.seconds;
            }
            x.torch_seconds = match (x.torch_seconds, y.torch_seconds) {
                (Some(p), Some(q)) => Some(p.min(q)),
                (p, q) => p.or(q),
            };
            x
        })
        .collect()
}

fn run_torch(python: &std::path::Path, rows: &[Row]) -> Result<serde_json::Value> {
    run_torch_request(python, &torch_request(rows), None)
}

/// Runs `bench_torch.py` on a JSON request (a list of rows, see the script), with
/// `pythonpath` put first on `PYTHONPATH` when given.
pub(crate) fn run_torch_request(
    python: &std::path::Path,
    request: &serde_json::Value,
    pythonpath: Option<&std::path::Path>,
) -> Result<serde_json::Value> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let request = serde_json::to_vec(request)?;
    let mut cmd = Command::new(python);
    cmd.current_dir(crate::root())
        .arg(TORCH_SCRIPT)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(p) = pythonpath {
        cmd.env("PYTHONPATH", p);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {} {TORCH_SCRIPT}", python.display()))?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(&request)
        .context("writing the request to bench_torch.py")?;
    let out = child
        .wait_with_output()
        .context("waiting for bench_torch.py")?;
    if !out.status.success() {
        bail!("{TORCH_SCRIPT} failed ({})", out.status);
    }
    serde_json::from_slice(&out.stdout).context("parsing bench_torch.py's output")
}

pub(crate) fn torch_version(python: &std::path::Path) -> Option<String> {
    let out = std::process::Command::new(python)
        .args(["-c", "import torch; print(torch.__version__)"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(rate: Rate, ceiling: f64) -> Row {
        Row {
            name: "clip_fc1".into(),
            shape: "577x1024x4096".into(),
            dtype: "bf16".into(),
            threads: 2,
            seconds: 0.05,
            rate,
            ceiling_name: "fma_avx512_2t".into(),
            ceiling,
            op: Op::Gemm {
                m: 577,
                k: 1024,
                n: 4096,
            },
            torch_seconds: None,
        }
    }

    #[test]
    fn a_name_dtype_filter_picks_one_dtype() {
        let f = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let filter = f(&["clip_fc1/bf16", "decode"]);
        assert!(wanted(&filter, "clip_fc1") && wanted(&filter, "decode_qkv"));
        assert!(!wanted(&filter, "clip_fc2"));
        assert!(wanted_dtype(&filter, "clip_fc1", "bf16"));
        assert!(
            !wanted_dtype(&filter, "clip_fc1", "bf16w")
                && !wanted_dtype(&filter, "clip_fc1", "f32")
        );
        assert!(wanted_dtype(&filter, "decode_qkv", "f32"));
        assert!(wanted_dtype(&[], "clip_fc2", "f32"));
    }

    #[test]
    fn json_row_has_the_issue_fields() {
        let v = row(Rate::Gflops(100.0), 400.0).to_json();
        let o = v.as_object().unwrap();
        for f in [
            "name",
            "shape",
            "dtype",
            "threads",
            "seconds",
            "gflops",
            "ceiling",
            "pct_of_ceiling",
        ] {
            assert!(o.contains_key(f), "missing {f}");
        }
        assert!(!o.contains_key("gbps"));
        assert_eq!(o["name"], "clip_fc1");
        assert_eq!(o["shape"], "577x1024x4096");
        assert_eq!(o["dtype"], "bf16");
        assert_eq!(o["threads"], 2);
        assert_eq!(o["seconds"].as_f64(), Some(0.05));
        assert_eq!(o["gflops"].as_f64(), Some(100.0));
        assert_eq!(o["ceiling"].as_f64(), Some(400.0));
        assert_eq!(o["pct_of_ceiling"].as_f64(), Some(25.0));
    }

    #[test]
    fn bandwidth_rows_use_gbps() {
        let v = row(Rate::Gbps(11.5), 23.0).to_json();
        let o = v.as_object().unwrap();
        assert!(o.contains_key("gbps") && !o.contains_key("gflops"));
        assert_eq!(o["pct_of_ceiling"].as_f64(), Some(50.0));
        let t = format_table(&[row(Rate::Gbps(11.5), 23.0)]);
        assert!(t.contains("11.5 GB/s") && t.contains("50.0%"), "{t}");
    }

    #[test]
    fn torch_request_describes_each_op() {
        let mut rows = vec![row(Rate::Gflops(100.0), 400.0)];
        let mut r = row(Rate::Gbps(10.0), 20.0);
        r.name = "decode_qkv".into();
        r.op = Op::Gemv {
            m: 1,
            k: 3072,
            n: 9216,
        };
        rows.push(r);
        let mut r = row(Rate::Gflops(50.0), 400.0);
        r.name = "attn_prefill757".into();
        r.dtype = "f32".into();
        r.threads = 1;
        r.op = Op::Attention {
            t: 757,
            heads: 32,
            d: 96,
            causal: true,
        };
        rows.push(r);
        let mut r = row(Rate::Gbps(30.0), 20.0);
        r.name = "rms_norm_decoder".into();
        r.dtype = "f32".into();
        r.op = Op::RmsNorm {
            rows: 757,
            cols: 3072,
        };
        rows.push(r);
        let mut r = row(Rate::Gbps(30.0), 20.0);
        r.name = "layer_norm_clip".into();
        r.dtype = "f32".into();
        r.op = Op::LayerNorm {
            rows: 577,
            cols: 1024,
        };
        rows.push(r);
        let mut r = row(Rate::Gflops(100.0), 400.0);
        r.name = "fused_gate_up_swiglu757_separate".into();
        r.dtype = "bf16w".into();
        r.op = Op::Fused {
            fusion: Fusion::SwiGlu,
            m: 757,
            k: 3072,
            n: 16384,
        };
        rows.push(r);

        let req = torch_request(&rows);
        let req = req.as_array().unwrap();
        assert_eq!(req.len(), 6);
        assert_eq!(
            req[0],
            serde_json::json!({"name": "clip_fc1/bf16/2t", "kind": "gemm", "m": 577, "k": 1024,
                               "n": 4096, "dtype": "bf16", "threads": 2})
        );
        assert_eq!(
            req[1],
            serde_json::json!({"name": "decode_qkv/bf16/2t", "kind": "gemv", "m": 1, "k": 3072,
                               "n": 9216, "dtype": "bf16", "threads": 2})
        );
        assert_eq!(
            req[2],
            serde_json::json!({"name": "attn_prefill757/f32/1t", "kind": "attention", "t": 757,
                               "heads": 32, "d": 96, "causal": true, "dtype": "f32", "threads": 1})
        );
        assert_eq!(req[3]["kind"], "rms_norm");
        assert_eq!(req[3]["rows"], 757);
        assert_eq!(req[3]["cols"], 3072);
        assert_eq!(req[3]["eps"].as_f64(), Some(1e-5));
        assert_eq!(req[4]["kind"], "layer_norm");
        // Torch runs the fused rows' chain in f32 (bf16 weights widen, as for a bf16w GEMM).
        assert_eq!(
            req[5],
            serde_json::json!({"name": "fused_gate_up_swiglu757_separate/bf16w/2t",
                               "kind": "gemm_swiglu", "m": 757, "k": 3072, "n": 16384,
                               "dtype": "f32", "threads": 2})
        );
        // Keys are unique even where names repeat across dtypes and thread counts.
        let mut keys: Vec<_> = req.iter().map(|o| o["name"].as_str().unwrap()).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 6);
    }

    #[test]
    fn torch_times_give_ratio_columns() {
        let mut rows = vec![row(Rate::Gflops(100.0), 400.0)];
        assert_eq!(rows[0].torch_ratio(), None);
        assert!(!format_table(&rows).contains("torch_ratio"));
        assert!(!rows[0]
            .to_json()
            .as_object()
            .unwrap()
            .contains_key("torch_ratio"));

        let answer = serde_json::json!({"clip_fc1/bf16/2t": 0.025});
        apply_torch_times(&mut rows, &answer).unwrap();
        assert_eq!(rows[0].torch_seconds, Some(0.025));
        assert_eq!(rows[0].torch_ratio(), Some(2.0)); // ours 0.05 s / torch 0.025 s
        let o = rows[0].to_json();
        assert_eq!(o["torch_seconds"].as_f64(), Some(0.025));
        assert_eq!(o["torch_ratio"].as_f64(), Some(2.0));
        let t = format_table(&rows);
        assert!(t.contains("| torch | torch_ratio |"), "{t}");
        assert!(t.contains("| 25.00 ms | 2.00x |"), "{t}");

        let missing = serde_json::json!({"other/f32/1t": 1.0});
        assert!(apply_torch_times(&mut rows, &missing).is_err());
    }

    #[test]
    fn second_probe_keeps_the_better_ceiling() {
        let a = Ceilings {
            fma: vec![(1, 150.0), (2, 300.0)],
            fma_name: "fma_avx512",
            dram: vec![(1, 11.0), (2, 13.6)],
            bf16: vec![(1, 900.0), (2, 1700.0)],
            bf16_name: "amx",
        };
        let b = Ceilings {
            fma: vec![(1, 160.0), (2, 290.0)],
            fma_name: "fma_avx512",
            dram: vec![(1, 10.0), (2, 21.6)],
            bf16: vec![(1, 950.0), (2, 1600.0)],
            bf16_name: "amx",
        };
        let c = a.better(&b);
        assert_eq!(c.named("fma_avx512_1t"), Some(160.0));
        assert_eq!(c.named("fma_avx512_2t"), Some(300.0));
        assert_eq!(c.named("dram_read_1t"), Some(11.0));
        assert_eq!(c.named("dram_read_2t"), Some(21.6));
        assert_eq!(c.named("amx_1t"), Some(950.0));
        assert_eq!(c.named("amx_2t"), Some(1700.0));
        assert_eq!(c.bf16(2), ("amx_2t".to_string(), 1700.0));
        assert_eq!(c.named("dpbf16_2t"), None);
        // Without a bf16 probe (bf16 products on the f32 kernels) their ceiling is the FMA's.
        let plain = Ceilings {
            bf16: vec![],
            bf16_name: "f32",
            ..a
        };
        assert_eq!(plain.bf16(2), ("fma_avx512_2t".to_string(), 300.0));
    }

    #[test]
    fn two_rounds_keep_each_sides_better_time() {
        let mut first = row(Rate::Gflops(100.0), 400.0); // 0.05 s
        first.torch_seconds = Some(0.02);
        let mut second = row(Rate::Gflops(125.0), 400.0);
        second.seconds = 0.04;
        second.torch_seconds = Some(0.03);
        let best = keep_best(vec![first.clone()], vec![second.clone()]);
        assert_eq!(best[0].seconds, 0.04);
        assert_eq!(best[0].rate.value(), 125.0);
        assert_eq!(best[0].torch_seconds, Some(0.02));
        // And the other way round: our first time stands, torch's second does.
        let best = keep_best(vec![second], vec![first]);
        assert_eq!((best[0].seconds, best[0].torch_seconds), (0.04, Some(0.02)));
        assert_eq!(best[0].rate.value(), 125.0);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
