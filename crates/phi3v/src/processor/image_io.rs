//! Image decoding, byte-exact to Pillow 10.3's `Image.open(path).convert("RGB")`.
//!
//! - JPEG: libjpeg-turbo semantics through the `mozjpeg` crate (ISLOW IDCT, fancy upsampling),
//!   the decoder Pillow 10.3 wheels bundle (libjpeg-turbo 3.0.2). Pillow picks the mode from the
//!   number of components: 1 → L (replicated to RGB), 3 → RGB, 4 → CMYK with Adobe (inverted)
//!   polarity, converted with Pillow's `cmyk2rgb`. A truncated file is an error, as in Pillow
//!   (which raises "image file is truncated"), even when only the end-of-image marker is
//!   missing: Pillow's decoder reads up to EOI (`jpeg_finish_decompress`).
//! - PNG, WebP, BMP: the `image` crate, then Pillow's conversion rules: alpha is dropped, never
//!   composited; 16-bit RGB(A) and gray+alpha keep the high byte (Pillow's `RGB;16B`, `RGBA;16B`,
//!   `LA;16B` unpackers); 16-bit gray opens as `I;16`, whose conversion to RGB clamps to 255.
//! - GIF: the first frame, as palette indices from the `gif` crate, composed like Pillow:
//!   the canvas is max(screen, frame extent), filled with the transparent index if the frame has
//!   one and with index 0 otherwise; the frame's local palette, else the global one, maps index i
//!   to entry i, and to black past its end. A palette that is the gray ramp opens as "L" in
//!   Pillow: the index itself is the gray level.
//!
//! The format is sniffed from the bytes (the same magic numbers Pillow's plugins accept), never
//! from the file name.

use std::cell::Cell;
use std::io::{BufRead, Read};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use super::{Error, Result};

/// Pillow refuses images over `2 * Image.MAX_IMAGE_PIXELS` (`DecompressionBombError`);
/// `MAX_IMAGE_PIXELS = int(1024 * 1024 * 1024 // 4 // 3)` = 89,478,485.
pub const MAX_IMAGE_PIXELS: u64 = 2 * 89_478_485;

/// An 8-bit RGB image, rows top to bottom, pixels left to right: `data[(y * width + x) * 3 + c]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    pub width: usize,
    pub height: usize,
    /// HWC, RGB8.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Wraps `data` (HWC RGB8); its length must be `width * height * 3`.
    pub fn new(width: usize, height: usize, data: Vec<u8>) -> Result<Self> {
        let expected = width.checked_mul(height).and_then(|n| n.checked_mul(3));
        if expected != Some(data.len()) {
            return Err(Error::InvalidArgument {
                arg: "RgbImage data".into(),
                reason: format!(
                    "{} bytes for a {width}x{height} RGB image (expected {:?})",
                    data.len(),
                    expected
                ),
            });
        }
        Ok(RgbImage {
            width,
            height,
            data,
        })
    }

    /// An image of one colour.
    pub fn filled(width: usize, height: usize, rgb: [u8; 3]) -> Self {
        let mut data = Vec::with_capacity(width * height * 3);
        for _ in 0..width * height {
            data.extend_from_slice(&rgb);
        }
        RgbImage {
            width,
            height,
            data,
        }
    }

    /// The pixel at column `x`, row `y`.
    pub fn pixel(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * 3;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// Reads and decodes an image file (see the module documentation for the exact semantics).
pub fn decode_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    decode_image_bytes(&bytes, &path.display().to_string())
}

/// Decodes an image held in memory; `name` labels errors (a file name, usually).
pub fn decode_image_bytes(bytes: &[u8], name: &str) -> Result<RgbImage> {
    decode_image_bytes_limited(bytes, name, MAX_IMAGE_PIXELS)
}

/// [`decode_image_bytes`] refusing images of more than `max_pixels` pixels, from the header,
/// before any pixel is decoded (a server's guard against decompression bombs).
pub fn decode_image_bytes_limited(bytes: &[u8], name: &str, max_pixels: u64) -> Result<RgbImage> {
    let limit = max_pixels.min(MAX_IMAGE_PIXELS);
    if bytes.is_empty() {
        return Err(Error::Decode {
            name: name.into(),
            detail: "the file is empty".into(),
        });
    }
    match sniff(bytes) {
        Some(Format::Jpeg) => decode_jpeg(bytes, name, limit),
        Some(Format::Png) => decode_png(bytes, name, limit),
        Some(Format::Gif) => decode_gif(bytes, name, limit),
        Some(Format::WebP) => decode_with_image_crate(bytes, name, image::ImageFormat::WebP, limit),
        Some(Format::Bmp) => decode_bmp(bytes, name, limit),
        None => {
            let head: Vec<String> = bytes.iter().take(8).map(|b| format!("{b:02x}")).collect();
            Err(Error::UnsupportedFormat {
                name: name.into(),
                detail: format!(
                    "not JPEG, PNG, GIF, WebP or BMP; first bytes {}",
                    head.join(" ")
                ),
            })
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Jpeg,
    Png,
    Gif,
    WebP,
    Bmp,
}

/// The `_accept` tests of Pillow's plugins.
fn sniff(b: &[u8]) -> Option<Format> {
    if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(Format::Jpeg)
    } else if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(Format::Png)
    } else if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        Some(Format::Gif)
    } else if b.len() >= 12 && &b[0..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Some(Format::WebP)
    } else if b.starts_with(b"BM") {
        Some(Format::Bmp)
    } else {
        None
    }
}

/// Refuses zero-sized images and decompression bombs before any pixel is decoded.
fn check_size(name: &str, width: usize, height: usize, limit: u64) -> Result<()> {
    if width == 0 || height == 0 {
        return Err(Error::EmptyImage {
            name: name.into(),
            width,
            height,
        });
    }
    let pixels = width as u64 * height as u64;
    if pixels > limit {
        return Err(Error::TooLarge {
            name: name.into(),
            width,
            height,
            pixels,
            limit,
        });
    }
    Ok(())
}

fn decode_err(name: &str, detail: impl std::fmt::Display) -> Error {
    Error::Decode {
        name: name.into(),
        detail: detail.to_string(),
    }
}

// ------------------------------------------------------------------------------------------
// JPEG

/// A `BufRead` over the file bytes that records whether libjpeg asked for data past the end.
/// The `mozjpeg` source manager then inserts a fake EOI and only emits a (silenced) warning;
/// Pillow instead fails with "image file is truncated".
struct EofTracker<'a> {
    rest: &'a [u8],
    hit_eof: &'a Cell<bool>,
}

impl Read for EofTracker<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.rest.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.hit_eof.set(true);
        }
        Ok(n)
    }
}

impl BufRead for EofTracker<'_> {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        if self.rest.is_empty() {
            self.hit_eof.set(true);
        }
        Ok(self.rest)
    }

    fn consume(&mut self, amt: usize) {
        self.rest = &self.rest[amt.min(self.rest.len())..];
    }
}

fn decode_jpeg(bytes: &[u8], name: &str, limit: u64) -> Result<RgbImage> {
    let hit_eof = Cell::new(false);
    // libjpeg reports fatal errors through `error_exit`, which the `mozjpeg` crate turns into an
    // unwind with `resume_unwind` (no panic hook runs, so nothing is printed). Catch it here.
    let caught = catch_unwind(AssertUnwindSafe(|| {
        decode_jpeg_inner(bytes, name, &hit_eof, limit)
    }));
    match caught {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg fatal error".into());
            Err(decode_err(name, msg))
        }
    }
}

fn decode_jpeg_inner(
    bytes: &[u8],
    name: &str,
    hit_eof: &Cell<bool>,
    limit: u64,
) -> Result<RgbImage> {
    use mozjpeg::ColorSpace;

    let reader = EofTracker {
        rest: bytes,
        hit_eof,
    };
    let dec = mozjpeg::Decompress::builder()
        .from_reader(reader)
        .map_err(|e| decode_err(name, e))?;
    let (width, height) = dec.size();
    check_size(name, width, height, limit)?;
    // Pillow: 1 layer → "L", 3 → "RGB", 4 → "CMYK" (rawmode "CMYK;I"), else SyntaxError.
    let layers = dec.components().len();
    let truncated = || decode_err(name, "image file is truncated (premature end of JPEG data)");
    let data = match layers {
        1 => {
            let mut started = dec.grayscale().map_err(|e| decode_err(name, e))?;
            let gray: Vec<u8> = started.read_scanlines().map_err(|e| decode_err(name, e))?;
            started.finish().map_err(|e| decode_err(name, e))?;
            if hit_eof.get() || gray.len() != width * height {
                return Err(truncated());
            }
            gray.iter().flat_map(|&v| [v, v, v]).collect()
        }
        3 => {
            let mut started = dec.rgb().map_err(|e| decode_err(name, e))?;
            let rgb: Vec<u8> = started.read_scanlines().map_err(|e| decode_err(name, e))?;
            started.finish().map_err(|e| decode_err(name, e))?;
            if hit_eof.get() || rgb.len() != width * height * 3 {
                return Err(truncated());
            }
            rgb
        }
        4 => {
            let mut started = dec
                .to_colorspace(ColorSpace::JCS_CMYK)
                .map_err(|e| decode_err(name, e))?;
            let cmyk: Vec<u8> = started.read_scanlines().map_err(|e| decode_err(name, e))?;
            started.finish().map_err(|e| decode_err(name, e))?;
            if hit_eof.get() || cmyk.len() != width * height * 4 {
                return Err(truncated());
            }
            cmyk.chunks_exact(4)
                .flat_map(|p| cmyk_inverted_to_rgb([p[0], p[1], p[2], p[3]]))
                .collect()
        }
        n => {
            return Err(decode_err(
                name,
                format!("cannot handle {n}-layer JPEG images"),
            ))
        }
    };
    RgbImage::new(width, height, data)
}

/// Pillow's "CMYK;I" unpacker (Adobe polarity: stored inverted) then `cmyk2rgb` of Convert.c:
/// `nk = 255 - k; out = clip8(nk - MULDIV255(c, nk))`, `MULDIV255(a, b) = ((a*b+128) + ((a*b+128) >> 8)) >> 8`.
fn cmyk_inverted_to_rgb(p: [u8; 4]) -> [u8; 3] {
    let [c, m, y, k] = p.map(|v| 255 - v as i32);
    let nk = 255 - k;
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let f = |v: i32| (nk - muldiv255(v, nk)).clamp(0, 255) as u8;
    [f(c), f(m), f(y)]
}

// ------------------------------------------------------------------------------------------
// PNG, WebP, BMP through the `image` crate

fn decode_png(bytes: &[u8], name: &str, limit: u64) -> Result<RgbImage> {
    // IHDR is always the first chunk: width, height, bit depth (byte 24), colour type (byte 25).
    // A 16-bit gray PNG opens in Pillow as "I;16" even when it has a tRNS chunk (which the
    // `image` crate turns into an alpha channel), so the rule must come from IHDR.
    let gray16 = bytes.len() > 25 && &bytes[12..16] == b"IHDR" && bytes[24] == 16 && bytes[25] == 0;
    let img = open_with_image_crate(bytes, name, image::ImageFormat::Png, limit)?;
    if gray16 {
        let (w, h) = (img.width() as usize, img.height() as usize);
        // I;16 → RGB (Convert.c `I16_RGB`): values over 255 become 255.
        let gray = img.into_luma16();
        let data = gray
            .as_raw()
            .iter()
            .flat_map(|&v| [v.min(255) as u8; 3])
            .collect();
        return RgbImage::new(w, h, data);
    }
    dynamic_to_rgb(img, name)
}

fn decode_bmp(bytes: &[u8], name: &str, limit: u64) -> Result<RgbImage> {
    // Bits per pixel sits at offset 28 for every BMP header version Pillow reads (info header
    // of 40 bytes or more). 16-bit BMPs expand 5-bit channels as `v * 255 / 31` in Pillow but by
    // bit replication in the `image` crate: refuse them rather than differ.
    if bytes.len() >= 30 {
        let header_size = u32::from_le_bytes([bytes[14], bytes[15], bytes[16], bytes[17]]);
        let bpp = u16::from_le_bytes([bytes[28], bytes[29]]);
        if header_size >= 40 && bpp == 16 {
            return Err(Error::UnsupportedFormat {
                name: name.into(),
                detail:
                    "16-bit BMP (its channel expansion differs from Pillow's); convert it to PNG"
                        .into(),
            });
        }
    }
    decode_with_image_crate(bytes, name, image::ImageFormat::Bmp, limit)
}

fn decode_with_image_crate(
    bytes: &[u8],
    name: &str,
    format: image::ImageFormat,
    limit: u64,
) -> Result<RgbImage> {
    let img = open_with_image_crate(bytes, name, format, limit)?;
    dynamic_to_rgb(img, name)
}

fn open_with_image_crate(
    bytes: &[u8],
    name: &str,
    format: image::ImageFormat,
    limit: u64,
) -> Result<image::DynamicImage> {
    use image::ImageDecoder;

    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    // Our own pixel-count guard replaces the crate's 512 MiB default: a Pillow-sized image in
    // 16-bit RGBA needs up to 8 bytes per pixel.
    limits.max_alloc = Some(limit * 8 + (1 << 20));
    reader.limits(limits);
    let decoder = reader.into_decoder().map_err(|e| decode_err(name, e))?;
    let (w, h) = decoder.dimensions();
    check_size(name, w as usize, h as usize, limit)?;
    image::DynamicImage::from_decoder(decoder).map_err(|e| decode_err(name, e))
}

/// Pillow's `convert("RGB")` from the mode Pillow would have opened (alpha dropped, 16-bit
/// samples reduced to their high byte).
fn dynamic_to_rgb(img: image::DynamicImage, name: &str) -> Result<RgbImage> {
    use image::DynamicImage as D;

    let (w, h) = (img.width() as usize, img.height() as usize);
    let data: Vec<u8> = match img {
        D::ImageRgb8(b) => b.into_raw(),
        D::ImageRgba8(b) => b
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        D::ImageLuma8(b) => b.as_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        D::ImageLumaA8(b) => b.as_raw().chunks_exact(2).flat_map(|p| [p[0]; 3]).collect(),
        D::ImageRgb16(b) => b.as_raw().iter().map(|&v| (v >> 8) as u8).collect(),
        D::ImageRgba16(b) => b
            .as_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]].map(|v| (v >> 8) as u8))
            .collect(),
        D::ImageLumaA16(b) => b
            .as_raw()
            .chunks_exact(2)
            .flat_map(|p| [(p[0] >> 8) as u8; 3])
            .collect(),
        D::ImageLuma16(b) => b
            .as_raw()
            .iter()
            .flat_map(|&v| [v.min(255) as u8; 3])
            .collect(),
        other => {
            return Err(Error::UnsupportedFormat {
                name: name.into(),
                detail: format!(
                    "pixel type {:?} has no Pillow RGB equivalent here",
                    other.color()
                ),
            })
        }
    };
    RgbImage::new(w, h, data)
}

// ------------------------------------------------------------------------------------------
// GIF

fn decode_gif(bytes: &[u8], name: &str, limit: u64) -> Result<RgbImage> {
    let mut opts = gif::DecodeOptions::new();
    opts.set_color_output(gif::ColorOutput::Indexed);
    // Our own pixel-count guard below; one index byte per pixel.
    opts.set_memory_limit(gif::MemoryLimit::Bytes(
        std::num::NonZeroU64::new(limit + 1).expect("nonzero"),
    ));
    let mut dec = opts.read_info(bytes).map_err(|e| decode_err(name, e))?;
    let (screen_w, screen_h) = (dec.width() as usize, dec.height() as usize);
    let global = dec.global_palette().map(|p| p.to_vec());

    let info = dec.next_frame_info().map_err(|e| decode_err(name, e))?;
    let Some(info) = info else {
        return Err(decode_err(name, "image not found in GIF file"));
    };
    let (left, top) = (info.left as usize, info.top as usize);
    let (fw, fh) = (info.width as usize, info.height as usize);
    let transparent = info.transparent;
    let palette = info.palette.clone().or(global).unwrap_or_default();
    // Pillow grows the image to hold a frame that extends past the logical screen.
    let width = screen_w.max(left + fw);
    let height = screen_h.max(top + fh);
    check_size(name, width, height, limit)?;

    let mut frame = vec![0u8; dec.buffer_size()];
    if !frame.is_empty() {
        dec.read_into_buffer(&mut frame)
            .map_err(|e| decode_err(name, e))?;
    }
    if frame.len() != fw * fh {
        return Err(decode_err(
            name,
            format!("first frame has {} indices for {fw}x{fh}", frame.len()),
        ));
    }

    let mut canvas = vec![transparent.unwrap_or(0); width * height];
    for y in 0..fh {
        let dst = (top + y) * width + left;
        canvas[dst..dst + fw].copy_from_slice(&frame[y * fw..(y + 1) * fw]);
    }
    let n_entries = palette.len() / 3;
    // Pillow's `_is_palette_needed`: a palette that is the gray ramp (entry i = (i, i, i)) is
    // dropped and the frame opens as "L", whose pixel values are the indices themselves.
    let gray_ramp =
        (0..n_entries).all(|i| palette[3 * i..3 * i + 3].iter().all(|&v| v as usize == i));
    let data = canvas
        .iter()
        .flat_map(|&i| {
            let i = i as usize;
            if gray_ramp {
                [i as u8; 3]
            } else if i < n_entries {
                [palette[3 * i], palette[3 * i + 1], palette[3 * i + 2]]
            } else {
                // Past the end of a real palette Pillow reads zeros.
                [0, 0, 0]
            }
        })
        .collect();
    RgbImage::new(width, height, data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmyk_white_and_black() {
        // Stored inverted: 255s are "no ink".
        assert_eq!(cmyk_inverted_to_rgb([255, 255, 255, 255]), [255, 255, 255]);
        assert_eq!(cmyk_inverted_to_rgb([255, 255, 255, 0]), [0, 0, 0]);
        assert_eq!(cmyk_inverted_to_rgb([0, 255, 255, 255]), [0, 255, 255]);
    }

    #[test]
    fn sniffing() {
        assert_eq!(sniff(b"\xFF\xD8\xFF\xE0"), Some(Format::Jpeg));
        assert_eq!(sniff(b"GIF89a..."), Some(Format::Gif));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8 "), Some(Format::WebP));
        assert_eq!(sniff(b"hello"), None);
    }
}
