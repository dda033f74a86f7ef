//! `Phi3VImageProcessor.preprocess` (spec §2): HD transform, normalisation, global view, crops.

use std::collections::HashMap;
use std::path::Path;

use serde_json::value::RawValue;

use super::bicubic::bicubic_resize_chw;
use super::hd_transform::{hd_transform, hd_transform_size};
use super::normalize::to_tensor_normalize;
use super::{Error, Result, RgbImage, CROP_SIZE};

/// `OPENAI_CLIP_MEAN` of transformers, as Python floats; torch rounds them to f32.
const OPENAI_CLIP_MEAN_F64: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// `OPENAI_CLIP_STD` of transformers, as Python floats.
const OPENAI_CLIP_STD_F64: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// The f32 values `Normalize` uses (`torch.as_tensor(mean, dtype=float32)`).
pub const OPENAI_CLIP_MEAN: [f32; 3] = [
    OPENAI_CLIP_MEAN_F64[0] as f32,
    OPENAI_CLIP_MEAN_F64[1] as f32,
    OPENAI_CLIP_MEAN_F64[2] as f32,
];
pub const OPENAI_CLIP_STD: [f32; 3] = [
    OPENAI_CLIP_STD_F64[0] as f32,
    OPENAI_CLIP_STD_F64[1] as f32,
    OPENAI_CLIP_STD_F64[2] as f32,
];

/// `num_crops` of Phi-3-vision-128k's `preprocessor_config.json` (Phi-3.5-vision ships 4).
pub const DEFAULT_NUM_CROPS: usize = 16;

/// Our own bound on `num_crops` (not in the reference): 256 crops already make a 29-megapixel
/// HD image and a 350 MB `pixel_values`; larger values would only exhaust memory.
pub const MAX_NUM_CROPS: usize = 256;

/// Number of LLM tokens of one image with an `h_c` × `w_c` crop grid (spec §2.7):
/// `(h_c·w_c + 1)·144 + 1 + (h_c + 1)·12`, i.e. 12·h_c rows of 12·w_c+1 sub-image tokens
/// (newline each), one `glb_GN`, and 12·13 global tokens.
pub fn num_image_tokens(h_c: usize, w_c: usize) -> usize {
    (h_c * w_c + 1) * 144 + 1 + (h_c + 1) * 12
}

/// `calc_num_image_tokens_from_image_size(width, height)` of the reference, for a given
/// `num_crops`: the token count from the image size alone, without touching pixels.
pub fn calc_num_image_tokens_from_image_size(
    width: usize,
    height: usize,
    num_crops: usize,
) -> Result<usize> {
    let s = hd_transform_size(width, height, num_crops)?;
    let (w, h) = s.hd;
    Ok(num_image_tokens(h / CROP_SIZE, w / CROP_SIZE))
}

/// The preprocessing settings: `num_crops`, `image_mean`, `image_std`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageProcessor {
    pub num_crops: usize,
    pub image_mean: [f32; 3],
    pub image_std: [f32; 3],
}

impl Default for ImageProcessor {
    fn default() -> Self {
        ImageProcessor {
            num_crops: DEFAULT_NUM_CROPS,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
        }
    }
}

/// One preprocessed image.
#[derive(Debug, Clone)]
pub struct ProcessedImage {
    /// The HD image (uint8, after resize, white padding and transposing back): `[H, W, 3]`.
    pub hd: RgbImage,
    /// `[num_crops + 1, 3, 336, 336]` f32: the global view, the `h_c·w_c` crops row-major over
    /// the crop grid, then zero crops.
    pub pixel_values: Vec<f32>,
    pub num_crops: usize,
    /// Crop grid rows (`H / 336`).
    pub h_c: usize,
    /// Crop grid columns (`W / 336`).
    pub w_c: usize,
    /// `[H, W]` of the HD image, height first (`image_sizes` of the reference).
    pub image_size: [usize; 2],
    pub num_img_tokens: usize,
    /// SHA-256 of everything `pixel_values` is made from (the HD pixels, `num_crops`, mean and
    /// std): equal keys give equal image features, so a cache of features can use it.
    pub key: [u8; 32],
}

impl ProcessedImage {
    /// Values of one 336×336 crop (`[3, 336, 336]`).
    pub const CROP_LEN: usize = 3 * CROP_SIZE * CROP_SIZE;

    /// The global view `[3, 336, 336]`.
    pub fn global_view(&self) -> &[f32] {
        &self.pixel_values[..Self::CROP_LEN]
    }

    /// Crop `m` of the grid (row `m / w_c`, column `m % w_c`), `[3, 336, 336]`.
    pub fn crop(&self, m: usize) -> Option<&[f32]> {
        (m < self.h_c * self.w_c)
            .then(|| &self.pixel_values[(1 + m) * Self::CROP_LEN..(2 + m) * Self::CROP_LEN])
    }
}

fn check_num_crops(n: usize, arg: &str) -> Result<()> {
    if n == 0 || n > MAX_NUM_CROPS {
        return Err(Error::InvalidArgument {
            arg: arg.into(),
            reason: format!("num_crops must be between 1 and {MAX_NUM_CROPS}, got {n}"),
        });
    }
    Ok(())
}

fn check_mean_std(mean: [f32; 3], std: [f32; 3], arg: &str) -> Result<()> {
    if mean.iter().any(|v| !v.is_finite()) || std.iter().any(|v| !v.is_finite() || *v == 0.0) {
        return Err(Error::InvalidArgument {
            arg: arg.into(),
            reason: format!(
                "image_mean {mean:?} / image_std {std:?}: values must be finite, std non-zero"
            ),
        });
    }
    Ok(())
}

impl ImageProcessor {
    pub fn new(num_crops: usize, image_mean: [f32; 3], image_std: [f32; 3]) -> Result<Self> {
        check_num_crops(num_crops, "num_crops")?;
        check_mean_std(image_mean, image_std, "image_mean/image_std")?;
        Ok(ImageProcessor {
            num_crops,
            image_mean,
            image_std,
        })
    }

    /// Reads `num_crops`, `image_mean` and `image_std` from `preprocessor_config.json`; a missing
    /// key takes the Phi-3-vision default (16, OpenAI CLIP mean and std). Floats are parsed from
    /// their JSON text with correct rounding to f64, then rounded to f32, as Python then torch do.
    pub fn from_preprocessor_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |reason: String| Error::Config {
            path: path.to_path_buf(),
            reason,
        };
        let map: HashMap<String, Box<RawValue>> =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a JSON object: {e}")))?;
        let mut p = ImageProcessor::default();
        if let Some(raw) = map.get("num_crops") {
            let n: u64 = serde_json::from_str(raw.get()).map_err(|_| {
                bad(format!(
                    "num_crops must be a positive integer, got {}",
                    raw.get()
                ))
            })?;
            let n = usize::try_from(n).unwrap_or(usize::MAX);
            check_num_crops(n, "num_crops").map_err(|e| bad(e.to_string()))?;
            p.num_crops = n;
        }
        let triple = |key: &str| -> Result<Option<[f32; 3]>> {
            let Some(raw) = map.get(key) else {
                return Ok(None);
            };
            let items: Vec<Box<RawValue>> = serde_json::from_str(raw.get())
                .map_err(|_| bad(format!("{key} must be a list of 3 numbers")))?;
            if items.len() != 3 {
                return Err(bad(format!(
                    "{key} must have 3 values, got {}",
                    items.len()
                )));
            }
            let mut out = [0f32; 3];
            for (o, item) in out.iter_mut().zip(&items) {
                let v: f64 = item
                    .get()
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("{key}: `{}` is not a number", item.get())))?;
                *o = v as f32;
            }
            Ok(Some(out))
        };
        if let Some(m) = triple("image_mean")? {
            p.image_mean = m;
        }
        if let Some(s) = triple("image_std")? {
            p.image_std = s;
        }
        check_mean_std(p.image_mean, p.image_std, "image_mean/image_std")
            .map_err(|e| bad(e.to_string()))?;
        Ok(p)
    }

    /// The same settings with another `num_crops` (the `--num-crops` override).
    pub fn with_num_crops(&self, num_crops: usize) -> Result<Self> {
        check_num_crops(num_crops, "--num-crops")?;
        Ok(ImageProcessor {
            num_crops,
            ..self.clone()
        })
    }

    /// These settings, or with `num_crops` when an override is given.
    pub fn with_num_crops_override(&self, num_crops: Option<usize>) -> Result<Self> {
        match num_crops {
            Some(n) => self.with_num_crops(n),
            None => Ok(self.clone()),
        }
    }

    /// Token count of a `width`×`height` image under these settings.
    pub fn num_image_tokens_for_size(&self, width: usize, height: usize) -> Result<usize> {
        calc_num_image_tokens_from_image_size(width, height, self.num_crops)
    }

    /// Preprocesses one RGB image.
    pub fn process(&self, img: &RgbImage) -> Result<ProcessedImage> {
        check_num_crops(self.num_crops, "num_crops")?;
        let hd = hd_transform(img, self.num_crops)?;
        let (h, w) = (hd.height, hd.width);
        let (h_c, w_c) = (h / CROP_SIZE, w / CROP_SIZE);
        if h % CROP_SIZE != 0 || w % CROP_SIZE != 0 || h_c * w_c > self.num_crops {
            return Err(Error::Transform {
                width: img.width,
                height: img.height,
                reason: format!(
                    "HD image {w}x{h} does not tile into at most {} crops of 336",
                    self.num_crops
                ),
            });
        }
        // ToTensor + Normalize over the whole padded HD image: [3, H, W].
        let norm = to_tensor_normalize(&hd, self.image_mean, self.image_std);
        // Global view: bicubic of the normalised HD tensor to [3, 336, 336].
        let global = bicubic_resize_chw(&norm, 3, h, w, CROP_SIZE, CROP_SIZE)?;

        let per = ProcessedImage::CROP_LEN;
        let plane = CROP_SIZE * CROP_SIZE;
        // Zero crops pad the stack to num_crops + 1 (zeros, not normalised white).
        let mut pixel_values = vec![0f32; (self.num_crops + 1) * per];
        pixel_values[..per].copy_from_slice(&global);
        // [3, H, W] -> [1, 3, h_c, 336, w_c, 336] -> permute(0, 2, 4, 1, 3, 5) -> [h_c*w_c, 3, 336, 336]
        for a in 0..h_c {
            for b in 0..w_c {
                let m = a * w_c + b;
                let dst = &mut pixel_values[(1 + m) * per..(2 + m) * per];
                for c in 0..3 {
                    for y in 0..CROP_SIZE {
                        let src_row = c * h * w + (a * CROP_SIZE + y) * w + b * CROP_SIZE;
                        let dst_row = c * plane + y * CROP_SIZE;
                        dst[dst_row..dst_row + CROP_SIZE]
                            .copy_from_slice(&norm[src_row..src_row + CROP_SIZE]);
                    }
                }
            }
        }
        let key = self.features_key(&hd);
        Ok(ProcessedImage {
            hd,
            pixel_values,
            num_crops: self.num_crops,
            h_c,
            w_c,
            image_size: [h, w],
            num_img_tokens: num_image_tokens(h_c, w_c),
            key,
        })
    }

    /// Hashing the HD image rather than `pixel_values` reads a quarter of the bytes.
    fn features_key(&self, hd: &RgbImage) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update((hd.width as u64).to_le_bytes());
        h.update((hd.height as u64).to_le_bytes());
        h.update((self.num_crops as u64).to_le_bytes());
        for v in self.image_mean.iter().chain(&self.image_std) {
            h.update(v.to_le_bytes());
        }
        h.update(&hd.data);
        h.finalize().into()
    }
}
