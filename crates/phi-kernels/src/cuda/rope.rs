//! Rotary embedding, rotate-half form, from f32 cos/sin tables (`kernels/rope.cu`).

use super::{check_len, int, require, Arg, Device, DevicePtr, Family};
use crate::Result;
use half::bf16;

/// In place over `rows` rows of `heads · head_dim` values `row_stride` apart; `cos`/`sin` are
/// `[rows, head_dim]` (as [`crate::cpu::rope`] takes them, scaling included).
#[allow(clippy::too_many_arguments)]
pub fn rope_bf16(
    dev: &Device,
    x: &mut impl DevicePtr<bf16>,
    rows: usize,
    row_stride: usize,
    heads: usize,
    head_dim: usize,
    cos: &impl DevicePtr<f32>,
    sin: &impl DevicePtr<f32>,
) -> Result<()> {
    const K: &str = "rope_bf16";
    require(
        K,
        head_dim.is_multiple_of(2) && row_stride >= heads * head_dim,
        || {
            format!(
                "head_dim {head_dim} must be even and row_stride {row_stride} >= heads*head_dim"
            )
        },
    )?;
    if rows == 0 {
        return Ok(());
    }
    check_len(K, "x", x, (rows - 1) * row_stride + heads * head_dim)?;
    check_len(K, "cos", cos, rows * head_dim)?;
    check_len(K, "sin", sin, rows * head_dim)?;
    let pairs = heads * head_dim / 2;
    let args = [
        Arg::Ptr(dev.ptr(x)),
        Arg::I32(int(K, "row_stride", row_stride)?),
        Arg::I32(int(K, "heads", heads)?),
        Arg::I32(int(K, "head_dim", head_dim)?),
        Arg::Ptr(dev.ptr(cos)),
        Arg::Ptr(dev.ptr(sin)),
    ];
    dev.launch(
        Family::Rope,
        K,
        (pairs.div_ceil(128) as u32, int(K, "rows", rows)? as u32, 1),
        128,
        0,
        &args,
    )
}
