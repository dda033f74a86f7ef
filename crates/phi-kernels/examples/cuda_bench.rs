//! GPU kernel timings at the model's shapes, one table: op, shape, time, TFLOP/s or TB/s, and
//! the share of a ceiling measured in the same run — cuBLAS (`torch.matmul`) or torch's
//! `scaled_dot_product_attention` for the same shape when `cuda_bench torch.json` is given
//! (written by `torch_gpu.py` in the device bundle), else the device-to-device copy bandwidth
//! measured here for the memory-bound rows.
//!
//! `cargo run --release -p phi-kernels --features cuda --example cuda_bench [torch.json]`

use std::collections::HashMap;

use half::bf16;
use phi_kernels::cpu::Activation;
use phi_kernels::cuda::{self, AttnShape, CudaSlice, Device, Epilogue};

fn random_bf16(dev: &Device, n: usize, scale: f32) -> CudaSlice<bf16> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64;
    let host: Vec<bf16> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            bf16::from_f32(((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale)
        })
        .collect();
    dev.upload(&host).expect("upload")
}

struct Row {
    op: String,
    shape: String,
    seconds: f64,
    flops: f64,
    bytes: f64,
}

fn main() {
    if let Err(e) = run() {
        eprintln!("cuda_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> phi_kernels::Result<()> {
    let torch: HashMap<String, f64> = std::env::args()
        .nth(1)
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let dev = Device::new(0)?;
    println!("device: {} ({})", dev.describe(), dev.image_kind());
    let mut rows: Vec<Row> = Vec::new();

    // The copy ceiling: 1 GiB device to device (read + write counted).
    let n = 1usize << 29;
    let src = random_bf16(&dev, n, 1.0);
    let mut dst: CudaSlice<bf16> = dev.zeros(n)?;
    let t = dev.time(10, || dev.copy(&src, &mut dst))?;
    let copy_bw = 2.0 * n as f64 * 2.0 / t;
    rows.push(Row {
        op: "copy".into(),
        shape: format!("{n}"),
        seconds: t,
        flops: 0.0,
        bytes: 2.0 * n as f64 * 2.0,
    });
    drop((src, dst));

    // GEMMs: CLIP (17 crops × 577 rows), projector, decoder prefill, decode GEMVs.
    let gemms: [(&str, usize, usize, usize); 14] = [
        ("clip_qkv", 9809, 3072, 1024),
        ("clip_out", 9809, 1024, 1024),
        ("clip_fc1", 9809, 4096, 1024),
        ("clip_fc2", 9809, 1024, 4096),
        ("proj_fc0", 2509, 3072, 4096),
        ("proj_fc2", 2509, 3072, 3072),
        ("qkv_proj", 757, 9216, 3072),
        ("gate_up_proj", 757, 16384, 3072),
        ("down_proj", 757, 3072, 8192),
        ("gate_up_proj", 2509, 16384, 3072),
        ("gemv_qkv", 1, 9216, 3072),
        ("gemv_gate_up", 1, 16384, 3072),
        ("gemv_down", 1, 3072, 8192),
        ("gemv_lm_head", 1, 32064, 3072),
    ];
    for (name, m, n, k) in gemms {
        let a = random_bf16(&dev, m * k, 1.0);
        let b = random_bf16(&dev, n * k, 0.05);
        let mut c: CudaSlice<bf16> = dev.zeros(m * n)?;
        let ep = Epilogue {
            activation: if name.ends_with("fc1") {
                Activation::QuickGelu
            } else {
                Activation::Identity
            },
            ..Epilogue::default()
        };
        let iters = if m == 1 { 200 } else { 20 };
        let t = dev.time(iters, || {
            cuda::gemm_bf16(&dev, &a, k, &b, &mut c, n, m, n, k, false, &ep)
        })?;
        rows.push(Row {
            op: name.into(),
            shape: format!("{m}x{n}x{k}"),
            seconds: t,
            flops: 2.0 * (m * n * k) as f64,
            bytes: 2.0 * (n * k + m * k + m * n) as f64,
        });
    }

    // Attention: CLIP (17 crops, 16 heads, d = 64), causal prefill (32 heads, d = 96), decode.
    for (name, batch, heads, len, d, causal) in [
        ("attn_clip", 17, 16, 577, 64, false),
        ("attn_prefill", 1, 32, 757, 96, true),
        ("attn_prefill", 1, 32, 2509, 96, true),
    ] {
        let width = heads * d;
        let q = random_bf16(&dev, batch * len * width, 1.0);
        let mut o: CudaSlice<bf16> = dev.zeros(batch * len * width)?;
        let s = AttnShape {
            batch,
            heads,
            q_len: len,
            kv_len: len,
            head_dim: d,
            causal,
            scale: 1.0 / (d as f32).sqrt(),
            q_off: 0,
            k_off: 0,
            v_off: 0,
            q_batch_stride: len * width,
            q_row_stride: width,
            kv_batch_stride: len * width,
            kv_row_stride: width,
            o_batch_stride: len * width,
            o_row_stride: width,
        };
        let t = dev.time(20, || cuda::flash_attn_bf16(&dev, &q, &q, &q, &mut o, &s))?;
        let pairs = if causal {
            (len * (len + 1) / 2) as f64
        } else {
            (len * len) as f64
        };
        rows.push(Row {
            op: name.into(),
            shape: format!("{batch}x{heads}x{len}x{d}"),
            seconds: t,
            flops: 4.0 * batch as f64 * heads as f64 * pairs * d as f64,
            bytes: 0.0,
        });
    }
    for kv_len in [757usize, 4096] {
        let (heads, d, cap) = (32, 96, 4096);
        let q = random_bf16(&dev, heads * d, 1.0);
        let kc = random_bf16(&dev, heads * cap * d, 1.0);
        let vc = random_bf16(&dev, heads * cap * d, 1.0);
        let mut o: CudaSlice<bf16> = dev.zeros(heads * d)?;
        let splits = kv_len.div_ceil(256);
        let t = dev.time(200, || {
            cuda::flash_decode_bf16(
                &dev,
                &q,
                &kc,
                &vc,
                &mut o,
                heads,
                kv_len,
                d,
                cap * d,
                splits,
                0.1,
            )
        })?;
        rows.push(Row {
            op: "attn_decode".into(),
            shape: format!("{heads}x{kv_len}x{d}"),
            seconds: t,
            flops: 0.0,
            bytes: 2.0 * 2.0 * (heads * kv_len * d) as f64,
        });
    }

    // Memory-bound element-wise and norm kernels.
    let (m, w) = (9809, 1024);
    let x = random_bf16(&dev, m * w, 1.0);
    let wt = random_bf16(&dev, w, 1.0);
    let mut y: CudaSlice<bf16> = dev.zeros(m * w)?;
    let t = dev.time(50, || {
        cuda::layer_norm_bf16(&dev, &x, &wt, &wt, &mut y, m, w, w, 1e-5)
    })?;
    rows.push(Row {
        op: "layer_norm".into(),
        shape: format!("{m}x{w}"),
        seconds: t,
        flops: 0.0,
        bytes: 4.0 * (m * w) as f64,
    });
    let t = dev.time(50, || cuda::quick_gelu_bf16(&dev, &x, &y, m * w))?;
    rows.push(Row {
        op: "quick_gelu".into(),
        shape: format!("{}", m * w),
        seconds: t,
        flops: 0.0,
        bytes: 4.0 * (m * w) as f64,
    });
    let (m, w) = (2509, 3072);
    let x = random_bf16(&dev, m * w, 1.0);
    let wt = random_bf16(&dev, w, 1.0);
    let mut y: CudaSlice<bf16> = dev.zeros(m * w)?;
    let t = dev.time(50, || {
        cuda::rms_norm_bf16(&dev, &x, &wt, &mut y, m, w, w, 1e-5)
    })?;
    rows.push(Row {
        op: "rms_norm".into(),
        shape: format!("{m}x{w}"),
        seconds: t,
        flops: 0.0,
        bytes: 4.0 * (m * w) as f64,
    });
    let gu = random_bf16(&dev, 757 * 16384, 1.0);
    let mut h: CudaSlice<bf16> = dev.zeros(757 * 8192)?;
    let t = dev.time(50, || cuda::silu_mul_bf16(&dev, &gu, &mut h, 757, 8192))?;
    rows.push(Row {
        op: "silu_mul".into(),
        shape: "757x8192".into(),
        seconds: t,
        flops: 0.0,
        bytes: 2.0 * 3.0 * (757 * 8192) as f64,
    });

    println!(
        "{:<14} {:<18} {:>10} {:>10} {:>10} {:>12} {:>9}",
        "op", "shape", "time (us)", "TFLOP/s", "TB/s", "torch (us)", "% ceiling"
    );
    for r in &rows {
        let key = format!("{} {}", r.op, r.shape);
        let torch_t = torch.get(&key).copied();
        // Compute-bound rows against torch's time (cuBLAS / SDPA); memory-bound rows against
        // the copy bandwidth.
        let pct = match (r.flops > 0.0 && !r.op.starts_with("gemv"), torch_t) {
            (true, Some(tt)) => format!("{:.0}%", 100.0 * tt / r.seconds),
            (true, None) => "-".into(),
            (false, _) if r.op != "copy" => {
                format!("{:.0}%", 100.0 * r.bytes / r.seconds / copy_bw)
            }
            _ => "100%".into(),
        };
        println!(
            "{:<14} {:<18} {:>10.1} {:>10} {:>10} {:>12} {:>9}",
            r.op,
            r.shape,
            r.seconds * 1e6,
            if r.flops > 0.0 {
                format!("{:.1}", r.flops / r.seconds / 1e12)
            } else {
                "-".into()
            },
            if r.bytes > 0.0 {
                format!("{:.2}", r.bytes / r.seconds / 1e12)
            } else {
                "-".into()
            },
            torch_t.map_or("-".into(), |t| format!("{:.1}", t * 1e6)),
            pct
        );
    }
    Ok(())
}
