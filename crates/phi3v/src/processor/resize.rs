//! Pillow's antialiased BILINEAR resize of 8-bit RGB, bit-exact to Pillow 10.3
//! (`src/libImaging/Resample.c`: `precompute_coeffs`, `normalize_coeffs_8bpc`,
//! `ImagingResampleHorizontal_8bpc`, `ImagingResampleVertical_8bpc`, `ImagingResampleInner`).
//!
//! - Per axis, `scale = in / out` (f64), `filterscale = max(scale, 1)`, support = `filterscale`
//!   (the triangle filter has support 1). Output index `xx` covers input `[xmin, xmin + n)` with
//!   `center = (xx + 0.5) * scale`, `xmin = max((int)(center - support + 0.5), 0)`,
//!   `xmax = min((int)(center + support + 0.5), in)`, weights `tri((x + xmin - center + 0.5) / filterscale)`
//!   normalised by their f64 sum.
//! - Weights become fixed point with 22 fractional bits: `(int)(w * 2^22 + 0.5)` (all bilinear
//!   weights are >= 0). Per output sample `acc = 2^21 + Σ pixel * k` in i32, then
//!   `clamp(acc >> 22, 0, 255)` (Pillow's `clip8` lookup table).
//! - The horizontal pass runs first into an 8-bit intermediate, then the vertical pass. A pass
//!   whose size does not change is skipped (`need_horizontal` / `need_vertical`); with the whole
//!   image as the box, the identity weights would copy anyway. Pillow's horizontal pass only
//!   computes the rows the vertical pass reads (`ybox_first..ybox_last`): every row is computed
//!   independently, so computing all of them gives the same bytes.
//! - `Image.resize` returns a copy when the size is unchanged.

use super::{Error, Result, RgbImage};

/// `PRECISION_BITS = 32 - 8 - 2` in Resample.c.
const PRECISION_BITS: u32 = 22;

/// Fixed-point weights of one axis: output `i` reads `bounds[i].1` inputs from `bounds[i].0`,
/// with weights `kk[i * ksize..]`.
struct Coeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    kk: Vec<i32>,
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 {
        1.0 - x
    } else {
        0.0
    }
}

/// `precompute_coeffs` (box = whole axis: `in0 = 0`, `in1 = in_size` as float) followed by
/// `normalize_coeffs_8bpc`.
fn precompute_coeffs(in_size: usize, out_size: usize) -> Coeffs {
    // (double)(in1 - in0) / outSize, where in1 - in0 is computed in float (exact below 2^24).
    let scale = (in_size as f32) as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 1.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut kk = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero; negative values clamp to 0 either way.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0f64;
        for (x, wx) in w[..n].iter_mut().enumerate() {
            *wx = bilinear_filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *wx;
        }
        let fixed = (1u32 << PRECISION_BITS) as f64;
        for (k, &wx) in kk[xx * ksize..xx * ksize + n].iter_mut().zip(&w[..n]) {
            let v = if ww != 0.0 { wx / ww } else { wx };
            // normalize_coeffs_8bpc: round half away from zero, then truncate.
            *k = if v < 0.0 {
                (-0.5 + v * fixed) as i32
            } else {
                (0.5 + v * fixed) as i32
            };
        }
        bounds.push((xmin, n));
    }
    Coeffs { ksize, bounds, kk }
}

#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `ImagingResampleHorizontal_8bpc` for 3 bands.
fn resample_horizontal(src: &RgbImage, out_w: usize, c: &Coeffs) -> RgbImage {
    let (in_w, h) = (src.width, src.height);
    let mut out = vec![0u8; out_w * h * 3];
    for yy in 0..h {
        let row = &src.data[yy * in_w * 3..(yy + 1) * in_w * 3];
        let orow = &mut out[yy * out_w * 3..(yy + 1) * out_w * 3];
        for xx in 0..out_w {
            let (xmin, n) = c.bounds[xx];
            let k = &c.kk[xx * c.ksize..xx * c.ksize + n];
            let mut ss = [1i32 << (PRECISION_BITS - 1); 3];
            for (x, &kx) in k.iter().enumerate() {
                let p = &row[(xmin + x) * 3..(xmin + x) * 3 + 3];
                ss[0] += p[0] as i32 * kx;
                ss[1] += p[1] as i32 * kx;
                ss[2] += p[2] as i32 * kx;
            }
            orow[xx * 3] = clip8(ss[0]);
            orow[xx * 3 + 1] = clip8(ss[1]);
            orow[xx * 3 + 2] = clip8(ss[2]);
        }
    }
    RgbImage {
        width: out_w,
        height: h,
        data: out,
    }
}

/// `ImagingResampleVertical_8bpc` for 3 bands.
fn resample_vertical(src: &RgbImage, out_h: usize, c: &Coeffs) -> RgbImage {
    let w = src.width;
    let stride = w * 3;
    let mut out = vec![0u8; w * out_h * 3];
    for yy in 0..out_h {
        let (ymin, n) = c.bounds[yy];
        let k = &c.kk[yy * c.ksize..yy * c.ksize + n];
        let orow = &mut out[yy * stride..(yy + 1) * stride];
        for (xc, o) in orow.iter_mut().enumerate() {
            let mut ss = 1i32 << (PRECISION_BITS - 1);
            for (y, &ky) in k.iter().enumerate() {
                ss += src.data[(ymin + y) * stride + xc] as i32 * ky;
            }
            *o = clip8(ss);
        }
    }
    RgbImage {
        width: w,
        height: out_h,
        data: out,
    }
}

/// `img.resize((out_w, out_h), Image.BILINEAR)` in Pillow 10.3, for an RGB image.
pub fn resize_bilinear(img: &RgbImage, out_w: usize, out_h: usize) -> Result<RgbImage> {
    if out_w == 0 || out_h == 0 {
        return Err(Error::Transform {
            width: img.width,
            height: img.height,
            reason: format!("cannot resize to {out_w}x{out_h}: height and width must be > 0"),
        });
    }
    if img.width == 0 || img.height == 0 {
        return Err(Error::Transform {
            width: img.width,
            height: img.height,
            reason: "cannot resize an empty image".into(),
        });
    }
    // Pillow keeps coordinates in `int` and the box in `float`.
    if out_w >= 1 << 24 || out_h >= 1 << 24 || img.width >= 1 << 24 || img.height >= 1 << 24 {
        return Err(Error::Transform {
            width: img.width,
            height: img.height,
            reason: format!("resize to {out_w}x{out_h}: sizes must be below 2^24"),
        });
    }
    if img.width == out_w && img.height == out_h {
        return Ok(img.clone());
    }
    let mut cur: Option<RgbImage> = None;
    // LOOP 1: horizontal pass (need_horizontal).
    if out_w != img.width {
        let c = precompute_coeffs(img.width, out_w);
        cur = Some(resample_horizontal(img, out_w, &c));
    }
    // LOOP 2: vertical pass (need_vertical), on the 8-bit intermediate.
    if out_h != img.height {
        let c = precompute_coeffs(img.height, out_h);
        let src = cur.as_ref().unwrap_or(img);
        cur = Some(resample_vertical(src, out_h, &c));
    }
    Ok(cur.unwrap_or_else(|| img.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (i, o) in [(10, 3), (3, 10), (640, 1344), (8000, 5376), (7, 7)] {
            let c = precompute_coeffs(i, o);
            for xx in 0..o {
                let (_, n) = c.bounds[xx];
                let s: i64 = c.kk[xx * c.ksize..xx * c.ksize + n]
                    .iter()
                    .map(|&k| k as i64)
                    .sum();
                assert!((s - (1 << 22)).abs() <= n as i64, "{i}->{o} at {xx}: {s}");
            }
        }
    }
}
