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
use std::time::{Duration, Instant};

use phi_decoder::{Logits, RopeFactors};
use phi_kernels::cpu::embedding::scatter_rows;
use phi_kernels::DType;

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
}

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
        let model = Phi3V::load_with(dir, precision)?;
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
    fn real_crops(images: &[ProcessedImage]) -> (Vec<f32>, usize) {
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
        images: &[ProcessedImage],
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
    pub fn image_embeds(&self, images: &[ProcessedImage], trace: &Trace) -> Result<Vec<f32>> {
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
            "each 2x2 block of patches -> one token",
        );

        let start = Instant::now();
        let mut feats = Vec::new();
        let mut crop0 = 0;
        for p in images {
            let crops = 1 + p.h_c * p.w_c;
            let clip = &hidden[crop0 * t * c..(crop0 + crops) * t * c];
            feats.extend(self.model.projector.image_features(clip, p.h_c, p.w_c)?);
            crop0 += crops;
        }
        let total = feats.len() / (4 * c);
        trace.stage(
            "grid with separators",
            &[total, 4 * c],
            start.elapsed(),
            "rows + sub_GN, glb_GN, global 12x(12+1)",
        );
        let hidden_size = self.model.decoder.hidden_size();
        let out = trace.time(
            "projector",
            |_: &Vec<f32>| vec![total, hidden_size],
            "Linear, GELU, Linear",
            || self.model.projector.project(&feats, total),
        );
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
        let decoder = &self.model.decoder;
        let limit = decoder.cfg.max_position_embeddings;
        let seq = prepared.input_ids.len();
        if seq == 0 {
            return Err(Error::Input("the prompt is empty".into()));
        }
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

        let start = Instant::now();
        let image_embeds = self.image_embeds(&prepared.images, trace)?;
        let inputs_embeds = self.inputs_embeds(&prepared.input_ids, &image_embeds)?;
        let h = decoder.hidden_size();
        trace.stage(
            "scattered into inputs_embeds",
            &[seq, h],
            Duration::ZERO,
            &format!("{} image rows", image_embeds.len() / h),
        );
        let encode_time = start.elapsed();

        let mut cache = match &self.gpu {
            Some(g) => Cache::Gpu(g.new_cache(seq + max_new)?),
            None => Cache::Cpu(decoder.new_cache(seq + max_new)?),
        };
        let start = Instant::now();
        let (prompt_logits, factors) = match &mut cache {
            Cache::Gpu(c) => self
                .gpu
                .as_ref()
                .expect("a GPU cache comes from a GPU model")
                .prefill(&inputs_embeds, c)?,
            Cache::Cpu(c) => decoder.forward(&inputs_embeds, c, Logits::Last)?,
        };
        let prefill_time = start.elapsed();
        trace.stage(
            "decoder prefill",
            &[seq, decoder.vocab_size()],
            prefill_time,
            &format!(
                "{} layers, rope {}",
                decoder.layers.len(),
                factors_name(factors)
            ),
        );

        let mut sampler = Sampler::new(opts.sampling.clone());
        let mut streamer = TextStreamer::new(&self.prompt);
        let mut ids = Vec::new();
        let mut stopped_on = None;
        let mut logits = prompt_logits.clone();
        let mut chosen: Option<u32> = None;
        // Greedy decoding on the GPU picks each token there; the logits stay on the device.
        let greedy_on_gpu = self.gpu.is_some() && opts.sampling.temperature == 0.0;
        let start = Instant::now();
        let mut rope_factors = vec![factors];
        while ids.len() < max_new {
            // A token the device already chose (greedy on the GPU), else the sampler's.
            let next = match chosen.take() {
                Some(t) => t,
                None => sampler.sample(&logits),
            };
            ids.push(next);
            if !opts.ignore_stop && self.stop_ids.contains(&next) {
                stopped_on = Some(next);
                break;
            }
            let piece = streamer.push(next)?;
            if !piece.is_empty() {
                on_text(&piece);
            }
            if ids.len() == max_new {
                break;
            }
            let (l, f, len) = match &mut cache {
                Cache::Gpu(c) => {
                    let g = self
                        .gpu
                        .as_ref()
                        .expect("a GPU cache comes from a GPU model");
                    if greedy_on_gpu {
                        let (t, f) = g.step_greedy(next, c)?;
                        chosen = Some(t);
                        (Vec::new(), f, c.len())
                    } else {
                        let (l, f) = g.step(next, c)?;
                        (l, f, c.len())
                    }
                }
                Cache::Cpu(c) => {
                    let embed = decoder.embed(&[next as i64])?;
                    let (l, f) = decoder.forward(&embed, c, Logits::Last)?;
                    (l, f, c.len())
                }
            };
            if Some(&f) != rope_factors.last() && trace.enabled() {
                eprintln!(
                    "[trace]   position {} crosses original_max_position_embeddings: rope {} from here",
                    len - 1,
                    factors_name(f)
                );
            }
            rope_factors.push(f);
            if !l.is_empty() {
                logits = l;
            }
        }
        let rest = streamer.finish()?;
        if !rest.is_empty() {
            on_text(&rest);
        }
        // The caller traces the decode stage once its streamed text line is closed.
        let decode_time = start.elapsed();
        let text = self.prompt.decode(&ids, true)?;
        Ok(Generation {
            ids,
            text,
            prompt_len: seq,
            prompt_logits,
            image_embeds,
            inputs_embeds,
            stopped_on,
            rope_factors,
            encode_time,
            prefill_time,
            decode_time,
        })
    }
}

fn factors_name(f: RopeFactors) -> &'static str {
    match f {
        RopeFactors::None => "plain",
        RopeFactors::Short => "short factors",
        RopeFactors::Long => "long factors",
    }
}
