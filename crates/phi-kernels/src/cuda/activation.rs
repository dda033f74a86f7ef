//! QuickGELU, GELU (erf), SiLU-and-multiply and the residual add (`kernels/activation.cu`).

use super::{check_len, int, Arg, Device, DevicePtr, Family};
use crate::Result;
use half::bf16;

const BLOCK: u32 = 256;

fn map(
    dev: &Device,
    name: &'static str,
    x: &impl DevicePtr<bf16>,
    y: &impl DevicePtr<bf16>,
    n: usize,
) -> Result<()> {
    check_len(name, "x", x, n)?;
    check_len(name, "y", y, n)?;
    let grid = n.div_ceil(8).div_ceil(BLOCK as usize) as u32;
    let args = [
        Arg::Ptr(dev.ptr(x)),
        Arg::Ptr(dev.ptr(y)),
        Arg::I64(n as i64),
    ];
    dev.launch(Family::Activation, name, (grid, 1, 1), BLOCK, 0, &args)
}

/// `y[..n] = quick_gelu(x[..n])`; `x` and `y` may be the same buffer.
pub fn quick_gelu_bf16(
    dev: &Device,
    x: &impl DevicePtr<bf16>,
    y: &impl DevicePtr<bf16>,
    n: usize,
) -> Result<()> {
    map(dev, "quick_gelu_bf16", x, y, n)
}

/// `y[..n] = gelu_erf(x[..n])`; `x` and `y` may be the same buffer.
pub fn gelu_bf16(
    dev: &Device,
    x: &impl DevicePtr<bf16>,
    y: &impl DevicePtr<bf16>,
    n: usize,
) -> Result<()> {
    map(dev, "gelu_bf16", x, y, n)
}

/// `y[..n] += x[..n]`.
pub fn add_bf16(
    dev: &Device,
    x: &impl DevicePtr<bf16>,
    y: &mut impl DevicePtr<bf16>,
    n: usize,
) -> Result<()> {
    map(dev, "add_bf16", x, y, n)
}

/// `out[r, i] = silu(gu[r, i]) · gu[r, inter + i]` for `rows` rows (gate first, then up).
pub fn silu_mul_bf16(
    dev: &Device,
    gu: &impl DevicePtr<bf16>,
    out: &mut impl DevicePtr<bf16>,
    rows: usize,
    inter: usize,
) -> Result<()> {
    const K: &str = "silu_mul_bf16";
    check_len(K, "gate_up", gu, rows * 2 * inter)?;
    check_len(K, "out", out, rows * inter)?;
    let grid = (
        inter.div_ceil(8).div_ceil(BLOCK as usize) as u32,
        int(K, "rows", rows)? as u32,
        1,
    );
    let args = [
        Arg::Ptr(dev.ptr(gu)),
        Arg::Ptr(dev.ptr(out)),
        Arg::I32(int(K, "inter", inter)?),
    ];
    dev.launch(Family::Activation, K, grid, BLOCK, 0, &args)
}
