//! `torch.nn.functional.interpolate(x, size, mode="bicubic", align_corners=False)` on CPU, f32,
//! no antialias (spec §2.5), in PyTorch 2.3's order of operations
//! (`aten/src/ATen/native/cpu/UpSampleKernel.cpp`: `HelperInterpCubic::compute_indices_weights`,
//! `Interpolate<2, ..., 4>::eval`; `aten/src/ATen/native/UpSample.h`).
//!
//! Per axis, in f32 (`opmath_t` of float):
//! - `scale = (float)in / out` (`compute_scales_value` without a scale factor);
//! - `real = scale * (dst + 0.5f) - 0.5f`, not clamped for cubic (`area_pixel_compute_source_index`);
//! - `i0 = min((int64)floorf(real), in - 1)`, `t = clamp(real - i0, 0, 1)` (`guard_index_and_lambda`);
//! - weights `[cc2(t + 1), cc1(t), cc1(1 - t), cc2(2 - t)]` with A = -0.75,
//!   `cc1(x) = ((A + 2) * x - (A + 3)) * x * x + 1`, `cc2(x) = ((A * x - 5A) * x + 8A) * x - 4A`;
//! - taps `clamp(i0 - 1 + j, 0, in - 1)`.
//!
//! The 2-D kernel interpolates each of the 4 source rows along x, then combines the 4 row
//! results along y, with the same 4-term sum. Accumulation is f32. The sum is written in C++ as
//! `acc = v0*w0; acc += v1*w1; acc += v2*w2; acc += v3*w3`, but PyTorch's x86 CPU kernels are
//! built by GCC with FP contraction on (the AVX2/AVX-512 builds have FMA), which turns it into
//! `fma(v0, w0, v1*w1)`, then `fma(v2, w2, acc)`, `fma(v3, w3, acc)`: the first product is fused
//! into the addition of the second, which stays rounded. Written that way here, the global views
//! of the golden fixtures (torch 2.3.0 on x86-64) are bit-identical; the plain unfused sum differs
//! from them by 1-2 ulp in a quarter of the values.
//! For the HD image (sides multiples of 336) `scale` is an integer, so every source index and
//! weight is exact; only the accumulation rounds.

use super::{Error, Result};

/// `A` of the cubic convolution kernel (PyTorch, like OpenCV, uses -0.75 without antialias).
const A: f32 = -0.75;

fn cubic_convolution1(x: f32) -> f32 {
    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
}

fn cubic_convolution2(x: f32) -> f32 {
    ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
}

/// `get_cubic_upsample_coefficients(coeffs, t)`. `x1 + 1.0` and `1.0 - t` are computed in
/// double and rounded to float, which equals the float operation for t in [0, 1].
fn cubic_coefficients(t: f32) -> [f32; 4] {
    let x1 = t;
    let x2 = (1.0f64 - t as f64) as f32;
    [
        cubic_convolution2((x1 as f64 + 1.0) as f32),
        cubic_convolution1(x1),
        cubic_convolution1(x2),
        cubic_convolution2((x2 as f64 + 1.0) as f32),
    ]
}

/// `v0*w0 + v1*w1 + v2*w2 + v3*w3` as GCC contracts PyTorch's accumulation loop (see the module
/// documentation). `mul_add` is a single rounding, in hardware where the CPU has FMA.
#[inline(always)]
fn sum4(v: [f32; 4], w: [f32; 4]) -> f32 {
    let acc = v[0].mul_add(w[0], v[1] * w[1]);
    let acc = v[2].mul_add(w[2], acc);
    v[3].mul_add(w[3], acc)
}

/// Source indices and weights of every output position along one axis.
fn cubic_taps(in_size: usize, out_size: usize) -> Vec<([usize; 4], [f32; 4])> {
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|dst| {
            let real = scale * (dst as f32 + 0.5) - 0.5;
            let i0 = (real.floor() as i64).min(in_size as i64 - 1);
            let t = (real - i0 as f32).clamp(0.0, 1.0);
            let w = cubic_coefficients(t);
            let idx = [0i64, 1, 2, 3].map(|j| (i0 + j - 1).clamp(0, in_size as i64 - 1) as usize);
            (idx, w)
        })
        .collect()
}

type Taps = [([usize; 4], [f32; 4])];

/// The same code compiled with FMA enabled, so that `mul_add` is one instruction instead of a
/// call to libm's `fmaf` (same result, about 10x faster).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn resize_planes_fma(
    src: &[f32],
    out: &mut [f32],
    channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    ty: &Taps,
    tx: &Taps,
) {
    resize_planes(src, out, channels, in_h, in_w, out_h, out_w, ty, tx)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn resize_planes(
    src: &[f32],
    out: &mut [f32],
    channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
    ty: &Taps,
    tx: &Taps,
) {
    for c in 0..channels {
        let plane = &src[c * in_h * in_w..(c + 1) * in_h * in_w];
        let oplane = &mut out[c * out_h * out_w..(c + 1) * out_h * out_w];
        for (oy, (iy, wy)) in ty.iter().enumerate() {
            let rows = iy.map(|y| &plane[y * in_w..(y + 1) * in_w]);
            for (ox, (ix, wx)) in tx.iter().enumerate() {
                // Along x for each of the 4 rows, then along y.
                let t = rows.map(|row| sum4(ix.map(|x| row[x]), *wx));
                oplane[oy * out_w + ox] = sum4(t, *wy);
            }
        }
    }
}

/// Bicubic resize of a CHW f32 tensor `[channels, in_h, in_w]` to `[channels, out_h, out_w]`.
pub fn bicubic_resize_chw(
    src: &[f32],
    channels: usize,
    in_h: usize,
    in_w: usize,
    out_h: usize,
    out_w: usize,
) -> Result<Vec<f32>> {
    let sizes = [channels, in_h, in_w, out_h, out_w];
    if sizes.contains(&0)
        || channels.checked_mul(in_h).and_then(|n| n.checked_mul(in_w)) != Some(src.len())
    {
        return Err(Error::InvalidArgument {
            arg: "bicubic input".into(),
            reason: format!(
                "{} values for [{channels}, {in_h}, {in_w}] resized to {out_h}x{out_w}",
                src.len()
            ),
        });
    }
    let mut out = vec![0f32; channels * out_h * out_w];
    let ty = cubic_taps(in_h, out_h);
    let tx = cubic_taps(in_w, out_w);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports FMA (checked just above).
            unsafe {
                resize_planes_fma(src, &mut out, channels, in_h, in_w, out_h, out_w, &ty, &tx)
            };
            return Ok(out);
        }
    }
    resize_planes(src, &mut out, channels, in_h, in_w, out_h, out_w, &ty, &tx);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coefficients_sum_to_one() {
        for t in [0.0f32, 0.25, 0.5, 0.75, 1.0] {
            let w = cubic_coefficients(t);
            assert!((w.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{t}: {w:?}");
        }
        assert_eq!(cubic_coefficients(0.0), [0.0, 1.0, 0.0, 0.0]);
        assert_eq!(
            cubic_coefficients(0.5),
            [-0.09375, 0.59375, 0.59375, -0.09375]
        );
    }

    #[test]
    fn fma_build_equals_portable_build() {
        // `mul_add` is correctly rounded either way (instruction or libm `fmaf`).
        let (c, ih, iw, oh, ow) = (2, 37, 53, 11, 29);
        let src: Vec<f32> = (0..c * ih * iw)
            .map(|i| ((i * 7919 % 1009) as f32 - 500.0) / 97.0)
            .collect();
        let (ty, tx) = (cubic_taps(ih, oh), cubic_taps(iw, ow));
        let mut a = vec![f32::NAN; c * oh * ow];
        resize_planes(&src, &mut a, c, ih, iw, oh, ow, &ty, &tx);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("fma") {
            let mut b = vec![f32::NAN; c * oh * ow];
            // SAFETY: FMA support checked above.
            unsafe { resize_planes_fma(&src, &mut b, c, ih, iw, oh, ow, &ty, &tx) };
            assert_eq!(
                a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
        assert!(a.iter().all(|v| v.is_finite()));
    }
}
