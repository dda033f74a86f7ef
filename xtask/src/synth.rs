//! `cargo xtask synth --out DIR [--layers N] [--clip-layers N]`: a checkpoint with the real
//! Phi-3-vision-128k-instruct names, shapes, config and tokenizer, and deterministic random bf16
//! weights (8.3 GB at full depth), so speed and memory can be measured at real shapes without
//! downloading the model. Its text output is noise.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result};
use rayon::prelude::*;
use serde_json::json;

/// Phi-3-vision-128k-instruct `rope_scaling` arrays (spec §1.2).
const LONG_FACTOR: [f64; 48] = [
    1.0299999713897705,
    1.0499999523162842,
    1.0499999523162842,
    1.0799999237060547,
    1.2299998998641968,
    1.2299998998641968,
    1.2999999523162842,
    1.4499999284744263,
    1.5999999046325684,
    1.6499998569488525,
    1.8999998569488525,
    2.859999895095825,
    3.68999981880188,
    5.419999599456787,
    5.489999771118164,
    5.489999771118164,
    9.09000015258789,
    11.579999923706055,
    15.65999984741211,
    15.769999504089355,
    15.789999961853027,
    18.360000610351562,
    21.989999771118164,
    23.079999923706055,
    30.009998321533203,
    32.35000228881836,
    32.590003967285156,
    35.56000518798828,
    39.95000457763672,
    53.840003967285156,
    56.20000457763672,
    57.95000457763672,
    59.29000473022461,
    59.77000427246094,
    59.920005798339844,
    61.190006256103516,
    61.96000671386719,
    62.50000762939453,
    63.3700065612793,
    63.48000717163086,
    63.48000717163086,
    63.66000747680664,
    63.850006103515625,
    64.08000946044922,
    64.760009765625,
    64.80001068115234,
    64.81001281738281,
    64.81001281738281,
];

fn short_factor() -> Vec<f64> {
    let mut v = vec![
        1.05,
        1.05,
        1.05,
        1.1,
        1.1,
        1.1,
        1.2500000000000002,
        1.2500000000000002,
        1.4000000000000004,
        1.4500000000000004,
        1.5500000000000005,
        1.8500000000000008,
        1.9000000000000008,
    ];
    v.extend([2.000000000000001; 19]);
    v.extend([2.1000000000000005, 2.1000000000000005, 2.2]);
    v.extend([2.3499999999999996; 4]);
    v.extend([
        2.3999999999999995,
        2.3999999999999995,
        2.6499999999999986,
        2.6999999999999984,
        2.8999999999999977,
        2.9499999999999975,
    ]);
    v.extend([3.049999999999997; 3]);
    assert_eq!(v.len(), 48);
    v
}

/// How a tensor is filled: uniform in ±scale around `center`.
struct Spec {
    name: String,
    shape: Vec<usize>,
    center: f32,
    scale: f32,
}

fn spec(name: impl Into<String>, shape: &[usize], center: f32, scale: f32) -> Spec {
    Spec {
        name: name.into(),
        shape: shape.to_vec(),
        center,
        scale,
    }
}

fn tensors(layers: usize, clip_layers: usize) -> Vec<Spec> {
    let (h, i, v) = (3072, 8192, 32064);
    // Uniform ±√3/√fan_in has variance 1/fan_in: activations keep their size through layers.
    let lin = |fan_in: usize| (3.0f32 / fan_in as f32).sqrt();
    let mut t = vec![spec("model.embed_tokens.weight", &[v, h], 0.0, 0.05)];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        t.push(spec(format!("{p}.input_layernorm.weight"), &[h], 1.0, 0.1));
        t.push(spec(
            format!("{p}.self_attn.qkv_proj.weight"),
            &[3 * h, h],
            0.0,
            lin(h),
        ));
        t.push(spec(
            format!("{p}.self_attn.o_proj.weight"),
            &[h, h],
            0.0,
            lin(h),
        ));
        t.push(spec(
            format!("{p}.post_attention_layernorm.weight"),
            &[h],
            1.0,
            0.1,
        ));
        t.push(spec(
            format!("{p}.mlp.gate_up_proj.weight"),
            &[2 * i, h],
            0.0,
            lin(h),
        ));
        t.push(spec(
            format!("{p}.mlp.down_proj.weight"),
            &[h, i],
            0.0,
            lin(i),
        ));
    }
    t.push(spec("model.norm.weight", &[h], 1.0, 0.1));
    let e = "model.vision_embed_tokens";
    t.push(spec(format!("{e}.glb_GN"), &[1, 1, 4096], 0.0, 0.5));
    t.push(spec(format!("{e}.sub_GN"), &[1, 1, 1, 4096], 0.0, 0.5));
    t.push(spec(
        format!("{e}.img_projection.0.weight"),
        &[h, 4096],
        0.0,
        lin(4096),
    ));
    t.push(spec(format!("{e}.img_projection.0.bias"), &[h], 0.0, 0.02));
    t.push(spec(
        format!("{e}.img_projection.2.weight"),
        &[h, h],
        0.0,
        lin(h),
    ));
    t.push(spec(format!("{e}.img_projection.2.bias"), &[h], 0.0, 0.02));
    let c = format!("{e}.img_processor.vision_model");
    t.push(spec(
        format!("{c}.embeddings.class_embedding"),
        &[1024],
        0.0,
        0.5,
    ));
    t.push(spec(
        format!("{c}.embeddings.patch_embedding.weight"),
        &[1024, 3, 14, 14],
        0.0,
        lin(588),
    ));
    t.push(spec(
        format!("{c}.embeddings.position_embedding.weight"),
        &[577, 1024],
        0.0,
        0.1,
    ));
    t.push(spec(format!("{c}.pre_layrnorm.weight"), &[1024], 1.0, 0.1));
    t.push(spec(format!("{c}.pre_layrnorm.bias"), &[1024], 0.0, 0.02));
    for l in 0..clip_layers {
        let p = format!("{c}.encoder.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            t.push(spec(
                format!("{p}.self_attn.{proj}.weight"),
                &[1024, 1024],
                0.0,
                lin(1024),
            ));
            t.push(spec(
                format!("{p}.self_attn.{proj}.bias"),
                &[1024],
                0.0,
                0.02,
            ));
        }
        for ln in ["layer_norm1", "layer_norm2"] {
            t.push(spec(format!("{p}.{ln}.weight"), &[1024], 1.0, 0.1));
            t.push(spec(format!("{p}.{ln}.bias"), &[1024], 0.0, 0.02));
        }
        t.push(spec(
            format!("{p}.mlp.fc1.weight"),
            &[4096, 1024],
            0.0,
            lin(1024),
        ));
        t.push(spec(format!("{p}.mlp.fc1.bias"), &[4096], 0.0, 0.02));
        t.push(spec(
            format!("{p}.mlp.fc2.weight"),
            &[1024, 4096],
            0.0,
            lin(4096),
        ));
        t.push(spec(format!("{p}.mlp.fc2.bias"), &[1024], 0.0, 0.02));
    }
    t.push(spec(
        format!("{c}.post_layernorm.weight"),
        &[1024],
        1.0,
        0.1,
    ));
    t.push(spec(format!("{c}.post_layernorm.bias"), &[1024], 0.0, 0.02));
    t.push(spec("lm_head.weight", &[v, h], 0.0, lin(h)));
    t
}

/// Deterministic per-tensor stream (SplitMix64 seeded from the name). SplitMix64's state after
/// `i + 1` steps is `seed + (i + 1) * GAMMA`, so element `i` needs no earlier one and the fill
/// runs in parallel (the 8.3 GB checkpoint is written on the GPU machine, on its clock).
fn fill(s: &Spec, out: &mut Vec<u8>) {
    let seed = seed(s);
    let n: usize = s.shape.iter().product();
    out.clear();
    out.resize(n * 2, 0);
    out.par_chunks_mut(1 << 16)
        .enumerate()
        .for_each(|(chunk, bytes)| {
            let first = chunk * (1 << 15);
            for (j, pair) in bytes.chunks_exact_mut(2).enumerate() {
                let state = seed.wrapping_add(GAMMA.wrapping_mul((first + j) as u64 + 1));
                pair.copy_from_slice(&value(s, state));
            }
        });
}

/// SplitMix64's increment.
const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// The stream's start: an FNV-1a hash of the tensor's name.
fn seed(s: &Spec) -> u64 {
    s.name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// The bf16 value (little-endian bytes) of SplitMix64 state `state`: its output mapped to
/// `center ± scale`.
fn value(s: &Spec, state: u64) -> [u8; 2] {
    let mut z = state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let u = (z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
    half::bf16::from_f32(s.center + s.scale * u)
        .to_bits()
        .to_le_bytes()
}

fn write_shard(path: &Path, specs: &[&Spec]) -> Result<u64> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for s in specs {
        let bytes = s.shape.iter().product::<usize>() * 2;
        header.insert(
            s.name.clone(),
            json!({"dtype": "BF16", "shape": s.shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut h = serde_json::Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut w = BufWriter::with_capacity(
        1 << 22,
        File::create(path).with_context(|| path.display().to_string())?,
    );
    w.write_all(&(h.len() as u64).to_le_bytes())?;
    w.write_all(&h)?;
    let mut buf = Vec::new();
    for s in specs {
        fill(s, &mut buf);
        w.write_all(&buf)?;
    }
    w.flush()?;
    Ok(offset as u64)
}

pub fn run(root: &Path, out: &Path, layers: usize, clip_layers: usize) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| out.display().to_string())?;
    let specs = tensors(layers, clip_layers);
    let total: usize = specs
        .iter()
        .map(|s| s.shape.iter().product::<usize>() * 2)
        .sum();
    // Two shards split at half the bytes, like the published checkpoint.
    let mut first = Vec::new();
    let mut second = Vec::new();
    let mut acc = 0;
    for s in &specs {
        if acc < total / 2 {
            first.push(s)
        } else {
            second.push(s)
        }
        acc += s.shape.iter().product::<usize>() * 2;
    }
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut weight_map = serde_json::Map::new();
    for (file, shard) in names.iter().zip([&first, &second]) {
        eprintln!("writing {file} ({} tensors)", shard.len());
        write_shard(&out.join(file), shard)?;
        for s in shard.iter() {
            weight_map.insert(s.name.clone(), json!(file));
        }
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    std::fs::write(
        out.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;

    let mut img_processor = json!({"image_dim_out": 1024, "model_name": "openai/clip-vit-large-patch14-336",
        "name": "clip_vision_model", "num_img_tokens": 144});
    if clip_layers != 24 {
        img_processor["clip_config"] = json!({"num_hidden_layers": clip_layers});
    }
    let config = json!({
        "_name_or_path": "synthetic Phi-3-vision-128k-instruct (random weights)",
        "architectures": ["Phi3VForCausalLM"], "model_type": "phi3_v",
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32000,
        "embd_layer": {"embedding_cls": "image", "hd_transform_order": "sub_glb", "projection_cls": "mlp",
            "use_hd_transform": true, "with_learnable_separator": true},
        "embd_pdrop": 0.0, "hidden_act": "silu", "hidden_size": 3072, "img_processor": img_processor,
        "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072,
        "num_attention_heads": 32, "num_hidden_layers": layers, "num_key_value_heads": 32,
        "original_max_position_embeddings": 4096, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
        "rope_scaling": {"type": "su", "long_factor": LONG_FACTOR.to_vec(), "short_factor": short_factor()},
        "rope_theta": 10000.0, "sliding_window": 131072, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16", "use_cache": true, "vocab_size": 32064
    });
    std::fs::write(
        out.join("config.json"),
        serde_json::to_string_pretty(&config)?,
    )?;
    let tiny = root.join("fixtures/tiny-phi3v");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ] {
        std::fs::copy(tiny.join(f), out.join(f)).with_context(|| format!("copying {f}"))?;
    }
    let mut pre: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        tiny.join("preprocessor_config.json"),
    )?)?;
    pre["num_crops"] = json!(16);
    std::fs::write(
        out.join("preprocessor_config.json"),
        serde_json::to_string_pretty(&pre)?,
    )?;
    eprintln!(
        "wrote {} ({:.2} GB of bf16 weights)",
        out.display(),
        total as f64 / 1e9
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SplitMix64 stepped one value at a time, as the stream is defined: the parallel `fill`,
    /// which jumps to each element's state, must give the same bytes (a changed checkpoint would
    /// silently change every e2e figure).
    fn fill_ref(s: &Spec) -> Vec<u8> {
        let mut state = seed(s);
        let n: usize = s.shape.iter().product();
        let mut out = Vec::with_capacity(2 * n);
        for _ in 0..n {
            state = state.wrapping_add(GAMMA);
            out.extend_from_slice(&value(s, state));
        }
        out
    }

    #[test]
    fn parallel_fill_is_the_sequential_stream() {
        // Sizes across the 32768-value chunks of the parallel fill, and a ragged last one.
        for (name, len) in [
            ("a.weight", 1),
            ("model.x", 32768),
            ("b.bias", 3 * 32768 + 77),
        ] {
            let s = spec(name, &[len], 0.25, 0.5);
            let mut got = Vec::new();
            fill(&s, &mut got);
            assert_eq!(got, fill_ref(&s), "{name}");
        }
    }
}
