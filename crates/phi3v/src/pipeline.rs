//! The whole path from images and a prompt to tokens:
//!
//! ```text
//! images ─ HD transform, crops ─▶ pixel_values [n, num_crops+1, 3, 336, 336]
//!        ─ CLIP (real crops only) ─▶ [N, 577, c] ─ drop CLS ─▶ [N, 576, c] ─ 2×2 merge ─▶ [N, 144, 4c]
//!        ─ grid + sub_GN / glb_GN ─▶ [T, 4c] ─ img_projection ─▶ image_embeds [T, hidden]
//! prompt ─ chunked tokenisation ─▶ input_ids [seq] (image k as -k placeholders)
//!        ─ embed_tokens, image rows scattered ─▶ inputs_embeds [seq, hidden]
//!        ─ decoder prefill ─▶ logits ─ sample / decode steps ─▶ tokens
//! ```

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use phi_decoder::{Logits, RopeFactors};
use phi_kernels::cpu::embedding::scatter_rows;
use phi_kernels::{DType, Residency};

use crate::feature_cache::FeatureCache;
use crate::gpu::{DeviceKind, GpuCache, GpuModel};
use crate::processor::{ImageProcessor, ProcessedImage, PromptProcessor, RgbImage, TextStreamer};
use crate::sampling::{Sampler, SamplingParams};
use crate::trace::Trace;
use crate::{Error, Phi3V, Result};

/// Ids that end generation whatever the config says: `<|end|>`, `<|endoftext|>`, `</s>`.
pub const DEFAULT_STOP_IDS: [u32; 3] = [32007, 32000, 2];

/// A loaded model with its processors.
pub struct Pipeline {
    pub model: Phi3V,
    pub image_processor: ImageProcessor,
    pub prompt: PromptProcessor,
    pub stop_ids: Vec<u32>,
    /// The model's copy on a GPU, when running there (`use_device`).
    pub gpu: Option<GpuModel>,
    /// Progress bars on stderr (when it is a terminal) for long prefills.
    pub show_progress: bool,
}

/// Prefills of at least this many tokens get a progress bar.
const PROGRESS_MIN_TOKENS: usize = 256;

/// The decoder's KV cache on the device that runs it.
enum Cache {
    Cpu(phi_decoder::KvCache),
    Gpu(GpuCache),
}

/// Tokenised prompt and preprocessed images, ready for the model.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub input_ids: Vec<i64>,
    pub images: Vec<ProcessedImage>,
}

impl Prepared {
    pub fn image_token_count(&self) -> usize {
        self.images.iter().map(|i| i.num_img_tokens).sum()
    }
}

/// What a generation produced, with timings.
#[derive(Debug, Clone)]
pub struct Generation {
    pub ids: Vec<u32>,
    pub text: String,
    pub prompt_len: usize,
    /// Logits at the last prompt position (from the prefill).
    pub prompt_logits: Vec<f32>,
    pub image_embeds: Vec<f32>,
    pub inputs_embeds: Vec<f32>,
    pub stopped_on: Option<u32>,
    /// The RoPE factor set of every decoder forward call (prefill first).
    pub rope_factors: Vec<RopeFactors>,
    pub encode_time: Duration,
    pub prefill_time: Duration,
    pub decode_time: Duration,
}

/// Options of one generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Produce exactly `max_new_tokens` (ignore stop ids): for comparable dumps.
    pub ignore_stop: bool,
}

impl Pipeline {
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, DType::F32)
    }

    /// [`Pipeline::load`] with the Linear layers' products in `precision` (f32 or bf16).
    pub fn load_with(dir: &Path, precision: DType) -> Result<Self> {
        Self::load_held(dir, precision, Residency::Mapped)
    }

    /// [`Pipeline::load_with`], the weights held as `residency` says (see [`Residency`]).
    pub fn load_held(dir: &Path, precision: DType, residency: Residency) -> Result<Self> {
        let model = Phi3V::load_held(dir, precision, residency)?;
        let image_processor =
            ImageProcessor::from_preprocessor_config(&dir.join("preprocessor_config.json"))?;
        let prompt = PromptProcessor::from_dir(dir)?;
        let mut stop_ids = DEFAULT_STOP_IDS.to_vec();
        for id in model.decoder.cfg.eos_token_ids() {
            if !stop_ids.contains(&id) {
                stop_ids.push(id);
            }
        }
        Ok(Pipeline {
            model,
            image_processor,
            prompt,
            stop_ids,
            gpu: None,
            show_progress: false,
        })
    }

    /// Runs the model on `device` from now on: for CUDA, opens GPU 0 and uploads the weights
    /// (bf16 activations and products there, whatever the load precision).
    pub fn use_device(&mut self, device: DeviceKind) -> Result<()> {
        self.gpu = match device {
            DeviceKind::Cpu => None,
            DeviceKind::Cuda => Some(GpuModel::upload(&self.model)?),
        };
        Ok(())
    }

    /// Where the model runs.
    pub fn device(&self) -> DeviceKind {
        if self.gpu.is_some() {
            DeviceKind::Cuda
        } else {
            DeviceKind::Cpu
        }
    }

    /// The real crops of every image (global view first), `[N, 3, 336, 336]`, and `N`.
    fn real_crops(images: &[&ProcessedImage]) -> (Vec<f32>, usize) {
        let per_crop = 3 * 336 * 336;
        let n: usize = images.iter().map(|p| 1 + p.h_c * p.w_c).sum();
        let mut crops = Vec::with_capacity(n * per_crop);
        for p in images {
            // Padded zero crops are never computed (their features are never used).
            crops.extend_from_slice(&p.pixel_values[..(1 + p.h_c * p.w_c) * per_crop]);
        }
        (crops, n)
    }

    /// The text given to the tokenizer. With `chat`, `user_text` becomes one user turn of the
    /// chat template, with `<|image_k|>\n` tags prepended for the images unless it has tags.
    pub fn build_prompt(&self, user_text: &str, n_images: usize, chat: bool) -> Result<String> {
        if !chat {
            return Ok(user_text.to_string());
        }
        let content = if self.prompt.has_image_tags(user_text) || n_images == 0 {
            user_text.to_string()
        } else {
            let tags: String = (1..=n_images).map(|k| format!("<|image_{k}|>\n")).collect();
            format!("{tags}{user_text}")
        };
        let messages = [crate::processor::ChatMessage {
            role: "user".into(),
            content,
        }];
        Ok(self.prompt.apply_chat_template(&messages, true)?)
    }

    /// Preprocesses the images and tokenises the prompt (placeholders sized per image).
    pub fn prepare(
        &self,
        images: &[RgbImage],
        prompt: &str,
        processor: &ImageProcessor,
        trace: &Trace,
    ) -> Result<Prepared> {
        let mut processed = Vec::with_capacity(images.len());
        for (k, img) in images.iter().enumerate() {
            let p = trace.time(
                &format!("image {} preprocess", k + 1),
                |p: &Result<ProcessedImage>| match p {
                    Ok(p) => vec![p.num_crops + 1, 3, 336, 336],
                    Err(_) => vec![],
                },
                "",
                || processor.process(img).map_err(Error::from),
            )?;
            if trace.enabled() {
                eprintln!(
                    "[trace]   image {}: {}x{} -> HD {}x{} = {}x{} crops of 336, {} padded zero crops, {} tokens",
                    k + 1,
                    img.width,
                    img.height,
                    p.image_size[1],
                    p.image_size[0],
                    p.h_c,
                    p.w_c,
                    p.num_crops - p.h_c * p.w_c,
                    p.num_img_tokens
                );
            }
            processed.push(p);
        }
        let counts: Vec<usize> = processed.iter().map(|p| p.num_img_tokens).collect();
        let input_ids = trace.time(
            "tokenize",
            |ids: &Result<Vec<i64>>| vec![ids.as_ref().map_or(0, |v| v.len())],
            "",
            || self.prompt.encode(prompt, &counts).map_err(Error::from),
        )?;
        Ok(Prepared {
            input_ids,
            images: processed,
        })
    }

    /// CLIP on the real crops of every image (global view first), in one batch:
    /// `[N, 577, c]` with `N = Σ (1 + h_c·w_c)`.
    pub fn clip_hidden(
        &self,
        images: &[&ProcessedImage],
        trace: &Trace,
    ) -> Result<(Vec<f32>, usize)> {
        let (crops, n) = Self::real_crops(images);
        let (t, c) = self.model.clip.output_dims();
        let start = Instant::now();
        let hidden = match &self.gpu {
            Some(g) => g.clip_hidden(&crops, n)?,
            None => self.model.clip.forward(&crops, n)?,
        };
        trace.stage(
            "CLIP layer output",
            &[n, t, c],
            start.elapsed(),
            &format!(
                "crops [{n},3,336,336] through {} layers",
                self.model.clip.layers.len()
            ),
        );
        Ok((hidden, n))
    }

    /// Image features in sequence order, projected: `[T, hidden]`.
    pub fn image_embeds(&self, images: &[&ProcessedImage], trace: &Trace) -> Result<Vec<f32>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(g) = &self.gpu {
            // CLIP, merge, separators and projector on the device; only the result comes back.
            let (crops, n) = Self::real_crops(images);
            let grids: Vec<(usize, usize)> = images.iter().map(|p| (p.h_c, p.w_c)).collect();
            let hidden_size = self.model.decoder.hidden_size();
            return trace.time(
                "image features (GPU)",
                |v: &Result<Vec<f32>>| {
                    vec![v.as_ref().map_or(0, |v| v.len() / hidden_size), hidden_size]
                },
                &format!("{n} crops through CLIP, merge with separators, projector"),
                || g.image_embeds(&crops, n, &grids),
            );
        }
        let (hidden, n) = self.clip_hidden(images, trace)?;
        let (t, c) = self.model.clip.output_dims();
        trace.stage("patches (CLS dropped)", &[n, t - 1, c], Duration::ZERO, "");
        trace.stage(
            "2x2 merge",
            &[n, (t - 1) / 4, 4 * c],
            Duration::ZERO,
            "each 2x2 block of patches -> one token (gathered by the projector's packing)",
        );

        let grids: Vec<(usize, usize)> = images.iter().map(|p| (p.h_c, p.w_c)).collect();
        let total: usize = grids
            .iter()
            .map(|&(h, w)| phi_projector::num_image_tokens(h, w))
            .sum();
        trace.stage(
            "grid with separators",
            &[total, 4 * c],
            Duration::ZERO,
            "rows + sub_GN, glb_GN, global 12x(12+1); gathered inside the projector's packing",
        );
        let hidden_size = self.model.decoder.hidden_size();
        let out = trace.time(
            "projector",
            |_: &Result<Vec<f32>>| vec![total, hidden_size],
            "Linear, GELU, Linear",
            || Ok(self.model.projector.project_images(&hidden, &grids)?),
        )?;
        Ok(out)
    }

    /// `embed_tokens(clamp(ids))` with the rows of negative ids replaced, in order, by
    /// `image_embeds`: `[seq, hidden]`.
    pub fn inputs_embeds(&self, input_ids: &[i64], image_embeds: &[f32]) -> Result<Vec<f32>> {
        let h = self.model.decoder.hidden_size();
        let mut embeds = self.model.decoder.embed(input_ids)?;
        let rows: Vec<usize> = input_ids
            .iter()
            .enumerate()
            .filter(|(_, &id)| id < 0)
            .map(|(i, _)| i)
            .collect();
        if rows.len() * h != image_embeds.len() {
            return Err(Error::Input(format!(
                "prompt has {} image placeholder tokens but the images give {} features",
                rows.len(),
                image_embeds.len() / h.max(1)
            )));
        }
        scatter_rows(&mut embeds, &rows, image_embeds, h);
        Ok(embeds)
    }

    /// Per-image projected features `[num_img_tokens, hidden]`, from `cache` where it has
    /// them; the others go through CLIP and the projector in one batch and are stored there.
    pub fn image_features(
        &self,
        images: &[&ProcessedImage],
        cache: Option<&FeatureCache>,
        trace: &Trace,
    ) -> Result<Vec<Arc<Vec<f32>>>> {
        let mut out: Vec<Option<Arc<Vec<f32>>>> = images
            .iter()
            .map(|p| cache.and_then(|c| c.get(&p.key)))
            .collect();
        let missing: Vec<&ProcessedImage> = images
            .iter()
            .zip(&out)
            .filter(|(_, f)| f.is_none())
            .map(|(p, _)| *p)
            .collect();
        if !missing.is_empty() {
            let all = self.image_embeds(&missing, trace)?;
            let h = self.model.decoder.hidden_size();
            let mut rows = all.chunks_exact(h);
            let mut fresh = missing.iter();
            for slot in out.iter_mut().filter(|f| f.is_none()) {
                let p = fresh.next().expect("one fresh image per empty slot");
                let feats: Vec<f32> = rows
                    .by_ref()
                    .take(p.num_img_tokens)
                    .flatten()
                    .copied()
                    .collect();
                let feats = Arc::new(feats);
                if let Some(c) = cache {
                    c.insert(p.key, feats.clone());
                }
                *slot = Some(feats);
            }
        } else if trace.enabled() && !images.is_empty() {
            eprintln!(
                "[trace]   image features: all {} from the cache",
                images.len()
            );
        }
        Ok(out.into_iter().map(|f| f.expect("filled")).collect())
    }

    /// A conversation on the model with room for `capacity` positions.
    pub fn new_session(&self, capacity: usize) -> Result<Session> {
        let limit = self.model.decoder.cfg.max_position_embeddings;
        if capacity > limit {
            return Err(Error::Input(format!(
                "a context of {capacity} positions exceeds the model's {limit} (max_position_embeddings)"
            )));
        }
        let cache = match &self.gpu {
            Some(g) => Cache::Gpu(g.new_cache(capacity)?),
            None => Cache::Cpu(self.model.decoder.new_cache(capacity)?),
        };
        Ok(Session {
            cache,
            ids: Vec::new(),
            factors: Vec::new(),
            image_keys: Vec::new(),
        })
    }

    /// Brings `session` to the whole of `prepared`: the longest prefix it already holds (same
    /// ids, same images behind the placeholders) is kept, the rest is run through the decoder.
    /// Returns the logits at the last prompt position.
    pub fn feed(
        &self,
        session: &mut Session,
        prepared: &Prepared,
        features: Option<&FeatureCache>,
        trace: &Trace,
    ) -> Result<Fed> {
        let ids = &prepared.input_ids;
        let seq = ids.len();
        if seq == 0 {
            return Err(Error::Input("the prompt is empty".into()));
        }
        if seq > session.capacity() {
            return Err(Error::Input(format!(
                "the prompt has {seq} tokens but the context holds {} positions",
                session.capacity()
            )));
        }
        let keys: Vec<[u8; 32]> = prepared.images.iter().map(|p| p.key).collect();
        // The last prompt position always runs: its logits choose the first new token.
        let keep = self.reusable(session, prepared).min(seq - 1);
        session.truncate(keep);
        if trace.enabled() && keep > 0 {
            eprintln!("[trace]   reusing {keep} cached prompt positions");
        }

        let start = Instant::now();
        // Image rows of the placeholders still to run, in order: (image, row within it).
        let mut next_row = vec![0usize; prepared.images.len()];
        let mut wanted = Vec::new();
        for (i, &id) in ids.iter().enumerate() {
            if id < 0 {
                let k = (-id - 1) as usize;
                if k >= next_row.len() {
                    return Err(Error::Input(format!(
                        "prompt has a placeholder for image {} but {} images were given",
                        k + 1,
                        next_row.len()
                    )));
                }
                if i >= keep {
                    wanted.push((k, next_row[k]));
                }
                next_row[k] += 1;
            }
        }
        let needed: Vec<bool> = (0..prepared.images.len())
            .map(|k| wanted.iter().any(|w| w.0 == k))
            .collect();
        let feats = self.image_features_where(&prepared.images, &needed, features, trace)?;
        let h = self.model.decoder.hidden_size();
        let mut image_embeds = Vec::with_capacity(wanted.len() * h);
        for &(k, r) in &wanted {
            let f = feats[k].as_ref().expect("features of a needed image");
            let row = f.get(r * h..(r + 1) * h).ok_or_else(|| {
                Error::Input(format!(
                    "image {} has {} features but the prompt has more placeholders for it",
                    k + 1,
                    f.len() / h
                ))
            })?;
            image_embeds.extend_from_slice(row);
        }
        let inputs_embeds = self.inputs_embeds(&ids[keep..], &image_embeds)?;
        trace.stage(
            "scattered into inputs_embeds",
            &[seq - keep, h],
            Duration::ZERO,
            &format!("{} image rows", wanted.len()),
        );
        let encode_time = start.elapsed();

        let start = Instant::now();
        let (logits, factors) = match &mut session.cache {
            Cache::Gpu(c) => self
                .gpu
                .as_ref()
                .expect("a GPU cache comes from a GPU model")
                .prefill(&inputs_embeds, c)?,
            Cache::Cpu(c) => {
                let bar = (self.show_progress && seq - keep >= PROGRESS_MIN_TOKENS).then(|| {
                    indicatif::ProgressBar::new(self.model.decoder.layers.len() as u64)
                        .with_message(format!("prefill {} tokens", seq - keep))
                        .with_style(
                            indicatif::ProgressStyle::with_template(
                                "{msg} [{bar:30}] layer {pos}/{len} {elapsed}",
                            )
                            .expect("a valid template"),
                        )
                });
                let out = self.model.decoder.forward_with_progress(
                    &inputs_embeds,
                    c,
                    Logits::Last,
                    &mut |done, _| {
                        if let Some(b) = &bar {
                            b.set_position(done as u64)
                        }
                    },
                )?;
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                out
            }
        };
        let prefill_time = start.elapsed();
        session.ids = ids.clone();
        session.factors.resize(seq, factors);
        session.image_keys = keys;
        trace.stage(
            "decoder prefill",
            &[seq - keep, self.model.decoder.vocab_size()],
            prefill_time,
            &format!(
                "{} layers, rope {}",
                self.model.decoder.layers.len(),
                factors_name(factors)
            ),
        );
        Ok(Fed {
            logits,
            factors,
            reused: keep,
            image_embeds,
            inputs_embeds,
            encode_time,
            prefill_time,
        })
    }

    /// Makes room for `capacity` positions in `session`, keeping what it holds. On the CPU the
    /// cache is copied into a larger one; a GPU session cannot grow (`false`).
    pub fn grow(&self, session: &mut Session, capacity: usize) -> Result<bool> {
        if capacity <= session.capacity() {
            return Ok(true);
        }
        match &mut session.cache {
            Cache::Cpu(c) => {
                c.grow(&self.model.decoder.cfg, capacity)?;
                Ok(true)
            }
            Cache::Gpu(_) => Ok(false),
        }
    }

    /// How many leading positions of `prepared` `session` already holds as a fresh run would
    /// make them: the same ids, the same image behind each placeholder, and the same RoPE
    /// factor set (cached keys carry the set of the call that made them, while a fresh run of
    /// this prompt uses one set for every position).
    pub fn reusable(&self, session: &Session, prepared: &Prepared) -> usize {
        let ids = &prepared.input_ids;
        if ids.is_empty() {
            return 0;
        }
        let factors = self.model.decoder.rotary_emb.factors_for(ids.len() - 1);
        let same_image = |id: i64| {
            let k = (-id - 1) as usize;
            let held = session.image_keys.get(k);
            held.is_some() && held == prepared.images.get(k).map(|p| &p.key)
        };
        session
            .ids
            .iter()
            .zip(ids)
            .zip(&session.factors)
            .take_while(|((a, b), f)| a == b && **f == factors && (**b >= 0 || same_image(**b)))
            .count()
    }

    /// [`Self::image_features`] of the images flagged in `needed` (`None` for the others).
    fn image_features_where(
        &self,
        images: &[ProcessedImage],
        needed: &[bool],
        cache: Option<&FeatureCache>,
        trace: &Trace,
    ) -> Result<Vec<Option<Arc<Vec<f32>>>>> {
        let subset: Vec<&ProcessedImage> = images
            .iter()
            .zip(needed)
            .filter(|(_, n)| **n)
            .map(|(p, _)| p)
            .collect();
        let mut feats = self.image_features(&subset, cache, trace)?.into_iter();
        Ok(needed
            .iter()
            .map(|n| if *n { feats.next() } else { None })
            .collect())
    }

    /// One token through the decoder at the end of `session`. On the GPU with `greedy`, the
    /// next token is chosen there and only it comes back (`Step::chosen`).
    pub fn step(&self, session: &mut Session, token: u32, greedy: bool) -> Result<Step> {
        session.check_room()?;
        let step = match &mut session.cache {
            Cache::Gpu(c) => {
                let g = self
                    .gpu
                    .as_ref()
                    .expect("a GPU cache comes from a GPU model");
                if greedy {
                    let (t, f) = g.step_greedy(token, c)?;
                    Step {
                        logits: Vec::new(),
                        chosen: Some(t),
                        factors: f,
                    }
                } else {
                    let (l, f) = g.step(token, c)?;
                    Step {
                        logits: l,
                        chosen: None,
                        factors: f,
                    }
                }
            }
            Cache::Cpu(c) => {
                let decoder = &self.model.decoder;
                let embed = decoder.embed(&[token as i64])?;
                let (l, f) = on_pool(|| decoder.forward(&embed, c, Logits::Last))?;
                Step {
                    logits: l,
                    chosen: None,
                    factors: f,
                }
            }
        };
        session.ids.push(token as i64);
        session.factors.push(step.factors);
        Ok(step)
    }

    /// One decoder step for each of several sessions (`tokens[r]` at the end of
    /// `sessions[r]`). On the CPU they run as one batched step that reads every weight once;
    /// elsewhere one after the other. Each result equals [`Self::step`] of its session alone.
    pub fn step_batch(&self, sessions: &mut [&mut Session], tokens: &[u32]) -> Result<Vec<Step>> {
        assert_eq!(sessions.len(), tokens.len(), "one token per session");
        let all_cpu = sessions.iter().all(|s| matches!(s.cache, Cache::Cpu(_)));
        if sessions.len() < 2 || !all_cpu {
            return sessions
                .iter_mut()
                .zip(tokens)
                .map(|(s, &t)| self.step(s, t, false))
                .collect();
        }
        for s in sessions.iter() {
            s.check_room()?;
        }
        let decoder = &self.model.decoder;
        let ids: Vec<i64> = tokens.iter().map(|&t| t as i64).collect();
        let embeds = decoder.embed(&ids)?;
        let mut caches: Vec<&mut phi_decoder::KvCache> = sessions
            .iter_mut()
            .map(|s| match &mut s.cache {
                Cache::Cpu(c) => c,
                Cache::Gpu(_) => unreachable!("checked: all sessions are on the CPU"),
            })
            .collect();
        let (logits, factors) = on_pool(|| decoder.forward_batch(&embeds, &mut caches))?;
        let v = decoder.vocab_size();
        let mut out = Vec::with_capacity(tokens.len());
        for (r, s) in sessions.iter_mut().enumerate() {
            s.ids.push(tokens[r] as i64);
            s.factors.push(factors[r]);
            out.push(Step {
                logits: logits[r * v..(r + 1) * v].to_vec(),
                chosen: None,
                factors: factors[r],
            });
        }
        Ok(out)
    }

    /// Runs the model on a prepared prompt and generates, calling `on_text` with each new piece
    /// of decoded text.
    pub fn generate(
        &self,
        prepared: &Prepared,
        opts: &GenerateOptions,
        trace: &Trace,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        opts.sampling.validate().map_err(Error::Input)?;
        let limit = self.model.decoder.cfg.max_position_embeddings;
        let seq = prepared.input_ids.len();
        if seq >= limit {
            return Err(Error::Input(format!(
                "the prompt has {seq} tokens but the model has only {limit} positions (max_position_embeddings)"
            )));
        }
        let max_new = opts.max_new_tokens.min(limit - seq);
        if max_new < opts.max_new_tokens {
            eprintln!(
                "note: --max-new-tokens reduced to {max_new} to fit the model's {limit} positions"
            );
        }
        let mut session = self.new_session(seq + max_new)?;
        let fed = self.feed(&mut session, prepared, None, trace)?;
        let mut dec = Decoding::new(self, opts, max_new, &fed);
        let start = Instant::now();
        while let Some(piece) = dec.next(self, &mut session)? {
            if !piece.is_empty() {
                on_text(&piece);
            }
            if trace.enabled() && dec.rope_factors.len() >= 2 {
                let n = dec.rope_factors.len();
                if dec.rope_factors[n - 1] != dec.rope_factors[n - 2] {
                    eprintln!(
                        "[trace]   position {} crosses original_max_position_embeddings: rope {} from here",
                        session.len() - 1,
                        factors_name(dec.rope_factors[n - 1])
                    );
                }
            }
        }
        // The caller traces the decode stage once its streamed text line is closed.
        let decode_time = start.elapsed();
        let text = self.prompt.decode(&dec.ids, true)?;
        Ok(Generation {
            ids: dec.ids,
            text,
            prompt_len: seq,
            prompt_logits: fed.logits,
            image_embeds: fed.image_embeds,
            inputs_embeds: fed.inputs_embeds,
            stopped_on: dec.stopped_on,
            rope_factors: dec.rope_factors,
            encode_time: fed.encode_time,
            prefill_time: fed.prefill_time,
            decode_time,
        })
    }
}

/// A conversation's state on the model: the decoder's KV cache and the ids whose keys and
/// values it holds, so that a later prompt sharing a prefix only runs what is new.
pub struct Session {
    cache: Cache,
    ids: Vec<i64>,
    /// The RoPE factor set each held position was computed with.
    factors: Vec<RopeFactors>,
    /// Keys of the images whose placeholders `ids` holds (image k at index k-1).
    image_keys: Vec<[u8; 32]>,
}

impl Session {
    /// Positions held.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Positions the KV cache has room for.
    pub fn capacity(&self) -> usize {
        match &self.cache {
            Cache::Cpu(c) => c.capacity(),
            Cache::Gpu(c) => c.capacity(),
        }
    }

    /// Room for one more position (a decode step), else a clear error.
    fn check_room(&self) -> Result<()> {
        if self.len() >= self.capacity() {
            return Err(Error::Input(format!(
                "the context of {} positions is full",
                self.capacity()
            )));
        }
        Ok(())
    }

    /// The ids held, image placeholders as `-k`.
    pub fn ids(&self) -> &[i64] {
        &self.ids
    }

    fn truncate(&mut self, len: usize) {
        self.ids.truncate(len);
        self.factors.truncate(len);
        match &mut self.cache {
            Cache::Cpu(c) => c.truncate(len),
            Cache::Gpu(c) => c.truncate(len),
        }
    }
}

/// What [`Pipeline::feed`] ran.
#[derive(Debug, Clone)]
pub struct Fed {
    /// Logits at the last prompt position.
    pub logits: Vec<f32>,
    pub factors: RopeFactors,
    /// Prompt positions kept from the session.
    pub reused: usize,
    /// The image rows and input embeddings of the positions that ran.
    pub image_embeds: Vec<f32>,
    pub inputs_embeds: Vec<f32>,
    pub encode_time: Duration,
    pub prefill_time: Duration,
}

/// What one decoder step gives.
pub struct Step {
    pub logits: Vec<f32>,
    /// The next token when the device chose it (greedy on the GPU).
    pub chosen: Option<u32>,
    pub factors: RopeFactors,
}

/// What [`Decoding::choose`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Generation had already ended.
    Ended,
    /// The last piece of text: a stop token or the token limit was reached (no step needed).
    Last(String),
    /// `token` (whose text is `piece`) must go through the decoder.
    Step { token: u32, piece: String },
}

/// Token-by-token generation after a [`Pipeline::feed`]: choose, stream, stop, step.
pub struct Decoding<'a> {
    sampler: Sampler,
    streamer: TextStreamer<'a>,
    /// Tokens chosen so far (the stop token included).
    pub ids: Vec<u32>,
    pub stopped_on: Option<u32>,
    /// The RoPE factor set of every decoder call (prefill first).
    pub rope_factors: Vec<RopeFactors>,
    max_new: usize,
    ignore_stop: bool,
    stop_ids: Vec<u32>,
    greedy_on_gpu: bool,
    logits: Vec<f32>,
    chosen: Option<u32>,
    done: bool,
}

impl<'a> Decoding<'a> {
    /// Starts from the prompt logits of `fed`; at most `max_new` tokens.
    pub fn new(p: &'a Pipeline, opts: &GenerateOptions, max_new: usize, fed: &Fed) -> Self {
        Decoding {
            sampler: Sampler::new(opts.sampling.clone()),
            streamer: TextStreamer::new(&p.prompt),
            ids: Vec::new(),
            stopped_on: None,
            rope_factors: vec![fed.factors],
            max_new,
            ignore_stop: opts.ignore_stop,
            stop_ids: p.stop_ids.clone(),
            // Greedy decoding on the GPU picks each token there; the logits stay on the device.
            greedy_on_gpu: p.gpu.is_some() && opts.sampling.temperature == 0.0,
            logits: fed.logits.clone(),
            chosen: None,
            done: max_new == 0,
        }
    }

    /// Chooses the next token and runs it through the decoder: the new text (possibly empty,
    /// while a character's bytes are incomplete), or `None` once generation has ended.
    pub fn next(&mut self, p: &Pipeline, session: &mut Session) -> Result<Option<String>> {
        match self.choose()? {
            Choice::Ended => Ok(None),
            Choice::Last(piece) => Ok(Some(piece)),
            Choice::Step { token, piece } => {
                let step = p.step(session, token, self.greedy_on_gpu)?;
                self.accept(step);
                Ok(Some(piece))
            }
        }
    }

    /// The first half of [`Self::next`]: the next token and its text. For [`Choice::Step`] the
    /// caller runs the token through the decoder (alone or batched with other sequences) and
    /// hands the result to [`Self::accept`].
    pub fn choose(&mut self) -> Result<Choice> {
        if self.done {
            return Ok(Choice::Ended);
        }
        // A token the device already chose (greedy on the GPU), else the sampler's.
        let next = match self.chosen.take() {
            Some(t) => t,
            None => self.sampler.sample(&self.logits),
        };
        self.ids.push(next);
        if !self.ignore_stop && self.stop_ids.contains(&next) {
            self.stopped_on = Some(next);
            self.done = true;
            return Ok(Choice::Last(self.streamer.finish()?));
        }
        let mut piece = self.streamer.push(next)?;
        if self.ids.len() == self.max_new {
            self.done = true;
            piece.push_str(&self.streamer.finish()?);
            return Ok(Choice::Last(piece));
        }
        Ok(Choice::Step { token: next, piece })
    }

    /// The decoder's answer to the token of the last [`Choice::Step`].
    pub fn accept(&mut self, step: Step) {
        self.rope_factors.push(step.factors);
        self.chosen = step.chosen;
        if !step.logits.is_empty() {
            self.logits = step.logits;
        }
    }

    /// Whether the device chooses greedy tokens itself (the step must then be a GPU step).
    pub fn greedy_on_gpu(&self) -> bool {
        self.greedy_on_gpu
    }

    /// Whether generation has ended.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

fn factors_name(f: RopeFactors) -> &'static str {
    match f {
        RopeFactors::None => "plain",
        RopeFactors::Short => "short factors",
        RopeFactors::Long => "long factors",
    }
}

/// Runs `f` on a worker of the rayon pool (inline when already on one). A decoder step is about
/// 200 parallel loops; started from a worker, each shares its work at once, where from outside
/// the pool each is injected and the caller sleeps until it is done. On the dev VM (synthetic
/// full-size model, bf16, 2 threads, alternating e2e runs) decode took 309.7 / 305.8 / 312.7
/// ms/token against 323.6 / 330.5 / 312.4 without it; two sequences batched 318.1 / 315.1 /
/// 323.2 against 332.5 / 318.4 / 323.9 ms/step; four, within noise.
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}
