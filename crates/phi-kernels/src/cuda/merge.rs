//! The 2×2 merge with separators, as one gather (`kernels/merge.cu`).

use super::{check_len, int, require, Arg, Device, DevicePtr, Family};
use crate::Result;
use half::bf16;

/// Output token `t` of `out [src.len(), 4c]` is merged token `src[t] >= 0` of `feat`: `n` crops
/// of `g*g` patch rows of `c`, `crop_stride` values apart (`g*g*c` when packed; `(g*g+1)*c`
/// with `feat` starting past the first CLS row to read CLIP's output in place), numbered `crop*(g/2)^2 + i*(g/2) + j`, laid out as
/// [`crate::cpu::merge_2x2`] lays them out) or, for `src[t] < 0`, row `-src[t]-1` of
/// `sep [nsep, 4c]`.
#[allow(clippy::too_many_arguments)]
pub fn merge_2x2_bf16(
    dev: &Device,
    feat: &impl DevicePtr<bf16>,
    crop_stride: usize,
    n: usize,
    g: usize,
    c: usize,
    sep: &impl DevicePtr<bf16>,
    src: &[i32],
    out: &mut impl DevicePtr<bf16>,
) -> Result<()> {
    const K: &str = "merge_2x2_bf16";
    require(
        K,
        g.is_multiple_of(2) && c.is_multiple_of(8) && c > 0,
        || format!("grid {g} must be even and c {c} a positive multiple of 8"),
    )?;
    require(
        K,
        crop_stride >= g * g * c && crop_stride.is_multiple_of(8),
        || format!("crop_stride {crop_stride} must be a multiple of 8 and >= g*g*c"),
    )?;
    if n > 0 {
        check_len(K, "feat", feat, (n - 1) * crop_stride + g * g * c)?;
    }
    let merged = (n * (g / 2) * (g / 2)) as i64;
    let nsep = (sep.len() / (4 * c)) as i64;
    if let Some(bad) = src
        .iter()
        .find(|&&s| (s >= 0 && s as i64 >= merged) || (s < 0 && -(s as i64) > nsep))
    {
        return Err(crate::Error::CudaArgs {
            kernel: K,
            msg: format!("source {bad} out of range ({merged} merged tokens, {nsep} separators)"),
        });
    }
    check_len(K, "out", out, src.len() * 4 * c)?;
    let d_src = dev.upload(src)?;
    let args = [
        Arg::Ptr(dev.ptr(feat)),
        Arg::Ptr(dev.ptr(sep)),
        Arg::Ptr(dev.ptr(&d_src)),
        Arg::Ptr(dev.ptr(out)),
        Arg::I64(crop_stride as i64),
        Arg::I32(int(K, "g", g)?),
        Arg::I32(int(K, "c", c)?),
    ];
    dev.launch(Family::Merge, K, (src.len() as u32, 1, 1), 256, 0, &args)
}
