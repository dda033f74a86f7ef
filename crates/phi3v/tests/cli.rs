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
    // A text-only generation's dump, the weights read into memory (the default) or mapped.
    let dump = |name: &str, extra: &[&str]| -> Vec<u8> {
        let path = dir.join(name);
        let m = model();
        let base = [
            "generate",
            "--model",
            s(&m),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "3",
            "--dump",
            s(&path),
        ];
        let out = run(&[&base[..], extra].concat());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(&path).unwrap()
    };
    let bytes = dump("d.safetensors", &[]);
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensor("pixel_values").is_err() && st.tensor("image_embeds").is_err());
    assert!(st.tensor("logits").is_ok());
    // Both ways of holding the weights give the same numbers.
    assert!(
        dump("mapped.safetensors", &["--mmap"]) == bytes,
        "--mmap changed the dump"
    );
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
    for mmap in [&[][..], &["--mmap"][..]] {
        let args = [&["generate", "--model", s(&d), "--prompt", "x"][..], mmap].concat();
        let e = fails(&args);
        assert!(
            e.contains(shard.file_name().unwrap().to_str().unwrap()),
            "{mmap:?}: {e}"
        );
    }
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

/// A child process killed when the test ends, pass or fail.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_listens_on_the_address_it_prints() {
    use std::io::BufRead;
    let mut child = Child(
        Command::new(env!("CARGO_BIN_EXE_phi3v"))
            .args([
                "serve",
                "--model",
                s(&model()),
                "--port",
                "0",
                "--served-model-name",
                "tiny",
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let stderr = child.0.stderr.take().unwrap();
    let mut lines = std::io::BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines.next().expect("serve exited").unwrap();
        if let Some(rest) = line.strip_prefix("serving tiny on http://") {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    let health: serde_json::Value = ureq::get(&format!("http://{addr}/health"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(health["model"], "tiny");
    let v: serde_json::Value = ureq::post(&format!("http://{addr}/v1/chat/completions"))
        .send_json(serde_json::json!({
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 3
        }))
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3);
}

#[test]
fn serve_refuses_a_port_in_use() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port().to_string();
    let e = fails(&["serve", "--model", s(&model()), "--port", &port]);
    assert!(e.contains(&port), "{e}");
}

#[test]
fn chat_keeps_the_conversation_and_its_cache_between_turns() {
    use std::io::Write as _;
    let mut child = Command::new(env!("CARGO_BIN_EXE_phi3v"))
        .args([
            "chat",
            "--model",
            s(&model()),
            "--image",
            s(&image("square.png")),
            "--max-new-tokens",
            "4",
            // Small images keep the conversation under the tiny model's 1024 original
            // positions: past them LongRoPE switches factors and nothing can be reused.
            "--num-crops",
            "1",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let script = format!(
        "What is it?\nAnd then?\n/image {}\n/image {}\nCompare.\n/reset\nHello\n/exit\nnever read\n",
        s(&tmpdir("chat").join("nope.png")),
        s(&image("tiny.png"))
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    // One status line per answered turn: (prompt tokens, reused).
    let turns: Vec<(usize, usize)> = stderr
        .lines()
        .filter_map(|l| {
            let l = l.strip_prefix('[')?;
            let (prompt, rest) = l.split_once(" prompt tokens, ")?;
            let reused = rest.split_once(' ')?.0;
            Some((prompt.parse().ok()?, reused.parse().ok()?))
        })
        .collect();
    assert_eq!(turns.len(), 4, "{stderr}");
    assert_eq!(turns[0].1, 0, "{stderr}");
    // Turn 2 holds turn 1 (its image included) and the answer.
    assert!(turns[1].1 > 144 && turns[1].0 > turns[0].0, "{stderr}");
    // Turn 3 adds an image: everything before it is reused.
    assert!(turns[2].1 >= turns[1].0, "{stderr}");
    // After /reset the image is gone: a short prompt.
    assert!(turns[3].0 < 20, "{stderr}");
    assert!(stderr.contains("nope.png"), "{stderr}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 4);
}

#[test]
fn model_may_be_a_repo_id_in_the_hub_cache() {
    let cache = tmpdir("hfcache");
    let snap = cache.join("models--microsoft--Phi-3-vision-128k-instruct/snapshots/abc123");
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(model()).unwrap() {
        let e = e.unwrap();
        std::os::unix::fs::symlink(e.path(), snap.join(e.file_name())).unwrap();
    }
    std::fs::create_dir_all(cache.join("models--microsoft--Phi-3-vision-128k-instruct/refs"))
        .unwrap();
    std::fs::write(
        cache.join("models--microsoft--Phi-3-vision-128k-instruct/refs/main"),
        "abc123",
    )
    .unwrap();
    let run_with = |repo: &str, extra: &[(&str, &str)]| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_phi3v"));
        c.args([
            "generate",
            "--model",
            repo,
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "2",
        ])
        .env("HF_HUB_CACHE", &cache)
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("PHI3V_MODEL");
        for (k, v) in extra {
            c.env(k, v);
        }
        c.output().unwrap()
    };
    let out = run_with("microsoft/Phi-3-vision-128k-instruct", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("from the Hugging Face cache"), "{stderr}");

    // Not cached: offline is refused outright, a download failure names the repo.
    let out = run_with("someone/absent-model", &[("HF_HUB_OFFLINE", "1")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("HF_HUB_OFFLINE"),
        "{stderr}"
    );
    let out = run_with(
        "someone/absent-model",
        &[("HF_ENDPOINT", "http://127.0.0.1:9")],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("someone/absent-model") && stderr.contains("config.json"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}
