//! Stage-by-stage comparison of this engine with golden tensors from the reference
//! implementation (PyTorch + transformers + Pillow, written by `cargo xtask fixtures` into
//! `fixtures/golden/<case>/`). `cargo xtask parity` prints the table; the tests assert it.

use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use crate::processor::{decode_image, RgbImage};
use crate::sampling::SamplingParams;
use crate::trace::Trace;
use crate::{Error, GenerateOptions, Pipeline, Result};

/// Tolerances of issue #2: relative L2 for float stages, max-abs for pixels.
pub const REL_L2_TOL: f64 = 1e-4;
pub const PIXEL_ABS_TOL: f64 = 1e-5;
/// Greedy tokens must agree wherever the reference's top-2 margin exceeds this.
pub const MARGIN_TOL: f32 = 1e-3;

#[derive(Debug, Clone)]
pub struct Row {
    pub case: String,
    pub stage: String,
    pub shape: Vec<usize>,
    pub max_abs: f64,
    pub rel_l2: f64,
    pub pass: bool,
    pub note: String,
}

impl Row {
    pub fn format_table(rows: &[Row]) -> String {
        let mut s = format!(
            "{:<16} {:<26} {:<20} {:>12} {:>12}  {}\n",
            "case", "stage", "shape", "max abs", "rel L2", "result"
        );
        for r in rows {
            let shape: Vec<String> = r.shape.iter().map(|d| d.to_string()).collect();
            s += &format!(
                "{:<16} {:<26} {:<20} {:>12.3e} {:>12.3e}  {}{}\n",
                r.case,
                r.stage,
                format!("[{}]", shape.join(",")),
                r.max_abs,
                r.rel_l2,
                if r.pass { "pass" } else { "FAIL" },
                if r.note.is_empty() {
                    String::new()
                } else {
                    format!("  ({})", r.note)
                }
            );
        }
        s
    }
}

/// Max absolute and relative L2 (`‖a-b‖ / ‖b‖`) errors of `ours` against `reference`.
pub fn errors(ours: &[f32], reference: &[f32]) -> (f64, f64) {
    if ours.len() != reference.len() {
        return (f64::INFINITY, f64::INFINITY);
    }
    let (mut max, mut num, mut den) = (0f64, 0f64, 0f64);
    for (&a, &b) in ours.iter().zip(reference) {
        let d = (a as f64 - b as f64).abs();
        if d.is_nan() {
            return (f64::NAN, f64::NAN);
        }
        max = max.max(d);
        num += d * d;
        den += (b as f64) * (b as f64);
    }
    (
        max,
        if den == 0.0 {
            num.sqrt()
        } else {
            (num / den).sqrt()
        },
    )
}

/// `image` (HWC uint8) as a CHW f32 tensor through the reference's ToTensor + Normalize table
/// (`table [3, 256]`): how the goldens stand in for a normalised image they did not store.
pub fn normalize_with_table(image: &RgbImage, table: &[f32]) -> Vec<f32> {
    let plane = image.width * image.height;
    (0..3 * plane)
        .map(|i| {
            let (c, px) = (i / plane, i % plane);
            table[c * 256 + image.data[px * 3 + c] as usize]
        })
        .collect()
}

/// The case folders under `fixtures/golden`, sorted.
pub fn cases(fixtures: &Path) -> Result<Vec<String>> {
    let golden = fixtures.join("golden");
    let rd = std::fs::read_dir(&golden).map_err(|source| Error::Io {
        path: golden.clone(),
        source,
    })?;
    let mut v: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("case.json").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    Ok(v)
}

/// Golden tensors of one case.
pub struct Golden {
    bytes: Vec<u8>,
    pub path: PathBuf,
}

impl Golden {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::Input(format!("{}: {e}", path.display())))?;
        Ok(Golden {
            bytes,
            path: path.to_path_buf(),
        })
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("validated in open")
    }

    pub fn has(&self, name: &str) -> bool {
        self.st().tensor(name).is_ok()
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let st = self.st();
        let t = st
            .tensor(name)
            .map_err(|e| Error::Input(format!("{}: {name}: {e}", self.path.display())))?;
        Ok(t.shape().to_vec())
    }

    pub fn f32(&self, name: &str) -> Result<Vec<f32>> {
        let st = self.st();
        let t = st
            .tensor(name)
            .map_err(|e| Error::Input(format!("{}: {name}: {e}", self.path.display())))?;
        Ok(t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    pub fn i64(&self, name: &str) -> Result<Vec<i64>> {
        let st = self.st();
        let t = st
            .tensor(name)
            .map_err(|e| Error::Input(format!("{}: {name}: {e}", self.path.display())))?;
        Ok(t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect())
    }
}

/// `case.json`.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct CaseSpec {
    #[serde(default)]
    pub images: Vec<String>,
    #[serde(default)]
    pub num_crops: Option<usize>,
    pub prompt: String,
    pub max_new_tokens: usize,
    #[serde(default)]
    pub messages: Option<Vec<crate::processor::ChatMessage>>,
    #[serde(default)]
    pub templated: Option<String>,
    /// Case holding image k's goldens (`hd_0.png`, `global_view_0`, `clip_hidden`,
    /// `image_embeds`); the fixtures store each (image, num_crops) once.
    #[serde(default)]
    pub image_goldens_from: Vec<String>,
    /// Per stored image: the reference checked that its global view is an exact copy of the
    /// normalised 336×336 HD image and did not store `global_view_k`.
    #[serde(default)]
    pub global_view_is_hd_copy: Vec<bool>,
    /// Per decoder forward call (prefill first): whether the reference used the long factors.
    #[serde(default)]
    pub rope_long_per_call: Vec<bool>,
}

impl CaseSpec {
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join("case.json");
        let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        serde_json::from_str(&text).map_err(|e| Error::Input(format!("{}: {e}", path.display())))
    }
}

fn exact_row(case: &str, stage: &str, shape: Vec<usize>, ours: &[i64], reference: &[i64]) -> Row {
    let diff = if ours.len() != reference.len() {
        f64::INFINITY
    } else {
        ours.iter()
            .zip(reference)
            .map(|(a, b)| (a - b).unsigned_abs() as f64)
            .fold(0.0, f64::max)
    };
    Row {
        case: case.into(),
        stage: stage.into(),
        shape,
        max_abs: diff,
        rel_l2: if diff == 0.0 { 0.0 } else { f64::NAN },
        pass: diff == 0.0,
        note: if ours.len() != reference.len() {
            format!("length {} vs {}", ours.len(), reference.len())
        } else {
            String::new()
        },
    }
}

fn float_row(case: &str, stage: &str, shape: Vec<usize>, ours: &[f32], reference: &[f32]) -> Row {
    let (max_abs, rel_l2) = errors(ours, reference);
    Row {
        case: case.into(),
        stage: stage.into(),
        shape,
        max_abs,
        rel_l2,
        pass: rel_l2 <= REL_L2_TOL,
        note: String::new(),
    }
}

fn image_row(case: &str, stage: &str, ours: &RgbImage, reference: &RgbImage) -> Row {
    let same_size = ours.width == reference.width && ours.height == reference.height;
    let max_abs = if same_size {
        ours.data
            .iter()
            .zip(&reference.data)
            .map(|(&a, &b)| (a as i32 - b as i32).unsigned_abs())
            .max()
            .unwrap_or(0) as f64
    } else {
        f64::INFINITY
    };
    Row {
        case: case.into(),
        stage: stage.into(),
        shape: vec![ours.height, ours.width, 3],
        max_abs,
        rel_l2: if max_abs == 0.0 { 0.0 } else { f64::NAN },
        pass: max_abs == 0.0,
        note: if same_size {
            String::new()
        } else {
            format!("reference is {}x{}", reference.width, reference.height)
        },
    }
}

/// Runs one case through `pipeline` and compares every stage with the goldens.
pub fn run_case(pipeline: &Pipeline, fixtures: &Path, case: &str) -> Result<Vec<Row>> {
    let dir = fixtures.join("golden").join(case);
    let spec = CaseSpec::load(&dir)?;
    let golden = Golden::open(&dir.join("tensors.safetensors"))?;
    let norm_table = Golden::open(&fixtures.join("golden/norm_table.safetensors"))?.f32("table")?;
    let mut rows = Vec::new();

    if let (Some(messages), Some(templated)) = (&spec.messages, &spec.templated) {
        let ours = pipeline.prompt.apply_chat_template(messages, true)?;
        rows.push(Row {
            case: case.into(),
            stage: "chat template".into(),
            shape: vec![ours.len()],
            max_abs: if &ours == templated {
                0.0
            } else {
                f64::INFINITY
            },
            rel_l2: 0.0,
            pass: &ours == templated,
            note: String::new(),
        });
    }

    let processor = pipeline
        .image_processor
        .with_num_crops_override(spec.num_crops)?;
    let images: Vec<RgbImage> = spec
        .images
        .iter()
        .map(|f| decode_image(&fixtures.join("images").join(f)))
        .collect::<std::result::Result<_, _>>()?;
    let trace = Trace::new(false);
    let prepared = pipeline.prepare(&images, &spec.prompt, &processor, &trace)?;

    rows.push(exact_row(
        case,
        "input_ids",
        vec![prepared.input_ids.len()],
        &prepared.input_ids,
        &golden.i64("input_ids")?,
    ));
    if !images.is_empty() {
        let sizes: Vec<i64> = prepared
            .images
            .iter()
            .flat_map(|p| [p.image_size[0] as i64, p.image_size[1] as i64])
            .collect();
        rows.push(exact_row(
            case,
            "image_sizes",
            vec![images.len(), 2],
            &sizes,
            &golden.i64("image_sizes")?,
        ));
        let counts: Vec<i64> = prepared
            .images
            .iter()
            .map(|p| p.num_img_tokens as i64)
            .collect();
        rows.push(exact_row(
            case,
            "num_img_tokens",
            vec![images.len()],
            &counts,
            &golden.i64("num_img_tokens")?,
        ));
    }
    // Image goldens live in the case named by `image_goldens_from[k]`, as its image 0.
    let golden_dir = |k: usize| {
        fixtures
            .join("golden")
            .join(spec.image_goldens_from.get(k).map_or(case, |s| s.as_str()))
    };
    let mut image_embeds_ref = Vec::new();
    for (k, p) in prepared.images.iter().enumerate() {
        let src = golden_dir(k);
        let src_golden = Golden::open(&src.join("tensors.safetensors"))?;
        let hd_ref = decode_image(&src.join("hd_0.png"))?;
        rows.push(image_row(
            case,
            &format!("HD image {k} (uint8)"),
            &p.hd,
            &hd_ref,
        ));
        let global_ref = if src_golden.has("global_view_0") {
            src_golden.f32("global_view_0")?
        } else if CaseSpec::load(&src)?.global_view_is_hd_copy.first() == Some(&true)
            && hd_ref.width == 336
            && hd_ref.height == 336
        {
            // The reference verified the copy when it wrote the fixtures.
            normalize_with_table(&hd_ref, &norm_table)
        } else {
            return Err(Error::Input(format!("{}: no global_view_0", src.display())));
        };
        rows.push(pixel_values_row(
            case,
            k,
            p,
            &hd_ref,
            &norm_table,
            &global_ref,
        ));
        image_embeds_ref.extend(src_golden.f32("image_embeds")?);
        if k == 0 {
            let n = 2.min(1 + p.h_c * p.w_c);
            let per_crop = 3 * 336 * 336;
            let hidden = pipeline
                .model
                .clip
                .forward(&p.pixel_values[..n * per_crop], n)?;
            let shape = src_golden.shape("clip_hidden")?;
            rows.push(float_row(
                case,
                "CLIP hidden_states[-2]",
                shape,
                &hidden,
                &src_golden.f32("clip_hidden")?,
            ));
        }
    }

    let opts = GenerateOptions {
        max_new_tokens: spec.max_new_tokens,
        sampling: SamplingParams::default(),
        ignore_stop: true,
    };
    let gen = pipeline.generate(&prepared, &opts, &trace, |_| {})?;
    let h = pipeline.model.decoder.hidden_size();
    if !prepared.images.is_empty() {
        rows.push(float_row(
            case,
            "image_embeds",
            vec![gen.image_embeds.len() / h, h],
            &gen.image_embeds,
            &image_embeds_ref,
        ));
    }
    // The fixtures do not store inputs_embeds: it is the checkpoint's embedding rows at
    // clamp(reference ids, 0) with the reference image features scattered in order.
    let ref_ids = golden.i64("input_ids")?;
    let mut inputs_ref = pipeline.model.decoder.embed(&ref_ids)?;
    let img_rows: Vec<usize> = ref_ids
        .iter()
        .enumerate()
        .filter(|(_, &id)| id < 0)
        .map(|(i, _)| i)
        .collect();
    if img_rows.len() * h == image_embeds_ref.len() {
        phi_kernels::cpu::embedding::scatter_rows(&mut inputs_ref, &img_rows, &image_embeds_ref, h);
    }
    rows.push(float_row(
        case,
        "inputs_embeds",
        vec![gen.prompt_len, h],
        &gen.inputs_embeds,
        &inputs_ref,
    ));
    rows.push(float_row(
        case,
        "logits (last prompt pos)",
        vec![gen.prompt_logits.len()],
        &gen.prompt_logits,
        &golden.f32("logits")?,
    ));

    if !spec.rope_long_per_call.is_empty() {
        let ours: Vec<bool> = gen
            .rope_factors
            .iter()
            .map(|f| *f == phi_decoder::RopeFactors::Long)
            .collect();
        let n_long = ours.iter().filter(|&&l| l).count();
        let same = ours == spec.rope_long_per_call;
        rows.push(Row {
            case: case.into(),
            stage: "rope factors per call".into(),
            shape: vec![ours.len()],
            max_abs: if same { 0.0 } else { 1.0 },
            rel_l2: 0.0,
            pass: same,
            note: format!("{n_long} of {} calls long", ours.len()),
        });
    }

    // Greedy tokens: equal up to the first step whose reference margin is within rounding.
    let ref_ids = golden.i64("generated_ids")?;
    let margins = golden.f32("generated_margins")?;
    let ours: Vec<i64> = gen.ids.iter().map(|&i| i as i64).collect();
    let mut checked = 0;
    let mut pass = ours.len() == ref_ids.len();
    for i in 0..ours.len().min(ref_ids.len()) {
        if margins[i] <= MARGIN_TOL {
            break;
        }
        checked += 1;
        if ours[i] != ref_ids[i] {
            pass = false;
            break;
        }
    }
    rows.push(Row {
        case: case.into(),
        stage: "greedy tokens".into(),
        shape: vec![ours.len()],
        max_abs: if pass { 0.0 } else { 1.0 },
        rel_l2: 0.0,
        pass,
        note: format!(
            "{checked}/{} compared (margin > {MARGIN_TOL})",
            ref_ids.len()
        ),
    });
    Ok(rows)
}

/// `pixel_values[k]`: the global view against PyTorch's bicubic output, the sub-crops against
/// the reference HD image through the reference's own normalisation table, padding all zero.
fn pixel_values_row(
    case: &str,
    k: usize,
    p: &crate::processor::ProcessedImage,
    hd_ref: &RgbImage,
    table: &[f32],
    global_ref: &[f32],
) -> Row {
    let plane = 336 * 336;
    let per_crop = 3 * plane;
    let (mut max_abs, mut num, mut den) = (0f64, 0f64, 0f64);
    let mut acc = |a: f32, b: f32| {
        let d = (a as f64 - b as f64).abs();
        max_abs = if d.is_nan() { f64::NAN } else { max_abs.max(d) };
        num += d * d;
        den += (b as f64).powi(2);
    };
    for (a, b) in p.pixel_values[..per_crop].iter().zip(global_ref) {
        acc(*a, *b);
    }
    let (w, hc, wc) = (hd_ref.width, p.h_c, p.w_c);
    for m in 0..hc * wc {
        let (a, b) = (m / wc, m % wc);
        let crop = &p.pixel_values[(1 + m) * per_crop..(2 + m) * per_crop];
        for c in 0..3 {
            for y in 0..336 {
                for x in 0..336 {
                    let px = hd_ref
                        .data
                        .get(((a * 336 + y) * w + b * 336 + x) * 3 + c)
                        .copied()
                        .unwrap_or(0);
                    acc(crop[c * plane + y * 336 + x], table[c * 256 + px as usize]);
                }
            }
        }
    }
    for v in &p.pixel_values[(1 + hc * wc) * per_crop..] {
        acc(*v, 0.0);
    }
    Row {
        case: case.into(),
        stage: format!("pixel_values {k}"),
        shape: vec![p.num_crops + 1, 3, 336, 336],
        max_abs,
        rel_l2: (num / den.max(1e-300)).sqrt(),
        pass: max_abs <= PIXEL_ABS_TOL,
        note: String::new(),
    }
}
