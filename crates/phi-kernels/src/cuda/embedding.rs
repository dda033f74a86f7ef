//! Embedding gather and row scatter (`kernels/embedding.cu`).

use super::{check_len, int, require, Arg, Device, DevicePtr, Family};
use crate::Result;
use half::bf16;

const BLOCK: u32 = 256;

/// `out[t] = table[ids[t]]` for `ids.len()` tokens; `vocab` rows of `width` in `table`. Ids
/// are checked here, on the host, before they reach the device.
pub fn embedding_bf16(
    dev: &Device,
    ids: &[u32],
    table: &impl DevicePtr<bf16>,
    width: usize,
    out: &mut impl DevicePtr<bf16>,
) -> Result<()> {
    const K: &str = "embedding_bf16";
    require(K, width.is_multiple_of(8) && width > 0, || {
        format!("width {width} is not a positive multiple of 8")
    })?;
    let vocab = table.len() / width;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= vocab) {
        return Err(crate::Error::CudaArgs {
            kernel: K,
            msg: format!("token id {bad} out of range for a vocabulary of {vocab}"),
        });
    }
    check_len(K, "out", out, ids.len() * width)?;
    let d_ids = dev.upload(ids)?;
    let args = [
        Arg::Ptr(dev.ptr(&d_ids)),
        Arg::Ptr(dev.ptr(table)),
        Arg::Ptr(dev.ptr(out)),
        Arg::I32(int(K, "width", width)?),
    ];
    dev.launch(
        Family::Embedding,
        K,
        (ids.len() as u32, 1, 1),
        BLOCK,
        0,
        &args,
    )
}

/// `dst[rows[i]] = src[i]`, rows `width` wide.
pub fn scatter_rows_bf16(
    dev: &Device,
    dst: &mut impl DevicePtr<bf16>,
    rows: &[usize],
    src: &impl DevicePtr<bf16>,
    width: usize,
) -> Result<()> {
    const K: &str = "scatter_rows_bf16";
    require(K, width.is_multiple_of(8) && width > 0, || {
        format!("width {width} is not a positive multiple of 8")
    })?;
    let dst_rows = dst.len() / width;
    if let Some(bad) = rows.iter().find(|&&r| r >= dst_rows) {
        return Err(crate::Error::CudaArgs {
            kernel: K,
            msg: format!("row {bad} out of range for {dst_rows} destination rows"),
        });
    }
    check_len(K, "src", src, rows.len() * width)?;
    let idx: Vec<i32> = rows
        .iter()
        .map(|&r| int(K, "row", r))
        .collect::<Result<_>>()?;
    let d_rows = dev.upload(&idx)?;
    let args = [
        Arg::Ptr(dev.ptr(dst)),
        Arg::Ptr(dev.ptr(&d_rows)),
        Arg::Ptr(dev.ptr(src)),
        Arg::I32(int(K, "width", width)?),
    ];
    dev.launch(
        Family::Embedding,
        K,
        (rows.len() as u32, 1, 1),
        BLOCK,
        0,
        &args,
    )
}
