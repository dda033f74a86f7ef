//! `cargo xtask bench --serve`: a load test of `phi3v serve` on loopback. Builds the release
//! binary, starts it on a free port, warms it up, then runs rounds of concurrent clients (a mix
//! of text, image and streamed requests, bounded in count and in time) and reports requests/s,
//! latency percentiles, and the server's resident memory before, at peak and after each round.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use serde_json::{json, Value};

pub struct Opts {
    pub model: PathBuf,
    pub image: PathBuf,
    pub clients: usize,
    pub requests: usize,
    pub rounds: usize,
    /// Each round stops sending new requests after this long.
    pub seconds: u64,
    pub max_tokens: usize,
}

/// `key` of `/proc/<pid>/status` (VmRSS, VmHWM), in bytes.
pub fn proc_status_bytes(pid: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

pub fn run(root: &Path, o: Opts) -> Result<()> {
    let status = Command::new(env!("CARGO"))
        .current_dir(root)
        .args(["build", "--release", "-p", "phi3v", "--bin", "phi3v"])
        .status()
        .context("building phi3v")?;
    if !status.success() {
        bail!("cargo build -p phi3v failed");
    }
    let bin = root.join("target/release/phi3v");
    let mut child = Command::new(&bin)
        .args(["serve", "--port", "0", "--served-model-name", "load"])
        .arg("--model")
        .arg(&o.model)
        .args(["--device", "cpu", "--queue-size"])
        .arg((o.clients * 2).to_string())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stderr = child.stderr.take().expect("piped");
    let server = Server(child);
    let pid = server.0.id().to_string();
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let Some(line) = lines.next() else {
            bail!("phi3v serve exited before listening")
        };
        let line = line?;
        if let Some(rest) = line.strip_prefix("serving load on http://") {
            break rest
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_string();
        }
    };
    // Keep draining the server's stderr so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    let url = format!("http://{addr}/v1/chat/completions");

    let image = std::fs::read(&o.image).with_context(|| o.image.display().to_string())?;
    let data_url = format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(&image)
    );
    let body = |i: usize| -> String {
        let text =
            json!({"role": "user", "content": format!("Say something about the number {i}.")});
        let img = json!({"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": "What is shown?"},
        ]});
        let msg = if i.is_multiple_of(4) { img } else { text };
        json!({"messages": [msg], "max_tokens": o.max_tokens, "stream": i.is_multiple_of(3),
               "temperature": 0.7, "seed": i})
        .to_string()
    };
    let post = |b: &str| -> (u16, f64) {
        let t = Instant::now();
        let r = ureq::post(&url)
            .set("content-type", "application/json")
            .timeout(Duration::from_secs(600))
            .send_string(b);
        let status = match r {
            Ok(r) => {
                let s = r.status();
                let _ = r.into_string();
                s
            }
            Err(ureq::Error::Status(s, _)) => s,
            Err(_) => 0,
        };
        (status, t.elapsed().as_secs_f64())
    };
    let health = || -> Result<Value> {
        Ok(ureq::get(&format!("http://{addr}/health"))
            .call()?
            .into_json()?)
    };
    let settle = || -> Result<()> {
        let t0 = Instant::now();
        loop {
            let h = health()?;
            if h["requests"]["active"] == 0 && h["requests"]["waiting"] == 0 {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(600) {
                bail!("the server never went idle: {h}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Warm-up: one request of each kind, so lazily made buffers exist before the baseline.
    for i in 0..4 {
        post(&body(i));
    }
    settle()?;
    std::thread::sleep(Duration::from_millis(500));
    let baseline = proc_status_bytes(&pid, "VmRSS:").unwrap_or(0);
    println!(
        "phi3v serve load test: {} clients, up to {} requests or {} s per round, max_tokens {}, model {}",
        o.clients,
        o.requests,
        o.seconds,
        o.max_tokens,
        o.model.display()
    );
    println!(
        "| round | requests | ok | 429 | other | req/s | p50 s | p99 s | RSS peak MiB | RSS after MiB (baseline {:.0}) |",
        mib(baseline)
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for round in 1..=o.rounds {
        let next = AtomicUsize::new(0);
        let deadline = Instant::now() + Duration::from_secs(o.seconds);
        let peak = std::sync::atomic::AtomicU64::new(0);
        let done = std::sync::atomic::AtomicBool::new(false);
        let t0 = Instant::now();
        let results: Vec<(u16, f64)> = std::thread::scope(|sc| {
            sc.spawn(|| {
                while !done.load(Ordering::Relaxed) {
                    if let Some(r) = proc_status_bytes(&pid, "VmRSS:") {
                        peak.fetch_max(r, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            let hs: Vec<_> = (0..o.clients)
                .map(|_| {
                    sc.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= o.requests || Instant::now() > deadline {
                                return mine;
                            }
                            mine.push(post(&body(i)));
                        }
                    })
                })
                .collect();
            let all = hs
                .into_iter()
                .flat_map(|h| h.join().expect("client thread"))
                .collect();
            done.store(true, Ordering::Relaxed);
            all
        });
        let wall = t0.elapsed().as_secs_f64();
        settle()?;
        std::thread::sleep(Duration::from_secs(1));
        let after = proc_status_bytes(&pid, "VmRSS:").unwrap_or(0);
        let ok: Vec<f64> = results.iter().filter(|r| r.0 == 200).map(|r| r.1).collect();
        let busy = results.iter().filter(|r| r.0 == 429).count();
        let mut lat = ok.clone();
        lat.sort_by(f64::total_cmp);
        println!(
            "| {round} | {} | {} | {busy} | {} | {:.2} | {:.3} | {:.3} | {:.0} | {:.0} ({:+.0}) |",
            results.len(),
            ok.len(),
            results.len() - ok.len() - busy,
            ok.len() as f64 / wall,
            percentile(&lat, 0.5),
            percentile(&lat, 0.99),
            mib(peak.load(Ordering::Relaxed)),
            mib(after),
            mib(after) - mib(baseline),
        );
    }
    let h = health()?;
    println!("server counters: {}", h["requests"]);
    println!("feature cache: {}", h["feature_cache"]);
    Ok(())
}
