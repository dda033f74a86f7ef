//! `phi3v`: Phi-3-vision on the command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use phi3v::gpu::DeviceKind;
use phi3v::locate::{self, ModelSource};
use phi3v::processor::{decode_image, RgbImage};
use phi3v::sampling::SamplingParams;
use phi3v::trace::Trace;
use phi3v::{GenerateOptions, Pipeline};

#[derive(Parser)]
#[command(
    name = "phi3v",
    version,
    about = "Phi-3-vision / Phi-3.5-vision inference on our own kernels"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Describe images: preprocess, encode, prefill and generate, streaming the answer.
    Generate(GenerateArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model directory (config.json, safetensors, tokenizer). Default: $PHI3V_MODEL, else a
    /// Phi-3(.5)-vision snapshot in the Hugging Face cache, else the bundled tiny model.
    #[arg(long)]
    model: Option<PathBuf>,
    /// An image (PNG, JPEG, WebP, GIF, BMP); repeat for several, referenced as <|image_1|>, ...
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// The user's message: wrapped in the chat template, image tags prepended unless present.
    #[arg(
        long,
        conflicts_with = "raw_prompt",
        required_unless_present = "raw_prompt"
    )]
    prompt: Option<String>,
    /// Tokenised exactly as given (tags included), no chat template.
    #[arg(long)]
    raw_prompt: Option<String>,
    /// Crops per image (overrides preprocessor_config.json).
    #[arg(long)]
    num_crops: Option<usize>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Precision of the matrix products: f32 (exact to the reference; bf16 weights widen
    /// exactly) or bf16 (activations rounded to bf16 at each product, f32 accumulation, KV
    /// cache in bf16; norms, softmax and attention arithmetic stay f32).
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    dtype: Precision,
    /// Where the model runs: cuda (our kernels on GPU 0, bf16) or cpu. Default: cuda when
    /// this binary has the `cuda` feature and a GPU answers, else cpu.
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Write the pipeline's tensors to this safetensors file; generates exactly
    /// --max-new-tokens tokens.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Print each pipeline stage with its shape and time.
    #[arg(long)]
    trace: bool,
}

#[derive(Copy, Clone, Debug, clap::ValueEnum)]
enum DeviceArg {
    Cpu,
    Cuda,
}

#[derive(Copy, Clone, Debug, clap::ValueEnum)]
enum Precision {
    F32,
    Bf16,
}

impl From<Precision> for phi_kernels::DType {
    fn from(p: Precision) -> Self {
        match p {
            Precision::F32 => phi_kernels::DType::F32,
            Precision::Bf16 => phi_kernels::DType::BF16,
        }
    }
}

/// The error and its causes joined by ": ", leaving out a cause whose text the message before it
/// already ends with (our error types print their source inline, as `path: io error`).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    let t0 = Instant::now();
    phi_kernels::isa::init().context("PHI_KERNELS_ISA")?;
    if let Some(n) = args.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("--threads")?;
    }
    let trace = Trace::new(args.trace);

    let (dir, source) = locate::resolve(args.model.as_deref());
    match &source {
        ModelSource::Bundled => eprintln!(
            "note: no --model, PHI3V_MODEL or cached Phi-3-vision found; using the bundled tiny model at {} (random weights: its text is noise)",
            dir.display()
        ),
        ModelSource::HfCache(repo) => eprintln!("note: using {repo} from the Hugging Face cache ({})", dir.display()),
        _ => {}
    }
    let mut pipeline = trace.time(
        "load model",
        |_: &Result<Pipeline>| vec![],
        &dir.display().to_string(),
        || {
            Pipeline::load_with(&dir, args.dtype.into())
                .with_context(|| format!("loading model from {}", dir.display()))
        },
    )?;
    let processor = match args.num_crops {
        Some(n) => pipeline
            .image_processor
            .with_num_crops(n)
            .context("--num-crops")?,
        None => pipeline.image_processor.clone(),
    };
    let device = match args.device {
        Some(DeviceArg::Cpu) => DeviceKind::Cpu,
        Some(DeviceArg::Cuda) => DeviceKind::Cuda,
        None => DeviceKind::detect(),
    };
    if device == DeviceKind::Cuda {
        trace.time(
            "upload to GPU",
            |_: &Result<()>| vec![],
            "bf16 weights",
            || pipeline.use_device(device).context("--device cuda"),
        )?;
    }

    let images: Vec<RgbImage> = args
        .images
        .iter()
        .map(|p| decode_image(p).with_context(|| format!("--image {}", p.display())))
        .collect::<Result<_>>()?;
    let (text, chat) = match (&args.prompt, &args.raw_prompt) {
        (Some(p), None) => (p.as_str(), true),
        (None, Some(r)) => (r.as_str(), false),
        _ => bail!("give exactly one of --prompt and --raw-prompt"),
    };
    let prompt = pipeline.build_prompt(text, images.len(), chat)?;
    let prepared = pipeline.prepare(&images, &prompt, &processor, &trace)?;
    if trace.enabled() {
        eprintln!(
            "[trace]   prompt: {} tokens ({} image placeholders)",
            prepared.input_ids.len(),
            prepared.image_token_count()
        );
    }

    let opts = GenerateOptions {
        max_new_tokens: args.max_new_tokens,
        sampling: SamplingParams {
            temperature: args.temperature,
            top_p: args.top_p,
            top_k: args.top_k,
            seed: args.seed,
        },
        ignore_stop: args.dump.is_some(),
    };
    let mut stdout = std::io::stdout();
    let gen = pipeline.generate(&prepared, &opts, &trace, |piece| {
        let _ = stdout.write_all(piece.as_bytes());
        let _ = stdout.flush();
    })?;
    println!();
    trace.stage(
        "decode",
        &[gen.ids.len()],
        gen.decode_time,
        "new tokens, streamed above",
    );

    if let Some(path) = &args.dump {
        phi3v::dump::write(path, &prepared, &gen, pipeline.model.decoder.hidden_size())?;
        eprintln!("dumped tensors to {}", path.display());
    }
    let decode_s = gen.decode_time.as_secs_f64();
    eprintln!(
        "{} prompt tokens, {} new tokens | encode {:.2}s, prefill {:.2}s ({:.1} tok/s), decode {:.1} tok/s | total {:.2}s",
        gen.prompt_len,
        gen.ids.len(),
        gen.encode_time.as_secs_f64(),
        gen.prefill_time.as_secs_f64(),
        gen.prompt_len as f64 / gen.prefill_time.as_secs_f64().max(1e-9),
        gen.ids.len().saturating_sub(1) as f64 / decode_s.max(1e-9),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
