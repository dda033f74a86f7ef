//! LayerNorm (two-pass) and RMSNorm with the reference's two roundings (`kernels/norm.cu`).

use super::{check_len, int, Arg, Device, DevicePtr, Family};
use crate::Result;
use half::bf16;

const BLOCK: u32 = 256;

fn rows_check(
    k: &'static str,
    x: &impl DevicePtr<bf16>,
    out: &impl DevicePtr<bf16>,
    rows: usize,
    width: usize,
    ld: usize,
) -> Result<()> {
    super::require(k, ld >= width && width > 0 && width <= 12 * 1024, || {
        format!("width {width} (1..=12288) and ld {ld} >= width")
    })?;
    let need = if rows == 0 {
        0
    } else {
        (rows - 1) * ld + width
    };
    check_len(k, "x", x, need)?;
    check_len(k, "out", out, need)
}

/// `out[r] = layer_norm(x[r]) · weight + bias` over `rows` rows of `width`, `ld` apart.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_bf16(
    dev: &Device,
    x: &impl DevicePtr<bf16>,
    weight: &impl DevicePtr<bf16>,
    bias: &impl DevicePtr<bf16>,
    out: &mut impl DevicePtr<bf16>,
    rows: usize,
    width: usize,
    ld: usize,
    eps: f32,
) -> Result<()> {
    const K: &str = "layer_norm_bf16";
    rows_check(K, x, out, rows, width, ld)?;
    check_len(K, "weight", weight, width)?;
    check_len(K, "bias", bias, width)?;
    let args = [
        Arg::Ptr(dev.ptr(x)),
        Arg::Ptr(dev.ptr(weight)),
        Arg::Ptr(dev.ptr(bias)),
        Arg::Ptr(dev.ptr(out)),
        Arg::I32(width as i32),
        Arg::I32(int(K, "ld", ld)?),
        Arg::F32(eps),
    ];
    dev.launch(
        Family::Norm,
        K,
        (rows as u32, 1, 1),
        BLOCK,
        (width * 4) as u32,
        &args,
    )
}

/// `out[r] = weight · bf16(x[r] · rsqrt(mean(x[r]²) + eps))` (spec §5.5).
#[allow(clippy::too_many_arguments)]
pub fn rms_norm_bf16(
    dev: &Device,
    x: &impl DevicePtr<bf16>,
    weight: &impl DevicePtr<bf16>,
    out: &mut impl DevicePtr<bf16>,
    rows: usize,
    width: usize,
    ld: usize,
    eps: f32,
) -> Result<()> {
    const K: &str = "rms_norm_bf16";
    rows_check(K, x, out, rows, width, ld)?;
    check_len(K, "weight", weight, width)?;
    let args = [
        Arg::Ptr(dev.ptr(x)),
        Arg::Ptr(dev.ptr(weight)),
        Arg::Ptr(dev.ptr(out)),
        Arg::I32(width as i32),
        Arg::I32(int(K, "ld", ld)?),
        Arg::F32(eps),
    ];
    dev.launch(
        Family::Norm,
        K,
        (rows as u32, 1, 1),
        BLOCK,
        (width * 4) as u32,
        &args,
    )
}
