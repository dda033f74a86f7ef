//! Appending keys or values to a head-major KV cache (`kernels/kv_cache.cu`).

use super::{check_len, int, require, Arg, Device, DevicePtr, Family};
use crate::Result;
use half::bf16;

/// `cache[h, pos0 + r, :] = src[r, h·head_dim ..][..head_dim]` for `rows` rows of `src`
/// (`src_row_stride` apart) and every head; the cache is `[heads, capacity, head_dim]`.
#[allow(clippy::too_many_arguments)]
pub fn kv_cache_write_bf16(
    dev: &Device,
    src: &impl DevicePtr<bf16>,
    src_row_stride: usize,
    rows: usize,
    cache: &mut impl DevicePtr<bf16>,
    heads: usize,
    capacity: usize,
    head_dim: usize,
    pos0: usize,
) -> Result<()> {
    const K: &str = "kv_cache_write_bf16";
    require(
        K,
        head_dim.is_multiple_of(8)
            && src_row_stride.is_multiple_of(8)
            && src_row_stride >= heads * head_dim,
        || {
            format!("head_dim {head_dim} and src_row_stride {src_row_stride} must be multiples of 8, stride >= heads*head_dim")
        },
    )?;
    require(K, pos0 + rows <= capacity, || {
        format!(
            "positions {pos0}..{} exceed the cache's capacity {capacity}",
            pos0 + rows
        )
    })?;
    if rows == 0 || heads == 0 {
        return Ok(());
    }
    check_len(
        K,
        "src",
        src,
        (rows - 1) * src_row_stride + heads * head_dim,
    )?;
    check_len(K, "cache", cache, heads * capacity * head_dim)?;
    let args = [
        Arg::Ptr(dev.ptr(src)),
        Arg::I32(int(K, "src_row_stride", src_row_stride)?),
        Arg::Ptr(dev.ptr(cache)),
        Arg::I64((capacity * head_dim) as i64),
        Arg::I32(int(K, "head_dim", head_dim)?),
        Arg::I32(int(K, "pos0", pos0)?),
    ];
    let grid = (
        int(K, "rows", rows)? as u32,
        int(K, "heads", heads)? as u32,
        1,
    );
    dev.launch(Family::KvCache, K, grid, 32, 0, &args)
}
