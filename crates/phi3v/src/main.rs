//! `phi3v`: Phi-3-vision on the command line.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use phi3v::gpu::DeviceKind;
use phi3v::locate::{self, ModelSource};
use phi3v::processor::{decode_image, ChatMessage, RgbImage};
use phi3v::sampling::SamplingParams;
#[cfg(feature = "server")]
use phi3v::server::ServerConfig;
use phi3v::trace::Trace;
use phi3v::{GenerateOptions, Pipeline, Residency};

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
    #[cfg(feature = "server")]
    /// Serve the OpenAI chat-completions API (POST /v1/chat/completions, GET /v1/models,
    /// GET /health).
    Serve(ServeArgs),
    /// An interactive conversation in the terminal; the KV cache is kept between turns.
    Chat(ChatArgs),
}

/// Which model, where and how it runs.
#[derive(clap::Args)]
struct ModelArgs {
    /// Model directory (config.json, safetensors, tokenizer) or a Hugging Face repo id
    /// (`microsoft/Phi-3-vision-128k-instruct`: the local hub cache, else downloaded into it).
    /// Default: $PHI3V_MODEL, else a Phi-3(.5)-vision snapshot in the Hugging Face cache, else
    /// the bundled tiny model.
    #[arg(long)]
    model: Option<PathBuf>,
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
    /// Keep the weights memory-mapped from the checkpoint instead of reading them into memory
    /// first: starts at once, but CPU decoding streams mapped file pages about 20% slower on
    /// the machines we measured. Always so with --device cuda (the upload reads the mapping).
    #[arg(long)]
    mmap: bool,
}

/// How the next token is chosen.
#[derive(clap::Args)]
struct SamplingArgs {
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
}

impl SamplingArgs {
    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
        }
    }
}

#[derive(clap::Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
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
    /// Write the pipeline's tensors to this safetensors file; generates exactly
    /// --max-new-tokens tokens.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Print each pipeline stage with its shape and time.
    #[arg(long)]
    trace: bool,
}

#[cfg(feature = "server")]
#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// The model id clients name (default: the repo id, else the model directory's name).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Request bodies over this many bytes get 413.
    #[arg(long, default_value_t = 20 * 1024 * 1024)]
    max_body_bytes: usize,
    /// A request's images together may have this many pixels; more are refused from the
    /// image headers, before decoding.
    #[arg(long, default_value_t = 64 * 1024 * 1024)]
    max_image_pixels: u64,
    /// Requests that may wait for the model; more get 429 with Retry-After.
    #[arg(long, default_value_t = 64)]
    queue_size: usize,
    /// Requests generated at once, one token each in turn.
    #[arg(long, default_value_t = 4)]
    max_active: usize,
    /// max_tokens of a request that gives none (capped by the context).
    #[arg(long, default_value_t = 1024)]
    default_max_tokens: usize,
    /// MiB of projected image features kept for images sent again.
    #[arg(long, default_value_t = 512)]
    feature_cache_mib: usize,
    /// Accept image_url values that are absolute local paths (or file:// URLs).
    #[arg(long)]
    allow_local_files: bool,
    /// Require `Authorization: Bearer <KEY>` on /v1/* (/health stays open).
    #[arg(long, env = "PHI3V_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// No request log lines on stderr.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Images for the first message; `/image PATH` adds one to the next message.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// A system message opening the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Positions of the conversation's KV cache (capped by the model's).
    #[arg(long, default_value_t = 4096)]
    context: usize,
    /// Crops per image (overrides preprocessor_config.json).
    #[arg(long)]
    num_crops: Option<usize>,
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
        #[cfg(feature = "server")]
        Command::Serve(args) => serve(args),
        Command::Chat(args) => chat(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// Sets up kernels and threads, resolves and loads the model (with a spinner), and moves it to
/// its device.
fn load(args: &ModelArgs, trace: &Trace) -> Result<(Pipeline, ModelSource)> {
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
    let (dir, source) = locate::resolve(args.model.as_deref())
        .map_err(anyhow::Error::msg)
        .context("--model")?;
    match &source {
        ModelSource::Bundled => eprintln!(
            "note: no --model, PHI3V_MODEL or cached Phi-3-vision found; using the bundled tiny model at {} (random weights: its text is noise)",
            dir.display()
        ),
        ModelSource::HfCache(repo) | ModelSource::Downloaded(repo) => {
            eprintln!("note: using {repo} from the Hugging Face cache ({})", dir.display())
        }
        _ => {}
    }
    let device = match args.device {
        Some(DeviceArg::Cpu) => DeviceKind::Cpu,
        Some(DeviceArg::Cuda) => DeviceKind::Cuda,
        None => DeviceKind::detect(),
    };
    let residency = if args.mmap || device == DeviceKind::Cuda {
        Residency::Mapped
    } else {
        Residency::Resident
    };
    let verb = match residency {
        Residency::Mapped => "mapping",
        Residency::Resident => "reading",
    };
    let spinner = indicatif::ProgressBar::new_spinner()
        .with_message(format!("{verb} weights from {}", dir.display()));
    spinner.enable_steady_tick(std::time::Duration::from_millis(100));
    let loaded = trace.time(
        "load model",
        |_: &Result<Pipeline>| vec![],
        &dir.display().to_string(),
        || {
            Pipeline::load_held(&dir, args.dtype.into(), residency)
                .with_context(|| format!("loading model from {}", dir.display()))
        },
    );
    spinner.finish_and_clear();
    let mut pipeline = loaded?;
    if device == DeviceKind::Cuda {
        trace.time(
            "upload to GPU",
            |_: &Result<()>| vec![],
            "bf16 weights",
            || pipeline.use_device(device).context("--device cuda"),
        )?;
    }
    Ok((pipeline, source))
}

fn generate(args: GenerateArgs) -> Result<()> {
    let t0 = Instant::now();
    let trace = Trace::new(args.trace);
    let (mut pipeline, _) = load(&args.model, &trace)?;
    pipeline.show_progress = true;
    let processor = pipeline
        .image_processor
        .with_num_crops_override(args.num_crops)
        .context("--num-crops")?;

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
        max_new_tokens: args.sampling.max_new_tokens,
        sampling: args.sampling.params(),
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

#[cfg(feature = "server")]
fn serve(args: ServeArgs) -> Result<()> {
    let (pipeline, source) = load(&args.model, &Trace::new(false))?;
    let model_id = match (&args.served_model_name, source) {
        (Some(n), _) => n.clone(),
        (None, ModelSource::HfCache(repo) | ModelSource::Downloaded(repo)) => repo,
        (None, _) => pipeline
            .model
            .dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "phi3v".into()),
    };
    if args.queue_size == 0 || args.max_active == 0 {
        bail!("--queue-size and --max-active must be at least 1");
    }
    let cfg = ServerConfig {
        model_id: model_id.clone(),
        max_body_bytes: args.max_body_bytes,
        max_image_pixels: args.max_image_pixels,
        queue_size: args.queue_size,
        max_active: args.max_active,
        default_max_tokens: args.default_max_tokens,
        feature_cache_bytes: args.feature_cache_mib * 1024 * 1024,
        allow_local_files: args.allow_local_files,
        api_key: args.api_key.clone().filter(|k| !k.is_empty()),
        log_requests: !args.quiet,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("binding {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "serving {model_id} on http://{addr} ({} device; POST /v1/chat/completions, GET /v1/models, GET /health)",
            format!("{:?}", pipeline.device()).to_lowercase()
        );
        let app = phi3v::server::router(pipeline, cfg);
        phi3v::server::serve(listener, app)
            .await
            .context("serving")
    })
}

/// A chat command typed at the prompt.
enum ChatInput {
    Exit,
    Reset,
    Image(PathBuf),
    Message(String),
}

fn parse_chat_line(line: &str) -> Option<ChatInput> {
    let t = line.trim();
    match t {
        "" => None,
        "/exit" | "/quit" => Some(ChatInput::Exit),
        "/reset" => Some(ChatInput::Reset),
        _ => match t.strip_prefix("/image ") {
            Some(p) => Some(ChatInput::Image(PathBuf::from(p.trim()))),
            None => Some(ChatInput::Message(line.to_string())),
        },
    }
}

fn chat(args: ChatArgs) -> Result<()> {
    use std::io::{BufRead, IsTerminal};
    let trace = Trace::new(args.trace);
    let (mut pipeline, _) = load(&args.model, &trace)?;
    pipeline.show_progress = true;
    let processor = pipeline
        .image_processor
        .with_num_crops_override(args.num_crops)
        .context("--num-crops")?;
    args.sampling
        .params()
        .validate()
        .map_err(anyhow::Error::msg)?;
    let context = args
        .context
        .min(pipeline.model.decoder.cfg.max_position_embeddings);
    // On the CPU the cache grows with the conversation up to --context; a GPU cache cannot
    // grow, so it is made whole.
    let initial = match pipeline.device() {
        DeviceKind::Cuda => context,
        DeviceKind::Cpu => 0,
    };
    let mut session = pipeline.new_session(initial).context("--context")?;
    let opening: Vec<ChatMessage> = args
        .system
        .iter()
        .map(|s| ChatMessage::new("system", s.clone()))
        .collect();
    let mut messages = opening.clone();
    let mut images: Vec<RgbImage> = Vec::new();
    let mut pending: Vec<RgbImage> = args
        .images
        .iter()
        .map(|p| decode_image(p).with_context(|| format!("--image {}", p.display())))
        .collect::<Result<_>>()?;

    let stdin = std::io::stdin();
    let interactive = stdin.is_terminal();
    if interactive {
        eprintln!(
            "chat ({} positions of context). /image PATH attaches an image to your next message, /reset starts over, /exit quits.",
            context
        );
    }
    let mut stdout = std::io::stdout();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
        }
        let Some(line) = lines.next() else { break };
        let line = line.context("reading standard input")?;
        let Some(input) = parse_chat_line(&line) else {
            continue;
        };
        let text = match input {
            ChatInput::Exit => break,
            ChatInput::Reset => {
                messages = opening.clone();
                images.clear();
                pending.clear();
                eprintln!("(conversation cleared)");
                continue;
            }
            ChatInput::Image(p) => {
                match decode_image(&p) {
                    Ok(img) => {
                        pending.push(img);
                        eprintln!(
                            "(image {} attached to your next message)",
                            images.len() + pending.len()
                        );
                    }
                    Err(e) => eprintln!("error: /image {}: {e}", p.display()),
                }
                continue;
            }
            ChatInput::Message(m) => m,
        };
        let n_before = images.len();
        let mut content = String::new();
        for img in pending.drain(..) {
            images.push(img);
            content.push_str(&format!("<|image_{}|>\n", images.len()));
        }
        content.push_str(&text);
        messages.push(ChatMessage::new("user", content));
        match chat_turn(
            &pipeline,
            &mut session,
            &messages,
            &images,
            &processor,
            &args.sampling,
            context,
            &trace,
            &mut stdout,
        ) {
            Ok(answer) => messages.push(ChatMessage::new("assistant", answer)),
            Err(e) => {
                // The turn is dropped; the conversation goes on from before it.
                eprintln!("error: {}", error_chain(&e));
                messages.pop();
                images.truncate(n_before);
            }
        }
    }
    Ok(())
}

/// One answer: the whole conversation is templated and tokenised again, and only what the
/// session does not already hold runs through the model.
#[allow(clippy::too_many_arguments)]
fn chat_turn(
    pipeline: &Pipeline,
    session: &mut phi3v::Session,
    messages: &[ChatMessage],
    images: &[RgbImage],
    processor: &phi3v::processor::ImageProcessor,
    sampling: &SamplingArgs,
    context: usize,
    trace: &Trace,
    out: &mut impl Write,
) -> Result<String> {
    let prompt = pipeline.prompt.apply_chat_template(messages, true)?;
    let prepared = pipeline.prepare(images, &prompt, processor, trace)?;
    let seq = prepared.input_ids.len();
    if seq >= context {
        bail!("the conversation has {seq} tokens but the context holds {context}: /reset to start over, or raise --context");
    }
    let opts = GenerateOptions {
        max_new_tokens: sampling.max_new_tokens,
        sampling: sampling.params(),
        ignore_stop: false,
    };
    let max_new = sampling.max_new_tokens.min(context - seq);
    pipeline.grow(session, seq + max_new)?;
    let fed = pipeline.feed(session, &prepared, None, trace)?;
    let mut dec = phi3v::Decoding::new(pipeline, &opts, max_new, &fed);
    let start = Instant::now();
    while let Some(piece) = dec.next(pipeline, session)? {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
    }
    let _ = writeln!(out);
    let secs = start.elapsed().as_secs_f64();
    eprintln!(
        "[{seq} prompt tokens, {} reused from the last turn, prefill {:.2}s; {} new tokens, {:.1} tok/s]",
        fed.reused,
        fed.prefill_time.as_secs_f64(),
        dec.ids.len(),
        dec.ids.len().saturating_sub(1) as f64 / secs.max(1e-9)
    );
    Ok(pipeline.prompt.decode(&dec.ids, true)?)
}
