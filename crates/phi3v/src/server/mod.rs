//! `phi3v serve`: the OpenAI chat-completions API over one loaded model.
//!
//! ```text
//! POST /v1/chat/completions ─ body limit ─ JSON ─ messages → chat template + images (decoded
//!   under a pixel limit, in a blocking task) → Prepared ─ bounded queue (full: 429) ─▶ engine
//!   worker (feature cache, KV reuse, round-robin over active requests) ─ events ─▶ JSON or SSE
//! GET /v1/models, GET /health
//! ```

pub mod engine;
pub mod openai;
pub mod stop;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use tokio::sync::mpsc;

use crate::feature_cache::FeatureCache;
use crate::processor::{decode_image_bytes_limited, ChatMessage, RgbImage};
use crate::sampling::SamplingParams;
use crate::trace::Trace;
use crate::{GenerateOptions, Pipeline};
use engine::{Engine, Event, Job};
use openai::{ApiError, ChatRequest, Piece, Stop, Usage};

/// Server settings (the `phi3v serve` flags).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The id `/v1/models` lists and requests may name.
    pub model_id: String,
    /// Request bodies over this many bytes get 413.
    pub max_body_bytes: usize,
    /// Images over this many pixels (all of a request's images together) are refused from
    /// their headers, before decoding.
    pub max_image_pixels: u64,
    /// Requests waiting beyond this get 429.
    pub queue_size: usize,
    /// Requests generated at once, a token each in turn.
    pub max_active: usize,
    /// `max_tokens` when a request gives none (then capped by the context).
    pub default_max_tokens: usize,
    /// Bytes of projected image features kept for images sent again.
    pub feature_cache_bytes: usize,
    /// Accept `image_url`s that are local file paths (`file://` or absolute paths).
    pub allow_local_files: bool,
    /// When set, `/v1/*` requests must carry `Authorization: Bearer <key>` (401 otherwise).
    pub api_key: Option<String>,
    /// One line per request on stderr (id, status, tokens, time).
    pub log_requests: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            model_id: "phi3v".into(),
            max_body_bytes: 20 * 1024 * 1024,
            max_image_pixels: 64 * 1024 * 1024,
            queue_size: 64,
            max_active: 4,
            default_max_tokens: 1024,
            feature_cache_bytes: 512 * 1024 * 1024,
            allow_local_files: false,
            api_key: None,
            log_requests: false,
        }
    }
}

struct AppState {
    pipeline: Arc<Pipeline>,
    cfg: ServerConfig,
    engine: Engine,
    features: Arc<FeatureCache>,
    next_id: AtomicU64,
    /// Requests whose images are being decoded and prompts tokenised at once: each may hold up
    /// to `max_image_pixels` decoded pixels, so this bounds that memory too.
    planning: tokio::sync::Semaphore,
    created: u64,
}

/// The router over a loaded pipeline; starts the model worker.
pub fn router(pipeline: Pipeline, cfg: ServerConfig) -> Router {
    let pipeline = Arc::new(pipeline);
    let features = Arc::new(FeatureCache::new(cfg.feature_cache_bytes));
    let engine = Engine::start(
        pipeline.clone(),
        features.clone(),
        cfg.queue_size,
        cfg.max_active,
    );
    let state = Arc::new(AppState {
        pipeline,
        engine,
        features,
        next_id: AtomicU64::new(1),
        planning: tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()) * 2,
        ),
        created: now(),
        cfg: cfg.clone(),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "no such endpoint (try POST /v1/chat/completions, GET /v1/models, GET /health)",
            )
        })
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes))
        .with_state(state)
}

/// Serves until Ctrl-C or SIGTERM, then lets requests in flight finish.
pub async fn serve(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let term = async {
                #[cfg(unix)]
                if let Ok(mut s) =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                {
                    s.recv().await;
                    return;
                }
                std::future::pending::<()>().await
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term => {}
            }
            eprintln!("shutting down: finishing the requests in flight");
        })
        .await
}

/// `Authorization: Bearer <key>` when the server has a key.
fn authorize(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &st.cfg.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Compare every byte whatever the first difference, so timing says nothing of the key.
    let same = given.len() == key.len()
        && given
            .bytes()
            .zip(key.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or wrong API key (send Authorization: Bearer <key>)",
        )
        .with_code("invalid_api_key"))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn models(State(st): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&st, &headers) {
        return e.into_response();
    }
    Json(serde_json::json!({
        "object": "list",
        "data": [{
            "id": st.cfg.model_id,
            "object": "model",
            "created": st.created,
            "owned_by": "phi3v",
            "max_model_len": st.pipeline.model.decoder.cfg.max_position_embeddings,
        }],
    }))
    .into_response()
}

async fn health(State(st): State<Arc<AppState>>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "model": st.cfg.model_id,
        "device": format!("{:?}", st.pipeline.device()).to_lowercase(),
        "queue_size": st.cfg.queue_size,
        "max_active": st.engine.max_active,
        "requests": st.engine.stats.snapshot(),
        "feature_cache": st.features.stats(),
    }))
}

/// What a request asks for, checked and prepared for the worker.
struct Planned {
    job: Job,
    events: mpsc::UnboundedReceiver<Event>,
    stream: bool,
    include_usage: bool,
}

async fn chat_completions(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let started = std::time::Instant::now();
    let r = chat_completions_inner(&st, &headers, body, started).await;
    // Answers that reached the model are logged when they end (see `log_done`).
    if st.cfg.log_requests && r.status() != StatusCode::OK {
        eprintln!(
            "POST /v1/chat/completions {} {:.3}s",
            r.status().as_u16(),
            started.elapsed().as_secs_f64()
        );
    }
    r
}

/// The request log line of an answer the model finished.
fn log_done(log: Option<std::time::Instant>, id: &str, finish: &str, usage: &Usage) {
    if let Some(t0) = log {
        eprintln!(
            "POST /v1/chat/completions 200 {id} prompt {} (cached {}) completion {} finish {finish} {:.3}s",
            usage.prompt_tokens,
            usage.prompt_tokens_details.cached_tokens,
            usage.completion_tokens,
            t0.elapsed().as_secs_f64()
        );
    }
}

async fn chat_completions_inner(
    st: &Arc<AppState>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    started: std::time::Instant,
) -> Response {
    if let Err(e) = authorize(st, headers) {
        return e.into_response();
    }
    let body = match body {
        Ok(b) => b,
        Err(e) => {
            let status = e.status();
            let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
                format!(
                    "request body exceeds the server's limit of {} bytes (--max-body-bytes)",
                    st.cfg.max_body_bytes
                )
            } else {
                e.body_text()
            };
            return ApiError::new(status, "invalid_request_error", msg).into_response();
        }
    };
    // Decoding images and tokenising are CPU work: off the async threads.
    let Ok(_slot) = st.planning.acquire().await else {
        return ApiError::internal("the server is shutting down").into_response();
    };
    let st2 = st.clone();
    let planned = tokio::task::spawn_blocking(move || plan(&st2, &body)).await;
    let planned = match planned {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => return e.into_response(),
        Err(e) => return ApiError::internal(format!("request task failed: {e}")).into_response(),
    };
    let Planned {
        job,
        events,
        stream,
        include_usage,
    } = planned;
    let stats = &st.engine.stats;
    stats.waiting.fetch_add(1, Ordering::Relaxed);
    if let Err(e) = st.engine.queue.try_send(job) {
        stats.waiting.fetch_sub(1, Ordering::Relaxed);
        return match e {
            mpsc::error::TrySendError::Full(_) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                let mut e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_exceeded",
                    format!(
                        "the server's queue of {} requests is full; retry later",
                        st.cfg.queue_size
                    ),
                );
                e.retry_after = Some(stats.retry_after_secs(st.engine.max_active));
                e.into_response()
            }
            mpsc::error::TrySendError::Closed(_) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "the model worker has stopped",
            )
            .into_response(),
        };
    }
    let id = format!(
        "chatcmpl-{:x}{:08x}",
        now(),
        st.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let created = now();
    let model = st.cfg.model_id.clone();
    let log = st.cfg.log_requests.then_some(started);
    if stream {
        stream_response(events, id, created, model, include_usage, log)
    } else {
        collect_response(events, &id, created, &model, log).await
    }
}

async fn collect_response(
    mut events: mpsc::UnboundedReceiver<Event>,
    id: &str,
    created: u64,
    model: &str,
    log: Option<std::time::Instant>,
) -> Response {
    // Dropping `events` (this future dropped when the client goes) cancels the generation.
    let mut text = String::new();
    while let Some(ev) = events.recv().await {
        match ev {
            Event::Text(t) => text.push_str(&t),
            Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            } => {
                let usage = Usage::new(prompt_tokens, completion_tokens, cached_tokens);
                log_done(log, id, finish_reason, &usage);
                return Json(openai::completion(
                    id,
                    created,
                    model,
                    &text,
                    finish_reason,
                    usage,
                ))
                .into_response();
            }
            Event::Failed(msg) => return ApiError::internal(msg).into_response(),
        }
    }
    ApiError::internal("the model worker stopped").into_response()
}

fn stream_response(
    mut events: mpsc::UnboundedReceiver<Event>,
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    log: Option<std::time::Instant>,
) -> Response {
    // A relay task turns worker events into SSE events. When the client disconnects, the SSE
    // body is dropped, the relay's send fails, it returns and drops `events`: the worker sees
    // that and cancels.
    let (tx, rx) = mpsc::channel::<SseEvent>(16);
    tokio::spawn(async move {
        let data = |v: serde_json::Value| SseEvent::default().data(v.to_string());
        let first = openai::chunk(
            &id,
            created,
            &model,
            serde_json::json!({"role": "assistant", "content": ""}),
            None,
        );
        if tx.send(data(first)).await.is_err() {
            return;
        }
        while let Some(ev) = events.recv().await {
            let out = match ev {
                Event::Text(t) => vec![openai::chunk(
                    &id,
                    created,
                    &model,
                    serde_json::json!({ "content": t }),
                    None,
                )],
                Event::Done {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                } => {
                    let usage = Usage::new(prompt_tokens, completion_tokens, cached_tokens);
                    log_done(log, &id, finish_reason, &usage);
                    let mut v = vec![openai::chunk(
                        &id,
                        created,
                        &model,
                        serde_json::json!({}),
                        Some(finish_reason),
                    )];
                    if include_usage {
                        v.push(openai::usage_chunk(&id, created, &model, usage));
                    }
                    v
                }
                Event::Failed(msg) => vec![ApiError::internal(msg).body()],
            };
            for v in out {
                if tx.send(data(v)).await.is_err() {
                    return;
                }
            }
        }
        let _ = tx.send(SseEvent::default().data("[DONE]")).await;
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let stream = tokio_stream::StreamExt::map(stream, Ok::<_, std::convert::Infallible>);
    Sse::new(stream).into_response()
}

/// Checks the request and prepares its job: everything that can be refused is refused here,
/// before the request takes a place in the queue.
fn plan(st: &AppState, body: &[u8]) -> Result<Planned, ApiError> {
    let req: ChatRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("invalid request body: {e}")))?;
    if let Some(m) = &req.model {
        if m != &st.cfg.model_id {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!(
                    "the model `{m}` does not exist; this server serves `{}`",
                    st.cfg.model_id
                ),
            )
            .with_code("model_not_found"));
        }
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only n = 1 is supported"));
    }
    if req.tools.is_some() {
        return Err(ApiError::invalid("tools", "tool calls are not supported"));
    }
    if req.logprobs == Some(true) {
        return Err(ApiError::invalid("logprobs", "logprobs are not supported"));
    }
    for (name, v) in [
        ("presence_penalty", req.presence_penalty),
        ("frequency_penalty", req.frequency_penalty),
    ] {
        if v.is_some_and(|v| v != 0.0) {
            return Err(ApiError::invalid(name, format!("{name} is not supported")));
        }
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be between 0 and 2, got {temperature}"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stop.len() > 4 {
        return Err(ApiError::invalid("stop", "at most 4 stop sequences"));
    }

    let p = &st.pipeline;
    let processor = p
        .image_processor
        .with_num_crops_override(req.num_crops.map(|n| n as usize))
        .map_err(|e| ApiError::invalid("num_crops", e.to_string()))?;

    // Messages → template messages, images in order of appearance.
    if req.messages.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    let user_tagged = req.messages.iter().any(|m| {
        m.pieces()
            .iter()
            .any(|pc| matches!(pc, Piece::Text(t) if p.prompt.has_image_tags(t)))
    });
    let mut images: Vec<RgbImage> = Vec::new();
    let mut chat = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant") {
            return Err(ApiError::invalid(
                format!("messages[{i}].role"),
                format!(
                    "unknown role `{}` (expected system, user or assistant)",
                    m.role
                ),
            ));
        }
        let mut content = String::new();
        for pc in m.pieces() {
            match pc {
                Piece::Text(t) => content.push_str(t),
                Piece::Image(url) => {
                    if m.role != "user" {
                        return Err(ApiError::invalid(
                            format!("messages[{i}].content"),
                            "images are accepted in user messages only",
                        ));
                    }
                    let k = images.len() + 1;
                    // The pixel limit holds for the request's images together.
                    let used: u64 = images.iter().map(|im| (im.width * im.height) as u64).sum();
                    let budget = st.cfg.max_image_pixels.saturating_sub(used);
                    let what = format!("messages[{i}] image {k}");
                    images.push(load_image(st, url, &what, budget)?);
                    if !user_tagged {
                        content.push_str(&format!("<|image_{k}|>\n"));
                    }
                }
            }
        }
        chat.push(ChatMessage::new(m.role.clone(), content));
    }
    let prompt = p
        .prompt
        .apply_chat_template(&chat, true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let prepared = p
        .prepare(&images, &prompt, &processor, &Trace::new(false))
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;

    // The context bounds the prompt and the answer together.
    let limit = p.model.decoder.cfg.max_position_embeddings;
    let seq = prepared.input_ids.len();
    if seq >= limit {
        return Err(ApiError::invalid(
            "messages",
            format!("the prompt has {seq} tokens but the model's context is {limit} tokens"),
        )
        .with_code("context_length_exceeded"));
    }
    let max_new = match req.max_completion_tokens.or(req.max_tokens) {
        Some(0) => return Err(ApiError::invalid("max_tokens", "max_tokens must be at least 1")),
        Some(n) if n as u128 + seq as u128 > limit as u128 => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "the prompt ({seq} tokens) plus max_tokens ({n}) exceeds the model's context of {limit} tokens"
                ),
            )
            .with_code("context_length_exceeded"))
        }
        Some(n) => n as usize,
        None => st.cfg.default_max_tokens.min(limit - seq),
    };
    let seed = match req.seed {
        Some(s) => s as u64,
        None => now() ^ st.next_id.fetch_add(1, Ordering::Relaxed).rotate_left(32),
    };
    let (tx, rx) = mpsc::unbounded_channel();
    Ok(Planned {
        job: Job {
            prepared,
            opts: GenerateOptions {
                max_new_tokens: max_new,
                sampling: SamplingParams {
                    temperature: temperature as f32,
                    top_p: top_p as f32,
                    top_k: req.top_k.unwrap_or(0) as usize,
                    seed,
                },
                ignore_stop: false,
            },
            stop,
            events: tx,
        },
        events: rx,
        stream: req.stream.unwrap_or(false),
        include_usage: req.stream_options.is_some_and(|o| o.include_usage),
    })
}

/// An `image_url`: a base64 data URL, or with `--allow-local-files` a local path. Remote URLs
/// are never fetched.
fn load_image(st: &AppState, url: &str, what: &str, max_pixels: u64) -> Result<RgbImage, ApiError> {
    let bad = |msg: String| ApiError::invalid("messages", format!("{what}: {msg}"));
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| bad("a data URL needs a comma before its data".into()))?;
        if !meta.ends_with(";base64") {
            return Err(bad("only base64 data URLs are accepted".into()));
        }
        // Some clients wrap base64 in lines.
        let clean: Vec<u8> = data.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&clean)
            .map_err(|e| bad(format!("invalid base64 ({e})")))?;
        return decode_image_bytes_limited(&bytes, what, max_pixels)
            .map_err(|e| ApiError::invalid("messages", e.to_string()));
    }
    if url.starts_with("http://") || url.starts_with("https://") {
        return Err(bad(
            "remote image URLs are not fetched; send the image as a base64 data URL".into(),
        ));
    }
    let path = PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
    if !st.cfg.allow_local_files {
        return Err(bad(
            "local file paths are accepted only when the server runs with --allow-local-files"
                .into(),
        ));
    }
    if !path.is_absolute() {
        return Err(bad(format!(
            "local image paths must be absolute, got {}",
            path.display()
        )));
    }
    let bytes = std::fs::read(&path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    decode_image_bytes_limited(&bytes, &path.display().to_string(), max_pixels)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))
}
