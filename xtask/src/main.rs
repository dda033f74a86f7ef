//! Project tasks: `cargo xtask <kernels|device-bundle|fixtures|parity|synth|bench>`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

mod bench;
mod device;
mod e2e;
mod fixtures;
mod kernels;
mod serve_load;
mod synth;

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once; boxing the flags would only add noise
enum Task {
    /// Compile kernels/*.cu to PTX and cubins (pinned nvcc 13.0 from PyPI wheels, no CUDA
    /// install) and print ptxas' registers / shared memory / spills per kernel.
    Kernels {
        /// Compile into a scratch folder and fail if the committed files are stale or a kernel
        /// spills.
        #[arg(long)]
        check: bool,
    },
    /// Build the folder the GPU machine runs: CUDA test and bench binaries (kernels embedded),
    /// PyTorch's side of the bench and run.sh (tests, compute-sanitizer, one table).
    DeviceBundle {
        /// Where (default: target/device-bundle).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Regenerate the tiny checkpoint and golden tensors with the reference implementation
    /// (PyTorch, transformers, Pillow from PyPI in a cached virtual environment).
    Fixtures,
    /// Compare the Rust pipeline with the goldens stage by stage and print a table.
    Parity {
        /// Only these cases (default: all).
        cases: Vec<String>,
    },
    /// Write a checkpoint with the real Phi-3-vision shapes and names and random bf16 weights.
    Synth {
        #[arg(long)]
        out: PathBuf,
        /// Decoder layers (32 in the real model).
        #[arg(long, default_value_t = 32)]
        layers: usize,
        /// CLIP layers (24 in the real model).
        #[arg(long, default_value_t = 24)]
        clip_layers: usize,
    },
    /// Time the kernels at the real shapes against ceilings probed in the same run; one table.
    Bench {
        /// Also write the rows as JSON objects to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Size of the global rayon pool (default: rayon's, i.e. the CPUs or RAYON_NUM_THREADS).
        #[arg(long)]
        threads: Option<usize>,
        /// Add the x17-crop CLIP and T = 2509 decoder prefill rows (slow on two cores).
        #[arg(long)]
        full: bool,
        /// Also time the same rows in PyTorch (`torch`, from the reference venv `.pyref/`, created
        /// if missing) and add `torch` and `torch_ratio` (ours / torch time) columns.
        #[arg(long)]
        compare: Option<String>,
        /// Run the criterion benches (`cargo bench -p phi3v-benches`) instead of the table.
        #[arg(long)]
        criterion: bool,
        /// Time the whole pipeline stage by stage on `--model` instead of the kernel table.
        #[arg(long, requires = "model")]
        e2e: bool,
        /// Load-test `phi3v serve` on loopback (`--model`, default the bundled tiny model):
        /// requests/s, p50/p99 latency, server memory before, at peak and after each round.
        #[arg(long, conflicts_with = "e2e")]
        serve: bool,
        /// Concurrent clients for --serve.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Requests per round for --serve (each round also stops after --seconds).
        #[arg(long, default_value_t = 200)]
        requests: usize,
        /// Rounds for --serve (memory after each shows whether it returns to the baseline).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Time budget of one --serve round, in seconds.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Model directory for --e2e (e.g. one written by `cargo xtask synth`).
        #[arg(long)]
        model: Option<PathBuf>,
        /// Image for --e2e (default: fixtures/images/landscape.jpg).
        #[arg(long)]
        image: Option<PathBuf>,
        /// Crops per image for --e2e (default: the model's preprocessor_config.json).
        #[arg(long)]
        num_crops: Option<usize>,
        /// Tokens to decode for --e2e (max_tokens of each --serve request).
        #[arg(long, default_value_t = 16)]
        new_tokens: usize,
        /// Device for --e2e: cpu or cuda (needs xtask built with `--features cuda`, as the
        /// device bundle's is).
        #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
        device: String,
        /// Precision of the products for --e2e: f32 or bf16 (as `phi3v generate --dtype`).
        #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
        dtype: String,
        /// For --e2e on the CPU: keep the weights memory-mapped (as `phi3v generate --mmap`)
        /// instead of reading them into memory.
        #[arg(long)]
        mmap: bool,
        /// Only rows whose name contains one of these; `NAME/DTYPE` (`clip_fc1/bf16`) picks one
        /// dtype of a GEMM row (with --criterion: criterion's arguments).
        args: Vec<String>,
    },
}

/// The repository: `$PHI3V_REPO_ROOT` when set (the device bundle runs this binary away from
/// the checkout it was built in), else where it was built.
fn root() -> PathBuf {
    std::env::var_os("PHI3V_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("xtask lives in the workspace")
                .to_path_buf()
        })
}

fn main() -> Result<()> {
    let root = root();
    match Cli::parse().command {
        Task::Fixtures => fixtures::run(&root),
        Task::Kernels { check } => kernels::run(&root, check),
        Task::DeviceBundle { out } => device::run(&root, out),
        Task::Parity { cases } => parity(&root, cases),
        Task::Synth {
            out,
            layers,
            clip_layers,
        } => synth::run(&root, &out, layers, clip_layers),
        Task::Bench {
            serve: true,
            model,
            image,
            clients,
            requests,
            rounds,
            seconds,
            new_tokens,
            ..
        } => serve_load::run(
            &root,
            serve_load::Opts {
                model: model.unwrap_or_else(|| root.join("fixtures/tiny-phi3v")),
                image: image.unwrap_or_else(|| root.join("fixtures/images/landscape.jpg")),
                clients,
                requests,
                rounds,
                seconds,
                max_tokens: new_tokens,
            },
        ),
        Task::Bench {
            e2e: true,
            model,
            image,
            num_crops,
            new_tokens,
            threads,
            dtype,
            compare,
            device,
            mmap,
            ..
        } => {
            if let Some(c) = compare.as_deref().filter(|c| *c != "torch") {
                anyhow::bail!("--compare {c}: only `torch` is supported");
            }
            if let Some(n) = threads {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build_global()
                    .context("--threads")?;
            }
            let image = image.unwrap_or_else(|| root.join("fixtures/images/landscape.jpg"));
            let model = model.expect("clap requires --model with --e2e");
            e2e::run(e2e::Opts {
                model: &model,
                image: &image,
                num_crops,
                new_tokens,
                compare_torch: compare.is_some(),
                mmap,
                device: if device == "cuda" {
                    phi3v::gpu::DeviceKind::Cuda
                } else {
                    phi3v::gpu::DeviceKind::Cpu
                },
                precision: if dtype == "bf16" {
                    phi_kernels::DType::BF16
                } else {
                    phi_kernels::DType::F32
                },
            })
        }
        Task::Bench {
            json,
            threads,
            full,
            compare,
            criterion: false,
            args,
            ..
        } => bench::run(bench::Opts {
            threads,
            json,
            full,
            compare,
            filter: args,
        }),
        Task::Bench { args, .. } => {
            let status = Command::new(env!("CARGO"))
                .current_dir(&root)
                .args(["bench", "-p", "phi3v-benches", "--bench", "kernels", "--"])
                .args(&args)
                .status()
                .context("running cargo bench")?;
            if !status.success() {
                bail!("cargo bench failed");
            }
            Ok(())
        }
    }
}

fn parity(root: &Path, only: Vec<String>) -> Result<()> {
    let fixtures = root.join("fixtures");
    let pipeline = phi3v::Pipeline::load(&fixtures.join("tiny-phi3v"))
        .context("loading fixtures/tiny-phi3v")?;
    let cases = if only.is_empty() {
        phi3v::parity::cases(&fixtures)?
    } else {
        only
    };
    let mut rows = Vec::new();
    for case in &cases {
        let r = phi3v::parity::run_case(&pipeline, &fixtures, case)
            .with_context(|| format!("case {case}"))?;
        rows.extend(r);
    }
    print!("{}", phi3v::parity::Row::format_table(&rows));
    let failed = rows.iter().filter(|r| !r.pass).count();
    println!(
        "{} rows, {} passed, {} failed",
        rows.len(),
        rows.len() - failed,
        failed
    );
    if failed > 0 {
        bail!("{failed} parity rows failed");
    }
    Ok(())
}
