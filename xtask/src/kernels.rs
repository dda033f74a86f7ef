//! `cargo xtask kernels [--check]`: compiles `kernels/*.cu` to PTX and cubins with a pinned
//! CUDA toolkit from PyPI wheels (no CUDA install), writes them under `kernels/ptx/` and
//! `kernels/cubin/<arch>/`, and prints ptxas' resource report per kernel and architecture.
//! `--check` compiles into a scratch folder instead and fails when a committed file differs
//! (stale), is missing or is left over, or when any kernel spills to local memory.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The toolkit: nvcc 13.0 matches the GPU machines' driver (580, CUDA 13.0); a newer nvcc
/// writes a PTX version that driver refuses. Exact versions so every machine builds the same
/// bytes.
const WHEELS: [&str; 5] = [
    "nvidia-cuda-nvcc==13.0.88",
    "nvidia-nvvm==13.0.88",
    "nvidia-cuda-crt==13.0.88",
    "nvidia-cuda-runtime==13.0.96",
    "nvidia-cuda-cccl==13.0.85",
];

/// Cubin targets: Ampere (A100, A10/3090), Ada (L4/4090), Hopper (plain and with wgmma).
pub const ARCHS: [&str; 5] = ["sm_80", "sm_86", "sm_89", "sm_90", "sm_90a"];

const FLAGS: [&str; 2] = ["-O3", "-std=c++17"];

/// The toolkit's `nvidia/cu13` folder, installed on first use into `target/cuda-toolkit/13.0`
/// (or `$PHI3V_CUDA_TOOLKIT`).
pub fn toolkit(root: &Path) -> Result<PathBuf> {
    let base = std::env::var_os("PHI3V_CUDA_TOOLKIT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target/cuda-toolkit/13.0"));
    let home = base.join("nvidia/cu13");
    if home.join("bin/nvcc").exists() {
        return Ok(home);
    }
    eprintln!(
        "installing the CUDA 13.0 compiler wheels into {}",
        base.display()
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--root-user-action=ignore",
            "--no-deps",
        ])
        .arg("--target")
        .arg(&base)
        .args(WHEELS)
        .status()
        .context("running python3 -m pip (python3 with pip is needed to fetch nvcc)")?;
    if !status.success() || !home.join("bin/nvcc").exists() {
        bail!("installing {} failed", WHEELS.join(" "));
    }
    Ok(home)
}

/// ptxas' report for one kernel on one architecture.
#[derive(Debug)]
struct Usage {
    kernel: String,
    arch: String,
    registers: u32,
    smem: u32,
    spill_bytes: u32,
}

/// Parses `nvcc --resource-usage` output: a "Compiling entry function 'X' for 'sm_NN'" line,
/// then "N bytes spill stores, M bytes spill loads", then "Used R registers, ... S bytes smem".
fn parse_usage(text: &str, arch: &str) -> Vec<Usage> {
    let mut out: Vec<Usage> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or("?").to_string();
            out.push(Usage {
                kernel,
                arch: arch.to_string(),
                registers: 0,
                smem: 0,
                spill_bytes: 0,
            });
        } else if let Some(u) = out.last_mut() {
            let num_before = |key: &str| -> u32 {
                line.split(key)
                    .next()
                    .and_then(|head| head.split_whitespace().last())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            };
            if line.contains("spill stores") {
                u.spill_bytes =
                    num_before(" bytes spill stores") + num_before(" bytes spill loads");
            }
            if line.contains("Used ") && line.contains("registers") {
                u.registers = num_before(" registers");
                if line.contains("bytes smem") {
                    u.smem = num_before(" bytes smem");
                }
            }
        }
    }
    out
}

fn nvcc(home: &Path, dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(home.join("bin/nvcc"))
        .current_dir(dir)
        .args(FLAGS)
        .args(args)
        .env(
            "PATH",
            format!(
                "{}:{}",
                home.join("bin").display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .context("running nvcc")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        bail!("nvcc {}:\n{text}", args.join(" "));
    }
    if text.contains("warning") {
        bail!(
            "nvcc {} warns (warnings are errors here):\n{text}",
            args.join(" ")
        );
    }
    Ok(text)
}

/// Every generated file's path relative to `kernels/`.
fn generated(sources: &[String]) -> BTreeSet<PathBuf> {
    let mut set = BTreeSet::new();
    for s in sources {
        set.insert(PathBuf::from(format!("ptx/{s}.ptx")));
        for arch in ARCHS {
            set.insert(PathBuf::from(format!("cubin/{arch}/{s}.cubin")));
        }
    }
    set
}

fn files_under(dir: &Path, base: &Path, out: &mut BTreeSet<PathBuf>) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    for e in fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            files_under(&p, base, out)?;
        } else {
            out.insert(p.strip_prefix(base).expect("under base").to_path_buf());
        }
    }
    Ok(())
}

pub fn run(root: &Path, check: bool) -> Result<()> {
    let kdir = root.join("kernels");
    let mut sources: Vec<String> = fs::read_dir(&kdir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".cu"))
                .map(String::from)
        })
        .collect();
    sources.sort();
    if sources.is_empty() {
        bail!("no .cu sources in {}", kdir.display());
    }
    let home = toolkit(root)?;
    let out_dir = if check {
        root.join("target/kernels-check")
    } else {
        kdir.clone()
    };
    if check {
        let _ = fs::remove_dir_all(&out_dir);
    }
    fs::create_dir_all(out_dir.join("ptx"))?;
    for arch in ARCHS {
        fs::create_dir_all(out_dir.join("cubin").join(arch))?;
    }

    // Compile everything; sources are given by relative name from kernels/ so no absolute path
    // can end up in the output.
    // One job per (source, target), spread over the cores; reports kept in a fixed order.
    let jobs: Vec<(&String, Option<&str>)> = sources
        .iter()
        .flat_map(|s| std::iter::once((s, None)).chain(ARCHS.iter().map(move |a| (s, Some(*a)))))
        .collect();
    let compile = |(s, arch): (&String, Option<&str>)| -> Result<Vec<Usage>> {
        let src = format!("{s}.cu");
        match arch {
            None => {
                let ptx = out_dir.join(format!("ptx/{s}.ptx"));
                nvcc(
                    &home,
                    &kdir,
                    &[
                        "-ptx",
                        "-arch=compute_80",
                        &src,
                        "-o",
                        ptx.to_str().unwrap(),
                    ],
                )?;
                Ok(Vec::new())
            }
            Some(arch) => {
                let cubin = out_dir.join(format!("cubin/{arch}/{s}.cubin"));
                let text = nvcc(
                    &home,
                    &kdir,
                    &[
                        "-cubin",
                        "--resource-usage",
                        &format!("-arch={arch}"),
                        &src,
                        "-o",
                        cubin.to_str().unwrap(),
                    ],
                )?;
                Ok(parse_usage(&text, arch))
            }
        }
    };
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<Result<Vec<Usage>>>>> =
        jobs.iter().map(|_| std::sync::Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= jobs.len() {
                    break;
                }
                *results[i].lock().unwrap() = Some(compile(jobs[i]));
            });
        }
    });
    let mut usage = Vec::new();
    for r in results {
        usage.extend(r.into_inner().unwrap().expect("every job ran")?);
    }

    println!(
        "{:<34} {:<7} {:>5} {:>9} {:>7}",
        "kernel", "arch", "regs", "smem (B)", "spills"
    );
    for u in &usage {
        println!(
            "{:<34} {:<7} {:>5} {:>9} {:>7}",
            u.kernel, u.arch, u.registers, u.smem, u.spill_bytes
        );
    }
    let spills: Vec<String> = usage
        .iter()
        .filter(|u| u.spill_bytes > 0)
        .map(|u| format!("{} on {} ({} bytes)", u.kernel, u.arch, u.spill_bytes))
        .collect();

    let want = generated(&sources);
    let mut problems = Vec::new();
    let mut have = BTreeSet::new();
    files_under(&kdir.join("ptx"), &kdir, &mut have)?;
    files_under(&kdir.join("cubin"), &kdir, &mut have)?;
    for extra in have.difference(&want) {
        if check {
            problems.push(format!(
                "kernels/{} has no source (left over)",
                extra.display()
            ));
        } else {
            fs::remove_file(kdir.join(extra))?;
        }
    }
    if check {
        for f in &want {
            let fresh = fs::read(out_dir.join(f))?;
            match fs::read(kdir.join(f)) {
                Ok(old) if old == fresh => {}
                Ok(_) => problems.push(format!("kernels/{} is stale", f.display())),
                Err(_) => problems.push(format!("kernels/{} is missing", f.display())),
            }
        }
    }
    if !spills.is_empty() {
        problems.push(format!(
            "kernels spill to local memory: {}",
            spills.join(", ")
        ));
    }
    if !problems.is_empty() {
        bail!(
            "{}{}",
            problems.join("\n"),
            if check {
                "\n(run `cargo xtask kernels` and commit the result)"
            } else {
                ""
            }
        );
    }
    println!(
        "{} sources, {} kernels × {} architectures: {}",
        sources.len(),
        usage.len() / ARCHS.len(),
        ARCHS.len(),
        if check {
            "committed PTX and cubins are up to date, no spills"
        } else {
            "written under kernels/"
        }
    );
    Ok(())
}
