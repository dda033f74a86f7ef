//! `HD_transform` and `padding_336` of `image_processing_phi3_v.py` (spec §2.2).
//!
//! Python floats are f64 and `int()` truncates toward zero; both are reproduced literally.

use super::resize::resize_bilinear;
use super::{Error, Result, RgbImage, CROP_SIZE, MAX_NUM_CROPS};

/// `Image.transpose(Image.TRANSPOSE)`: swaps x and y (`out[x][y] = in[y][x]`).
pub fn transpose(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width, img.height);
    let mut data = vec![0u8; w * h * 3];
    // out is h wide and w high: out(row = x, col = y) = in(row = y, col = x).
    for y in 0..h {
        for x in 0..w {
            let s = (y * w + x) * 3;
            let d = (x * h + y) * 3;
            data[d..d + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    RgbImage {
        width: h,
        height: w,
        data,
    }
}

/// Sizes chosen by the HD transform for a `width`×`height` image (in the original orientation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HdSize {
    /// Whether the image is transposed first (`width < height`).
    pub transposed: bool,
    /// Size after the resize, in the transposed frame when `transposed`: (new_w, new_h).
    pub resized: (usize, usize),
    /// Padding above / below the resized image, in the transposed frame.
    pub pad_top: usize,
    pub pad_bottom: usize,
    /// Final HD size in the original orientation: (W, H), both multiples of 336.
    pub hd: (usize, usize),
}

/// The size arithmetic of `HD_transform` + `padding_336`, without touching pixels.
pub fn hd_transform_size(width: usize, height: usize, hd_num: usize) -> Result<HdSize> {
    let err = |reason: String| Error::Transform {
        width,
        height,
        reason,
    };
    if width == 0 || height == 0 {
        return Err(err("empty image".into()));
    }
    if hd_num == 0 || hd_num > MAX_NUM_CROPS {
        return Err(err(format!(
            "num_crops = {hd_num} is outside 1..={MAX_NUM_CROPS}"
        )));
    }
    let transposed = width < height;
    let (w, h) = if transposed {
        (height, width)
    } else {
        (width, height)
    };
    let ratio = w as f64 / h as f64;
    // while scale * np.ceil(scale / ratio) <= hd_num: scale += 1; then scale -= 1.
    // ratio >= 1, so ceil(scale / ratio) >= 1 and the loop ends by scale = hd_num + 1.
    let mut scale: usize = 1;
    while (scale as f64) * (scale as f64 / ratio).ceil() <= hd_num as f64 {
        scale += 1;
    }
    scale -= 1;
    if scale == 0 {
        return Err(err(format!("no crop grid fits num_crops = {hd_num}")));
    }
    let new_w = scale * CROP_SIZE;
    // int(new_w / ratio): f64 division, truncation.
    let new_h = (new_w as f64 / ratio).trunc() as usize;
    if new_h == 0 {
        return Err(err(format!(
            "aspect ratio {ratio:.1}:1 is too extreme: the HD transform resizes it to {new_w}x0 \
             (Pillow refuses a zero height)"
        )));
    }
    // tar = int(np.ceil(height / 336) * 336); top = int((tar - height) / 2).
    let tar = ((new_h as f64 / CROP_SIZE as f64).ceil() * CROP_SIZE as f64) as usize;
    let pad_top = ((tar - new_h) as f64 / 2.0).trunc() as usize;
    let pad_bottom = tar - new_h - pad_top;
    let hd = if transposed {
        (tar, new_w)
    } else {
        (new_w, tar)
    };
    Ok(HdSize {
        transposed,
        resized: (new_w, new_h),
        pad_top,
        pad_bottom,
        hd,
    })
}

/// `HD_transform(img, hd_num)`: the HD uint8 image, width and height multiples of 336.
pub fn hd_transform(img: &RgbImage, hd_num: usize) -> Result<RgbImage> {
    let size = hd_transform_size(img.width, img.height, hd_num)?;
    let transposed_img;
    let src = if size.transposed {
        transposed_img = transpose(img);
        &transposed_img
    } else {
        img
    };
    let (new_w, new_h) = size.resized;
    // torchvision's F.resize returns the PIL image itself when the size is unchanged.
    let resized = resize_bilinear(src, new_w, new_h)?;
    // padding_336: white rows above and below (torchvision F.pad, fill=(255, 255, 255)).
    let tar = new_h + size.pad_top + size.pad_bottom;
    let mut data = vec![255u8; new_w * tar * 3];
    let row = new_w * 3;
    data[size.pad_top * row..(size.pad_top + new_h) * row].copy_from_slice(&resized.data);
    let padded = RgbImage {
        width: new_w,
        height: tar,
        data,
    };
    Ok(if size.transposed {
        transpose(&padded)
    } else {
        padded
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transpose_swaps_axes() {
        let img = RgbImage::new(3, 2, (0..18).collect()).unwrap();
        let t = transpose(&img);
        assert_eq!((t.width, t.height), (2, 3));
        for y in 0..2 {
            for x in 0..3 {
                assert_eq!(img.pixel(x, y), t.pixel(y, x));
            }
        }
        assert_eq!(transpose(&t), img);
    }
}
