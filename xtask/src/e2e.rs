//! `cargo xtask bench --e2e --model DIR`: the whole pipeline on one image, stage by stage:
//! preprocessing, CLIP per crop, merge + projector, prefill tokens/s, decode tokens/s, and the
//! process's peak resident memory. Use `cargo xtask synth` for a full-size model.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use phi3v::processor::decode_image;
use phi3v::sampling::argmax;
use phi3v::trace::Trace;
use phi3v::{Pipeline, Residency};

/// Peak resident set size of this process (`VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    crate::serve_load::proc_status_bytes("self", "VmHWM:")
}

/// Resident set size of this process now (`VmRSS`), in bytes.
fn current_rss() -> Option<u64> {
    crate::serve_load::proc_status_bytes("self", "VmRSS:")
}

pub struct Opts<'a> {
    pub model: &'a Path,
    pub image: &'a Path,
    pub num_crops: Option<usize>,
    pub new_tokens: usize,
    pub precision: phi_kernels::DType,
    /// Where the model runs (`--device`).
    pub device: phi3v::gpu::DeviceKind,
    /// Also time transformers' CLIPVisionModel (one crop, f32 and bf16) and Phi3ForCausalLM
    /// (bf16: prefill of the same prompt length, decode steps) in the same run.
    pub compare_torch: bool,
    /// Keep the weights memory-mapped instead of reading them into memory (on the GPU they
    /// always are: the upload reads the mapping).
    pub mmap: bool,
}

/// Our figures that the torch comparison needs.
struct Ours {
    clip_ms_per_crop: f64,
    prompt_len: usize,
    prefill_s: f64,
    decode_ms_per_token: f64,
}

pub fn run(o: Opts) -> Result<()> {
    let start = Instant::now();
    let gpu = o.device == phi3v::gpu::DeviceKind::Cuda;
    let residency = if o.mmap || gpu {
        Residency::Mapped
    } else {
        Residency::Resident
    };
    let mut pipeline = Pipeline::load_held(o.model, o.precision, residency)
        .with_context(|| format!("loading {}", o.model.display()))?;
    pipeline.use_device(o.device).context("--device")?;
    let load = start.elapsed();
    let processor = pipeline
        .image_processor
        .with_num_crops_override(o.num_crops)?;
    let image = decode_image(o.image).with_context(|| o.image.display().to_string())?;
    let prompt = pipeline.build_prompt("Describe the image in detail.", 1, true)?;
    let trace = Trace::recording();
    let prepared = pipeline.prepare(&[image], &prompt, &processor, &trace)?;
    // What `generate` does, step by step, so that each decode step can be timed on its own
    // and, on the CPU, paired with DRAM probes taken right before and after it (outside the
    // timed steps): a neighbour on a shared machine moves the bandwidth within seconds, and
    // probes minutes away from the steps they judge once put decode at "0.84x its floor".
    let prompt_len = prepared.input_ids.len();
    let mut session = pipeline.new_session(prompt_len + o.new_tokens)?;
    let fed = pipeline.feed(&mut session, &prepared, None, &trace)?;
    // The model's own peak so far; the probe buffer below is not the model's.
    let peak_before_probe = peak_rss();
    let probe = (!gpu).then(crate::bench::DramProbe::new);
    let threads = rayon::current_num_threads();
    let probe_now = || probe.as_ref().map(|p| p.gbps(threads, 1));
    let mut probes = vec![probe_now()];
    let mut step_times = Vec::with_capacity(o.new_tokens);
    let mut rss_during = 0u64;
    let mut token = argmax(&fed.logits) as u32;
    for _ in 1..o.new_tokens {
        let t = Instant::now();
        let step = pipeline.step(&mut session, token, true)?;
        token = step.chosen.unwrap_or_else(|| argmax(&step.logits) as u32);
        step_times.push(t.elapsed().as_secs_f64());
        rss_during = rss_during.max(current_rss().unwrap_or(0));
        probes.push(probe_now());
    }
    let stages = trace.stages();
    let ms = |name: &str| {
        stages
            .iter()
            .filter(|s| s.name.starts_with(name))
            .map(|s| s.took.as_secs_f64() * 1e3)
            .sum::<f64>()
    };
    let crops = prepared.images[0].h_c * prepared.images[0].w_c + 1;
    // The decode floor: the bytes one step streams (the weights, and the KV cache of the
    // positions it attends to) over the read bandwidth.
    let decoder = &pipeline.model.decoder;
    // On the GPU the weights and the cache are bf16 whatever the load precision.
    let (weight_bytes, kv_per_pos) = if gpu {
        (
            decoder.decode_weight_bytes() as f64 / decoder.lm_head.weight.dtype().size() as f64
                * 2.0,
            2 * 2 * decoder.cfg.hidden_size * decoder.layers.len(),
        )
    } else {
        (
            decoder.decode_weight_bytes() as f64,
            decoder.new_cache(1)?.bytes_per_position(),
        )
    };
    // Step i feeds position prompt_len + i and attends to every position up to it.
    let step_bytes = |i: usize| weight_bytes + (kv_per_pos * (prompt_len + i + 1)) as f64;
    let steps = step_times.len().max(1);
    let decode: f64 = step_times.iter().sum();
    let per_token = decode * 1e3 / steps as f64;
    let mean_bytes = (0..steps).map(step_bytes).sum::<f64>() / steps as f64;
    let probes: Vec<f64> = probes.into_iter().flatten().collect();
    let (dram, probe_name) = if gpu {
        (
            gpu_copy_gbps()?,
            "device-to-device copy (read + write)".to_string(),
        )
    } else {
        (
            probes.iter().copied().fold(0.0, f64::max),
            format!(
                "DRAM read, the best of {} {threads}-thread probes between the steps",
                probes.len()
            ),
        )
    };
    let floor_ms = mean_bytes / (dram * 1e9) * 1e3;
    println!(
        "model {} | image {} | {} crops | prompt {} tokens | {} new tokens | {} threads | products {:?} | device {:?}",
        o.model.display(),
        o.image.display(),
        crops,
        prompt_len,
        o.new_tokens,
        threads,
        if gpu { phi_kernels::DType::BF16 } else { o.precision },
        o.device
    );
    println!("| stage | time | rate |");
    println!("|---|---:|---:|");
    println!(
        "| load ({} weights, tokenizer) | {:.1} ms | |",
        match residency {
            Residency::Mapped => "map",
            Residency::Resident => "read",
        },
        load.as_secs_f64() * 1e3
    );
    println!(
        "| preprocess (HD transform, crops) | {:.1} ms | |",
        ms("image 1 preprocess")
    );
    // On the GPU, CLIP, merge and projector are one timed stage.
    let clip = if gpu {
        ms("image features (GPU)")
    } else {
        ms("CLIP layer output")
    };
    println!(
        "| CLIP | {clip:.1} ms | {:.1} ms/crop |",
        clip / crops as f64
    );
    println!(
        "| merge + separators + projector | {:.1} ms | |",
        ms("grid with separators") + ms("projector")
    );
    let prefill = fed.prefill_time.as_secs_f64();
    println!(
        "| prefill | {:.1} ms | {:.1} tokens/s |",
        prefill * 1e3,
        prompt_len as f64 / prefill
    );
    println!(
        "| decode | {:.1} ms | {:.2} tokens/s ({per_token:.1} ms/token) |",
        decode * 1e3,
        steps as f64 / decode,
    );
    println!(
        "| decode floor: ({:.2} GB weights + {:.2} GB KV cache) per token / {dram:.1} GB/s {probe_name} | {floor_ms:.1} ms/token | ours {:.2}x the floor |",
        weight_bytes / 1e9,
        (mean_bytes - weight_bytes) / 1e9,
        per_token / floor_ms
    );
    if probes.len() == steps + 1 {
        // Each step against the better of the probes just before and just after it.
        let mut ratios: Vec<f64> = step_times
            .iter()
            .enumerate()
            .map(|(i, t)| t / (step_bytes(i) / (probes[i].max(probes[i + 1]) * 1e9)))
            .collect();
        ratios.sort_by(f64::total_cmp);
        println!(
            "| decode floor, step by step: each step against the probes on either side of it ({:.1}-{:.1} GB/s) | | ours {:.2}x its floor (median of {steps}; {:.2}-{:.2}x) |",
            probes.iter().copied().fold(f64::MAX, f64::min),
            dram,
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
    drop(probe);
    // From here the high-water mark is the model's again: restart it at the current resident
    // set (`clear_refs` 5, Linux 4.0 on), so it covers the batched steps below.
    let hwm_reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    if !gpu {
        batched_decode(&pipeline, steps.min(8), per_token)?;
    }
    // The model's peak: the high-water mark before the probe buffer was mapped, the resident
    // set during the steps less that buffer, and the high-water mark since it was unmapped.
    let probe_bytes = if gpu {
        0
    } else {
        crate::bench::DramProbe::BYTES as u64
    };
    let model_peak = [
        peak_before_probe,
        Some(rss_during.saturating_sub(probe_bytes)),
        if hwm_reset { peak_rss() } else { current_rss() },
    ]
    .into_iter()
    .flatten()
    .max()
    .filter(|&b| b > 0);
    match model_peak {
        Some(b) => println!(
            "| peak resident memory (the DRAM probe's buffer left out) | {:.2} GB | |",
            b as f64 / 1e9
        ),
        None => println!("| peak resident memory | n/a | |"),
    }
    let ours = Ours {
        clip_ms_per_crop: clip / crops as f64,
        prompt_len,
        prefill_s: prefill,
        decode_ms_per_token: per_token,
    };
    if o.compare_torch {
        // Free the model's mappings and buffers before torch builds its own 7.6 GB decoder.
        drop(session);
        drop(pipeline);
        compare_torch(&o, &ours, threads)?;
    }
    Ok(())
}

/// Decode steps of `b` sequences at once (`Pipeline::step_batch`, what `phi3v serve` runs for
/// concurrent requests): time per batched step and tokens/s over all sequences, against one
/// sequence's step time `single_ms` measured above.
fn batched_decode(pipeline: &Pipeline, steps: usize, single_ms: f64) -> Result<()> {
    let trace = Trace::new(false);
    let prompt = pipeline.build_prompt("Tell me a story.", 0, true)?;
    let prepared = pipeline.prepare(&[], &prompt, &pipeline.image_processor, &trace)?;
    for b in [2usize, 4] {
        let mut sessions = Vec::with_capacity(b);
        for _ in 0..b {
            let mut s = pipeline.new_session(prepared.input_ids.len() + steps + 1)?;
            pipeline.feed(&mut s, &prepared, None, &trace)?;
            sessions.push(s);
        }
        let tokens: Vec<u32> = (0..b as u32).map(|r| 1000 + r).collect();
        let t0 = Instant::now();
        for _ in 0..steps {
            let mut refs: Vec<&mut phi3v::Session> = sessions.iter_mut().collect();
            pipeline.step_batch(&mut refs, &tokens)?;
        }
        let ms = t0.elapsed().as_secs_f64() * 1e3 / steps as f64;
        println!(
            "| decode, {b} sequences batched | {ms:.1} ms/step | {:.2} tokens/s, {:.2}x one sequence's |",
            b as f64 * 1e3 / ms,
            b as f64 * single_ms / ms
        );
    }
    Ok(())
}

/// The GPU's copy bandwidth (bytes read + written per second), 1 GiB device to device.
#[cfg(feature = "cuda")]
fn gpu_copy_gbps() -> Result<f64> {
    use phi_kernels::cuda::{CudaSlice, Device};
    let dev = Device::new(0)?;
    let n = 1usize << 29;
    let src: CudaSlice<half::bf16> = dev.zeros(n)?;
    let mut dst: CudaSlice<half::bf16> = dev.zeros(n)?;
    let t = dev.time(10, || dev.copy(&src, &mut dst))?;
    Ok(2.0 * 2.0 * n as f64 / t / 1e9)
}

#[cfg(not(feature = "cuda"))]
fn gpu_copy_gbps() -> Result<f64> {
    anyhow::bail!("--device cuda: xtask was built without its `cuda` feature")
}

/// Times transformers on the same shapes (random weights of the same config) and prints one
/// table: ours, torch, and torch / ours (above 1: we are faster).
fn compare_torch(o: &Opts, ours: &Ours, threads: usize) -> Result<()> {
    let root = crate::root();
    let python = crate::bench::torch_python()?;
    crate::fixtures::ensure_phi3(&root, &python)?;
    let site = root
        .join(crate::fixtures::VENV)
        .join(crate::fixtures::PHI3_SITE);
    let ours_dtype = if o.precision == phi_kernels::DType::BF16 {
        "bf16"
    } else {
        "f32"
    };
    let config = o.model.join("config.json");
    let request = serde_json::json!([
        {"name": "clip_crop_f32", "kind": "clip_crop", "dtype": "f32", "threads": threads},
        {"name": "clip_crop_bf16", "kind": "clip_crop", "dtype": "bf16", "threads": threads},
        {"name": "phi3_bf16", "kind": "phi3", "dtype": "bf16", "threads": threads,
         "config": config, "t": ours.prompt_len, "new_tokens": 4},
    ]);
    let answer = crate::bench::run_torch_request(&python, &request, Some(&site))?;
    let secs = |k: &str| answer.get(k).and_then(|v| v.as_f64());
    let phi3 = |k: &str| answer["phi3_bf16"].get(k).and_then(|v| v.as_f64());
    let version = crate::bench::torch_version(&python).unwrap_or_else(|| "?".into());
    println!();
    println!(
        "transformers (torch {version}; CLIP with sdpa attention, Phi3 eager, the only kind transformers 4.41 has for it; random weights of the same config; {threads} threads) beside ours ({ours_dtype} products):"
    );
    println!("| stage | ours | transformers | transformers / ours |");
    println!("|---|---:|---:|---:|");
    let row = |stage: &str, ours_ms: f64, torch_s: Option<f64>| match torch_s {
        Some(t) => println!(
            "| {stage} | {ours_ms:.1} ms | {:.1} ms | {:.2}x |",
            t * 1e3,
            t * 1e3 / ours_ms
        ),
        None => println!("| {stage} | {ours_ms:.1} ms | n/a | |"),
    };
    row(
        "CLIP one crop (ours 23 layers, transformers 24), torch f32",
        ours.clip_ms_per_crop,
        secs("clip_crop_f32"),
    );
    row(
        "CLIP one crop (ours 23 layers, transformers 24), torch bf16",
        ours.clip_ms_per_crop,
        secs("clip_crop_bf16"),
    );
    row(
        &format!("prefill {} tokens, torch bf16", ours.prompt_len),
        ours.prefill_s * 1e3,
        phi3("prefill"),
    );
    row(
        "decode, per token, torch bf16",
        ours.decode_ms_per_token,
        phi3("decode_per_token"),
    );
    Ok(())
}
