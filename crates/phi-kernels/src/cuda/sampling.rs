//! Greedy and top-k / top-p sampling on the device (`kernels/sampling.cu`).

use super::{check_len, int, require, Arg, Device, DevicePtr, Family};
use crate::Result;

/// `out[r]` = first index of the largest of row `r` of `logits [rows, vocab]`.
pub fn argmax_f32(
    dev: &Device,
    logits: &impl DevicePtr<f32>,
    rows: usize,
    vocab: usize,
    out: &mut impl DevicePtr<i32>,
) -> Result<()> {
    const K: &str = "argmax_f32";
    check_len(K, "logits", logits, rows * vocab)?;
    check_len(K, "out", out, rows)?;
    let args = [
        Arg::Ptr(dev.ptr(logits)),
        Arg::I32(int(K, "vocab", vocab)?),
        Arg::Ptr(dev.ptr(out)),
    ];
    dev.launch(Family::Sampling, K, (rows as u32, 1, 1), 1024, 0, &args)
}

/// One token from `logits [vocab]` at `temperature` (> 0), keeping the `top_k` best (0: all)
/// and then the smallest set holding `top_p` of their mass; `u` in `[0, 1)` is the draw.
#[allow(clippy::too_many_arguments)]
pub fn sample_f32(
    dev: &Device,
    logits: &impl DevicePtr<f32>,
    vocab: usize,
    temperature: f32,
    top_k: usize,
    top_p: f32,
    u: f32,
    out: &mut impl DevicePtr<i32>,
) -> Result<()> {
    const K: &str = "sample_f32";
    require(
        K,
        temperature > 0.0 && top_p > 0.0 && top_p <= 1.0 && (0.0..1.0).contains(&u),
        || {
            format!(
                "temperature {temperature} must be > 0, top_p {top_p} in (0, 1], u {u} in [0, 1)"
            )
        },
    )?;
    check_len(K, "logits", logits, vocab)?;
    check_len(K, "out", out, 1)?;
    let args = [
        Arg::Ptr(dev.ptr(logits)),
        Arg::I32(int(K, "vocab", vocab)?),
        Arg::F32(1.0 / temperature),
        Arg::I32(int(K, "top_k", top_k)?),
        Arg::F32(top_p),
        Arg::F32(u),
        Arg::Ptr(dev.ptr(out)),
    ];
    dev.launch(Family::Sampling, K, (1, 1, 1), 1024, 0, &args)
}
