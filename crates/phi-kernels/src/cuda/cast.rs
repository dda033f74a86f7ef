//! f32 ↔ bf16 casts (`kernels/cast.cu`).

use super::{check_len, Arg, Device, DevicePtr, Family};
use crate::Result;
use half::bf16;

const BLOCK: u32 = 256;

/// One element per thread, `n` of them, from `x` into `y`.
fn cast<A, B>(
    dev: &Device,
    kernel: &'static str,
    x: &impl DevicePtr<A>,
    y: &mut impl DevicePtr<B>,
    n: usize,
) -> Result<()> {
    check_len(kernel, "x", x, n)?;
    check_len(kernel, "y", y, n)?;
    let args = [
        Arg::Ptr(dev.ptr(x)),
        Arg::Ptr(dev.ptr(y)),
        Arg::I64(n as i64),
    ];
    let grid = (n.div_ceil(BLOCK as usize) as u32, 1, 1);
    dev.launch(Family::Cast, kernel, grid, BLOCK, 0, &args)
}

/// `y[..n] = bf16(x[..n])`, round to nearest even.
pub fn cast_f32_bf16(
    dev: &Device,
    x: &impl DevicePtr<f32>,
    y: &mut impl DevicePtr<bf16>,
    n: usize,
) -> Result<()> {
    cast(dev, "cast_f32_bf16", x, y, n)
}

/// `y[..n] = f32(x[..n])`.
pub fn cast_bf16_f32(
    dev: &Device,
    x: &impl DevicePtr<bf16>,
    y: &mut impl DevicePtr<f32>,
    n: usize,
) -> Result<()> {
    cast(dev, "cast_bf16_f32", x, y, n)
}
