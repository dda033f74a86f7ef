//! `cargo xtask fixtures`: regenerate `fixtures/` (tiny random-weight checkpoint in the real
//! Phi-3-vision layout, synthetic images and golden tensors from the reference Python code).
//!
//! The reference environment is the one pinned by the Phi-3-vision README (torch 2.3.0,
//! torchvision 0.18.0, transformers 4.40.2, Pillow 10.3.0), installed from PyPI into `.pyref/`
//! (gitignored) from `xtask/python/requirements.txt`. The install is skipped when
//! `.pyref/requirements.stamp` holds the same requirements text, so editing the pins reinstalls.
//! The first install downloads about 2.7 GB (torch's PyPI wheel pulls its CUDA runtime wheels,
//! which `import torch` needs even on a CPU-only machine) and takes about 3 minutes.
//!
//! transformers 4.40.2 has no Phi-3 model, so the decoder goldens come from transformers 4.41.2's
//! `Phi3ForCausalLM`, pinned in `xtask/python/requirements-phi3.txt` and installed with
//! `--no-deps --target .pyref/transformers-phi3` (a 9 MB wheel, 91 MB installed), leaving the
//! venv's 4.40.2 alone. `xtask/python/phi3_reference.py` runs it in a process of its own. The same
//! stamp rule applies (`.pyref/requirements-phi3.stamp`); a stale install is removed first.
//!
//! The generators are `xtask/python/make_fixtures.py` and, for the processor's Pillow cases,
//! `crates/phi3v/tests/data/pillow/make_fixtures.py`; the first it needs the real tokenizer files in
//! `../shared/phi3v-tokenizer` (next to the repository root). The Rust tests only read the
//! committed `fixtures/` and never need Python.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

pub(crate) const VENV: &str = ".pyref";
const REQUIREMENTS: &str = "xtask/python/requirements.txt";
const SCRIPT: &str = "xtask/python/make_fixtures.py";
/// Pillow-only decode/resize/HD cases for the processor tests, written next to the script.
const PILLOW_SCRIPT: &str = "crates/phi3v/tests/data/pillow/make_fixtures.py";
const STAMP: &str = "requirements.stamp";
const PHI3_REQUIREMENTS: &str = "xtask/python/requirements-phi3.txt";
/// Under `.pyref/`; `xtask/python/phi3_reference.py` looks here.
pub(crate) const PHI3_SITE: &str = "transformers-phi3";
const PHI3_STAMP: &str = "requirements-phi3.stamp";

/// Create or update the reference venv, then regenerate `fixtures/` under `root`.
pub fn run(root: &Path) -> Result<()> {
    let tokenizer = root.join("../shared/phi3v-tokenizer");
    if !tokenizer.join("tokenizer.json").is_file() {
        bail!(
            "the real Phi-3-vision tokenizer is missing: expected {}/tokenizer.json \
             (shared/ must sit next to the repository root)",
            tokenizer.display()
        );
    }
    let python = ensure_venv(root)?;
    ensure_phi3(root, &python)?;
    let status = Command::new(&python)
        .current_dir(root)
        .arg(SCRIPT)
        .args(["--out", "fixtures", "--tokenizer"])
        .arg(&tokenizer)
        .status()
        .with_context(|| format!("failed to start {}", python.display()))?;
    if !status.success() {
        bail!("{SCRIPT} failed ({status})");
    }
    run_checked(Command::new(&python).current_dir(root).arg(PILLOW_SCRIPT))?;
    Ok(())
}

/// Returns the venv's python, installing the pinned requirements if the stamp is stale.
/// Also used by `cargo xtask bench --compare torch`.
pub(crate) fn ensure_venv(root: &Path) -> Result<std::path::PathBuf> {
    let venv = root.join(VENV);
    let python = venv.join("bin/python");
    let requirements = fs::read_to_string(root.join(REQUIREMENTS))
        .with_context(|| format!("reading {REQUIREMENTS}"))?;
    let stamp = venv.join(STAMP);
    if python.is_file() && fs::read_to_string(&stamp).ok().as_deref() == Some(requirements.as_str())
    {
        return Ok(python);
    }
    if !python.is_file() {
        // PHI3V_PYTHON picks the interpreter that creates the venv (torch 2.3.0 has wheels for
        // CPython 3.8-3.12); default: python3 on PATH.
        let base = std::env::var("PHI3V_PYTHON").unwrap_or_else(|_| "python3".to_string());
        eprintln!("fixtures: creating {VENV} with {base}");
        run_checked(
            Command::new(&base)
                .current_dir(root)
                .args(["-m", "venv", VENV]),
        )?;
    }
    eprintln!(
        "fixtures: installing {REQUIREMENTS} into {VENV} (first time: ~2.7 GB, a few minutes)"
    );
    let _ = fs::remove_file(&stamp);
    run_checked(Command::new(&python).current_dir(root).args([
        "-m",
        "pip",
        "install",
        "--progress-bar",
        "off",
        "-r",
        REQUIREMENTS,
    ]))?;
    fs::write(&stamp, &requirements).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(python)
}

/// Installs the decoder reference's transformers into `.pyref/transformers-phi3` (pip `--target`,
/// no dependencies: the venv's pins satisfy them) unless the stamp is current.
pub(crate) fn ensure_phi3(root: &Path, python: &Path) -> Result<()> {
    let venv = root.join(VENV);
    let site = venv.join(PHI3_SITE);
    let requirements = fs::read_to_string(root.join(PHI3_REQUIREMENTS))
        .with_context(|| format!("reading {PHI3_REQUIREMENTS}"))?;
    let stamp = venv.join(PHI3_STAMP);
    if site.join("transformers").is_dir()
        && fs::read_to_string(&stamp).ok().as_deref() == Some(requirements.as_str())
    {
        return Ok(());
    }
    eprintln!("fixtures: installing {PHI3_REQUIREMENTS} into {VENV}/{PHI3_SITE} (~9 MB)");
    let _ = fs::remove_file(&stamp);
    if site.exists() {
        // pip --target will not replace what is already there.
        fs::remove_dir_all(&site).with_context(|| format!("removing {}", site.display()))?;
    }
    run_checked(Command::new(python).current_dir(root).args([
        "-m",
        "pip",
        "install",
        "--progress-bar",
        "off",
        "--no-deps",
        "--require-hashes",
        "--target",
        &format!("{VENV}/{PHI3_SITE}"),
        "-r",
        PHI3_REQUIREMENTS,
    ]))?;
    fs::write(&stamp, &requirements).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}
