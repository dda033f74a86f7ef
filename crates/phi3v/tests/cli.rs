//! The `phi3v` binary end to end on the bundled tiny model: a normal run with `--trace` and
//! `--dump`, and bad input of every kind answered with a clear error and a non-zero exit,
//! never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::tensor::TensorView;
use safetensors::SafeTensors;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn model() -> PathBuf {
    fixtures().join("tiny-phi3v")
}

fn image(name: &str) -> PathBuf {
    fixtures().join("images").join(name)
}

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("phi3v-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phi3v"))
        .args(args)
        .env_remove("PHI_KERNELS_ISA")
        .output()
        .expect("spawn phi3v")
}

/// A copy of the bundled model that a test may damage.
fn model_copy(name: &str) -> PathBuf {
    let d = tmpdir(name);
    for e in std::fs::read_dir(model()).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), d.join(e.file_name())).unwrap();
    }
    d
}

/// Runs `generate` with `args`, expects failure, returns stderr.
fn fails(args: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "expected failure for {args:?}, stderr:\n{stderr}"
    );
    assert!(
        !stderr.contains("panicked"),
        "panic for {args:?}:\n{stderr}"
    );
    assert!(
        stderr.contains("error:"),
        "no error line for {args:?}:\n{stderr}"
    );
    stderr
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn generate_traces_every_stage_and_dumps_tensors() {
    let dir = tmpdir("dump");
    let dump = dir.join("dump.safetensors");
    let img = image("landscape.jpg");
    let out = run(&[
        "generate",
        "--model",
        s(&model()),
        "--image",
        s(&img),
        "--prompt",
        "What is shown?",
        "--max-new-tokens",
        "5",
        "--trace",
        "--dump",
        s(&dump),
        "--num-crops",
        "4",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The stages, in pipeline order.
    let order = [
        "preprocess",
        "tokenize",
        "CLIP layer output",
        "patches (CLS dropped)",
        "2x2 merge",
        "grid with separators",
        "projector",
        "scattered into inputs_embeds",
        "decoder prefill",
        "decode",
    ];
    let mut at = 0;
    for stage in order {
        let pos = stderr[at..]
            .find(stage)
            .unwrap_or_else(|| panic!("stage `{stage}` missing or out of order:\n{stderr}"));
        at += pos + stage.len();
    }
    assert!(
        stderr.contains("[5,577,128]"),
        "CLIP shape for 5 crops:\n{stderr}"
    );

    let bytes = std::fs::read(&dump).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let shape = |n: &str| st.tensor(n).unwrap().shape().to_vec();
    let seq = shape("input_ids")[0];
    assert_eq!(shape("image_sizes"), vec![1, 2]);
    assert_eq!(shape("pixel_values"), vec![1, 5, 3, 336, 336]);
    assert_eq!(shape("image_embeds"), vec![757, 96]);
    assert_eq!(shape("inputs_embeds"), vec![seq, 96]);
    assert_eq!(shape("logits"), vec![32064]);
    assert_eq!(
        shape("generated_ids"),
        vec![5],
        "--dump generates exactly --max-new-tokens"
    );
    let ids: Vec<i64> = st
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(ids.iter().filter(|&&i| i == -1).count(), 757);
}

#[test]
fn text_only_prompt_omits_image_tensors() {
    let dir = tmpdir("textonly");
    let dump = dir.join("d.safetensors");
    let out = run(&[
        "generate",
        "--model",
        s(&model()),
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "3",
        "--dump",
        s(&dump),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bytes = std::fs::read(&dump).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensor("pixel_values").is_err() && st.tensor("image_embeds").is_err());
    assert!(st.tensor("logits").is_ok());
}

#[test]
fn bad_image_arguments() {
    let m = model();
    let dir = tmpdir("badimg");
    let missing = dir.join("nope.png");
    let e = fails(&[
        "generate",
        "--model",
        s(&m),
        "--image",
        s(&missing),
        "--prompt",
        "x",
    ]);
    assert!(e.contains("nope.png"), "{e}");

    let garbage = dir.join("garbage.jpg");
    std::fs::write(&garbage, b"this is not an image at all").unwrap();
    let e = fails(&[
        "generate",
        "--model",
        s(&m),
        "--image",
        s(&garbage),
        "--prompt",
        "x",
    ]);
    assert!(e.contains("garbage.jpg"), "{e}");

    let empty = dir.join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let e = fails(&[
        "generate",
        "--model",
        s(&m),
        "--image",
        s(&empty),
        "--prompt",
        "x",
    ]);
    assert!(e.contains("empty.png"), "{e}");

    // A well-formed GIF whose screen and frame are 0x0.
    let zero = dir.join("zero.gif");
    std::fs::write(&zero, b"GIF89a\x00\x00\x00\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff\x2c\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x02\x4c\x01\x00\x3b").unwrap();
    let e = fails(&[
        "generate",
        "--model",
        s(&m),
        "--image",
        s(&zero),
        "--prompt",
        "x",
    ]);
    assert!(e.contains("zero.gif"), "{e}");
}

#[test]
fn bad_prompt_and_option_arguments() {
    let m = model();
    let img = image("portrait.png");
    let e = fails(&[
        "generate",
        "--model",
        s(&m),
        "--image",
        s(&img),
        "--image",
        s(&img),
        "--raw-prompt",
        "<|image_1|><|image_3|> hi",
    ]);
    assert!(e.contains("<|image_3|>"), "{e}");
    let e = fails(&[
        "generate",
        "--model",
        s(&m),
        "--image",
        s(&img),
        "--prompt",
        "x",
        "--num-crops",
        "0",
    ]);
    assert!(e.contains("num-crops") || e.contains("num_crops"), "{e}");
    let e = fails(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        "x",
        "--dtype",
        "f8",
    ]);
    assert!(e.contains("--dtype"), "{e}");
    // Beyond the tiny model's 4096 positions.
    let long = "word ".repeat(5000);
    let e = fails(&["generate", "--model", s(&m), "--raw-prompt", &long]);
    assert!(e.contains("positions"), "{e}");
    let e = fails(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        "x",
        "--top-p",
        "0",
    ]);
    assert!(e.contains("top-p"), "{e}");
}

#[test]
fn missing_model_files() {
    let dir = tmpdir("nomodel");
    let e = fails(&[
        "generate",
        "--model",
        s(&dir.join("absent")),
        "--prompt",
        "x",
    ]);
    assert!(e.contains("absent"), "{e}");
}

fn shard_with_most_tensors(dir: &Path) -> PathBuf {
    let mut shards: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    shards.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    shards.pop().unwrap()
}

#[test]
fn truncated_shard() {
    let d = model_copy("trunc");
    let shard = shard_with_most_tensors(&d);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let e = fails(&["generate", "--model", s(&d), "--prompt", "x"]);
    assert!(
        e.contains(shard.file_name().unwrap().to_str().unwrap()),
        "{e}"
    );
}

#[test]
fn header_offsets_outside_the_file() {
    let d = model_copy("offsets");
    let shard = shard_with_most_tensors(&d);
    let bytes = std::fs::read(&shard).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(header).unwrap();
    // Point the last tensor's end far past the data.
    let (name, _) = json
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
        .map(|(k, v)| (k.clone(), v.clone()))
        .unwrap();
    let end = json[&name]["data_offsets"][1].as_u64().unwrap();
    json[&name]["data_offsets"][1] = serde_json::json!(end + 1_000_000);
    let mut h = json.to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&shard, out).unwrap();
    let e = fails(&["generate", "--model", s(&d), "--prompt", "x"]);
    assert!(
        e.contains(shard.file_name().unwrap().to_str().unwrap()),
        "{e}"
    );
}

#[test]
fn tensor_with_the_wrong_shape() {
    let d = model_copy("shape");
    let shard = shard_with_most_tensors(&d);
    let bytes = std::fs::read(&shard).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let victim = st
        .names()
        .into_iter()
        .find(|n| n.ends_with("norm.weight") || n.ends_with("layer_norm1.weight"))
        .unwrap()
        .to_string();
    let tensors: Vec<(String, TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(name, t)| {
            if name == victim {
                let n = t.shape().iter().product::<usize>();
                (
                    name,
                    TensorView::new(t.dtype(), vec![n / 2, 2], t.data()).unwrap(),
                )
            } else {
                (name, t)
            }
        })
        .collect();
    let rewritten = safetensors::serialize(tensors, None).unwrap();
    std::fs::write(&shard, rewritten).unwrap();
    let e = fails(&["generate", "--model", s(&d), "--prompt", "x"]);
    assert!(e.contains(&victim), "{e}");
}

#[test]
fn config_keys_that_change_the_maths() {
    let d = model_copy("config");
    let path = d.join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["rope_scaling"]["type"] = serde_json::json!("yarn");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let e = fails(&["generate", "--model", s(&d), "--prompt", "x"]);
    assert!(e.contains("yarn") && e.contains("config.json"), "{e}");
}

#[test]
fn device_cuda_without_a_gpu_fails_cleanly() {
    let m = model();
    let out = run(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        "Hi.",
        "--max-new-tokens",
        "2",
        "--device",
        "cuda",
    ]);
    if out.status.success() {
        // A GPU answered: the same command ran there.
        return;
    }
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--device cuda") && err.contains("no CUDA device"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    // The CPU is always there.
    let out = run(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        "Hi.",
        "--max-new-tokens",
        "2",
        "--device",
        "cpu",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(fails(&[
        "generate",
        "--model",
        s(&m),
        "--prompt",
        "Hi.",
        "--device",
        "tpu"
    ])
    .contains("tpu"));
}
