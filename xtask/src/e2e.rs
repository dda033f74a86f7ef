//! `cargo xtask bench --e2e --model DIR`: the whole pipeline on one image, stage by stage:
//! preprocessing, CLIP per crop, merge + projector, prefill tokens/s, decode tokens/s, and the
//! process's peak resident memory. Use `cargo xtask synth` for a full-size model.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use phi3v::processor::decode_image;
use phi3v::sampling::SamplingParams;
use phi3v::trace::Trace;
use phi3v::{GenerateOptions, Pipeline};

/// Peak resident set size of this process (`VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub struct Opts<'a> {
    pub model: &'a Path,
    pub image: &'a Path,
    pub num_crops: Option<usize>,
    pub new_tokens: usize,
}

pub fn run(o: Opts) -> Result<()> {
    let start = Instant::now();
    let pipeline =
        Pipeline::load(o.model).with_context(|| format!("loading {}", o.model.display()))?;
    let load = start.elapsed();
    let processor = match o.num_crops {
        Some(n) => pipeline.image_processor.with_num_crops(n)?,
        None => pipeline.image_processor.clone(),
    };
    let image = decode_image(o.image).with_context(|| o.image.display().to_string())?;
    let prompt = pipeline.build_prompt("Describe the image in detail.", 1, true)?;
    let trace = Trace::recording();
    let prepared = pipeline.prepare(&[image], &prompt, &processor, &trace)?;
    let opts = GenerateOptions {
        max_new_tokens: o.new_tokens,
        sampling: SamplingParams::default(),
        ignore_stop: true,
    };
    let gen = pipeline.generate(&prepared, &opts, &trace, |_| {})?;

    let stages = trace.stages();
    let ms = |name: &str| {
        stages
            .iter()
            .filter(|s| s.name.starts_with(name))
            .map(|s| s.took.as_secs_f64() * 1e3)
            .sum::<f64>()
    };
    let crops = prepared.images[0].h_c * prepared.images[0].w_c + 1;
    println!(
        "model {} | image {} | {} crops | prompt {} tokens | {} new tokens | {} threads",
        o.model.display(),
        o.image.display(),
        crops,
        gen.prompt_len,
        gen.ids.len(),
        rayon::current_num_threads()
    );
    println!("| stage | time | rate |");
    println!("|---|---:|---:|");
    println!(
        "| load (map weights, tokenizer) | {:.1} ms | |",
        load.as_secs_f64() * 1e3
    );
    println!(
        "| preprocess (HD transform, crops) | {:.1} ms | |",
        ms("image 1 preprocess")
    );
    let clip = ms("CLIP layer output");
    println!(
        "| CLIP | {clip:.1} ms | {:.1} ms/crop |",
        clip / crops as f64
    );
    println!(
        "| merge + separators + projector | {:.1} ms | |",
        ms("grid with separators") + ms("projector")
    );
    let prefill = gen.prefill_time.as_secs_f64();
    println!(
        "| prefill | {:.1} ms | {:.1} tokens/s |",
        prefill * 1e3,
        gen.prompt_len as f64 / prefill
    );
    let decode = gen.decode_time.as_secs_f64();
    let steps = gen.ids.len().saturating_sub(1).max(1);
    println!(
        "| decode | {:.1} ms | {:.2} tokens/s ({:.1} ms/token) |",
        decode * 1e3,
        steps as f64 / decode,
        decode * 1e3 / steps as f64
    );
    match peak_rss() {
        Some(b) => println!("| peak resident memory | {:.2} GB | |", b as f64 / 1e9),
        None => println!("| peak resident memory | n/a | |"),
    }
    Ok(())
}
