//! `cargo xtask device-bundle [--out DIR]`: everything the GPU machine runs, built here (it has
//! no Rust toolchain and no network): the kernel and pipeline CUDA test binaries, the GPU bench,
//! and xtask for `synth` and `bench --e2e --device cuda` (x86-64, release, kernels embedded,
//! stripped), PyTorch's side of the bench, and `run.sh`, which runs the tests (the pipeline's
//! against the CPU path on the repository's fixtures), compute-sanitizer once, one table of our
//! times beside torch's, then the pipeline end to end on a full-size synthetic checkpoint. It
//! starts with the host CPU's GEMM tests and kernel table beside torch's, the only place the AMX
//! and AVX512-BF16 paths can run (the dev machines have neither). The folder is also written as
//! `<out>.tar.gz`, which is what travels (see the end of `run`).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs a cargo build with JSON messages and returns the executable of the artifact `name`.
fn build(root: &Path, args: &[&str], name: &str) -> Result<PathBuf> {
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(root)
        .args(args)
        .args(["--release", "--message-format=json-render-diagnostics"])
        .output()
        .context("running cargo")?;
    if !out.status.success() {
        bail!(
            "cargo {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact" && msg["target"]["name"] == name {
            if let Some(exe) = msg["executable"].as_str() {
                return Ok(PathBuf::from(exe));
            }
        }
    }
    bail!("cargo {} built no executable named {name}", args.join(" "))
}

pub fn run(root: &Path, out: Option<PathBuf>) -> Result<()> {
    let out = out.unwrap_or_else(|| root.join("target/device-bundle"));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out)?;
    // (cargo arguments, artifact name, name in the bundle)
    let artifacts: [(&[&str], &str, &str); 5] = [
        // The CPU GEMM tests: on a host with AMX or AVX512-BF16 (never on the dev VM) they run
        // the hardware bf16 kernels against their twins and the f64 reference.
        (
            &["test", "-p", "phi-kernels", "--test", "gemm", "--no-run"],
            "gemm",
            "cpu_gemm_tests",
        ),
        (
            &[
                "test",
                "-p",
                "phi-kernels",
                "--features",
                "cuda",
                "--test",
                "cuda",
                "--no-run",
            ],
            "cuda",
            "cuda_tests",
        ),
        (
            &[
                "build",
                "-p",
                "phi-kernels",
                "--features",
                "cuda",
                "--example",
                "cuda_bench",
            ],
            "cuda_bench",
            "cuda_bench",
        ),
        (
            &["test", "-p", "phi3v", "--test", "cuda", "--no-run"],
            "cuda",
            "pipeline_tests",
        ),
        (
            &["build", "-p", "xtask", "--features", "cuda"],
            "xtask",
            "xtask",
        ),
    ];
    for (args, name, to) in artifacts {
        let from = build(root, args, name)?;
        let dst = out.join(to);
        std::fs::copy(&from, &dst).with_context(|| format!("copying {}", from.display()))?;
        // Debug info and symbols are most of the size; the bundle travels under a 64 MiB limit.
        let _ = Command::new("strip").arg(&dst).status();
    }
    for f in ["run.sh", "torch_gpu.py"] {
        std::fs::copy(root.join("xtask/device").join(f), out.join(f))?;
    }
    // The working tree travels too (about 35 MiB with the fixtures), and with the 40 MiB bundle
    // beside it the whole would pass the device tool's 64 MiB limit: the bundle goes as one
    // gzip file (about 12 MiB) that the device command unpacks before running run.sh.
    let tarball = out.with_extension("tar.gz");
    let dir = out.file_name().context("bundle folder name")?;
    let status = Command::new("tar")
        .arg("-czf")
        .arg(&tarball)
        .arg("-C")
        .arg(out.parent().context("bundle folder parent")?)
        .arg(dir)
        .status()
        .context("running tar")?;
    if !status.success() {
        bail!("tar -czf {} failed", tarball.display());
    }
    let size = std::fs::metadata(&tarball)?.len();
    let rel = |p: &Path| p.strip_prefix(root).unwrap_or(p).display().to_string();
    println!(
        "device bundle: {} ({:.1} MiB): carry it and run `tar -xzf {} -C {} && bash {}/run.sh` there",
        rel(&tarball),
        size as f64 / (1024.0 * 1024.0),
        rel(&tarball),
        rel(out.parent().unwrap_or(root)),
        rel(&out),
    );
    Ok(())
}
