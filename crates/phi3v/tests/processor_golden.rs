//! The processor against the reference's golden outputs under `fixtures/` (Pillow 10.3.0,
//! torch 2.3.0, torchvision 0.18.0, transformers 4.40.2), without model weights:
//!
//! - `fixtures/golden/decoded/*.png`: Pillow's decoded RGB of each `fixtures/images/*`, byte-exact;
//! - `fixtures/golden/norm_table.safetensors` (`table` [3, 256]): ToTensor + Normalize, bit-exact;
//! - per case `fixtures/golden/<case>/`: `hd_<k>.png` byte-exact, `global_view_<k>` within 1e-5,
//!   `input_ids`, `image_sizes`, `num_img_tokens` exact, and the chat template when the case
//!   stores `messages` and `templated`.
//!
//! Without the fixtures every test prints "SKIPPED: fixtures missing" and passes.

use std::path::{Path, PathBuf};

use phi3v::processor::{
    decode_image, normalize_table, ChatMessage, ImageProcessor, PromptProcessor, RgbImage,
    OPENAI_CLIP_MEAN, OPENAI_CLIP_STD,
};
use safetensors::{Dtype, SafeTensors};

/// Max abs tolerance of the global view (PyTorch bicubic in f32, different summation order
/// possible: a few ulps of values around 2).
const GLOBAL_VIEW_TOL: f32 = 1e-5;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn golden_or_skip(test: &str) -> Option<PathBuf> {
    let g = fixtures().join("golden");
    if g.is_dir() {
        Some(g)
    } else {
        println!(
            "SKIPPED: fixtures missing ({} not found) in {test}",
            g.display()
        );
        None
    }
}

struct Tensors {
    bytes: Vec<u8>,
    path: PathBuf,
}

impl Tensors {
    fn open(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Tensors {
            bytes,
            path: path.to_path_buf(),
        }
    }

    fn get(&self, name: &str) -> Option<(Dtype, Vec<usize>, Vec<u8>)> {
        let st = SafeTensors::deserialize(&self.bytes).expect("validated");
        st.tensor(name)
            .ok()
            .map(|t| (t.dtype(), t.shape().to_vec(), t.data().to_vec()))
    }

    fn f32(&self, name: &str) -> Option<(Vec<usize>, Vec<f32>)> {
        let (dtype, shape, data) = self.get(name)?;
        assert_eq!(
            dtype,
            Dtype::F32,
            "{}: {name} is {dtype:?}",
            self.path.display()
        );
        Some((
            shape,
            data.chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ))
    }

    fn ints(&self, name: &str) -> Option<Vec<i64>> {
        let (dtype, _, data) = self.get(name)?;
        Some(match dtype {
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I32 => data
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
                .collect(),
            other => panic!(
                "{}: {name} is {other:?}, expected an integer tensor",
                self.path.display()
            ),
        })
    }
}

fn max_abs_diff(a: &RgbImage, b: &RgbImage) -> Option<u8> {
    ((a.width, a.height) == (b.width, b.height)).then(|| {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0)
    })
}

#[test]
fn golden_decoded_images() {
    let Some(golden) = golden_or_skip("golden_decoded_images") else {
        return;
    };
    let images = fixtures().join("images");
    let decoded = golden.join("decoded");
    if !decoded.is_dir() || !images.is_dir() {
        println!(
            "SKIPPED: fixtures missing ({} or {})",
            images.display(),
            decoded.display()
        );
        return;
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(&images)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    names.sort();
    let mut failures = Vec::new();
    let mut checked = 0;
    for img_path in names.iter().filter(|p| p.is_file()) {
        let file = img_path.file_name().unwrap().to_string_lossy().to_string();
        let stem = img_path.file_stem().unwrap().to_string_lossy().to_string();
        let Some(reference) = [format!("{file}.png"), format!("{stem}.png")]
            .into_iter()
            .map(|n| decoded.join(n))
            .find(|p| p.is_file())
        else {
            failures.push(format!(
                "{file}: no decoded golden in {}",
                decoded.display()
            ));
            continue;
        };
        let reference = decode_image(&reference).unwrap();
        match decode_image(img_path) {
            Err(e) => failures.push(format!("{file}: {e}")),
            Ok(ours) => match max_abs_diff(&ours, &reference) {
                Some(0) => checked += 1,
                Some(d) => failures.push(format!("{file}: pixels differ from Pillow by up to {d}")),
                None => failures.push(format!(
                    "{file}: {}x{} versus Pillow {}x{}",
                    ours.width, ours.height, reference.width, reference.height
                )),
            },
        }
    }
    assert!(
        failures.is_empty(),
        "decoding differs from Pillow:\n{}",
        failures.join("\n")
    );
    println!("{checked} fixture images decode byte-exact");
}

#[test]
fn golden_norm_table() {
    let Some(golden) = golden_or_skip("golden_norm_table") else {
        return;
    };
    let path = golden.join("norm_table.safetensors");
    if !path.is_file() {
        println!("SKIPPED: fixtures missing ({})", path.display());
        return;
    }
    let t = Tensors::open(&path);
    let (shape, reference) = t.f32("table").expect("tensor `table`");
    assert_eq!(shape, vec![3, 256]);
    let ours = normalize_table(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD);
    for c in 0..3 {
        for v in 0..256 {
            assert_eq!(
                ours[c][v].to_bits(),
                reference[c * 256 + v].to_bits(),
                "channel {c}, byte {v}"
            );
        }
    }
}

#[test]
fn golden_cases() {
    let Some(golden) = golden_or_skip("golden_cases") else {
        return;
    };
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&golden)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("case.json").is_file())
        .collect();
    cases.sort();
    if cases.is_empty() {
        println!(
            "SKIPPED: fixtures missing (no case.json under {})",
            golden.display()
        );
        return;
    }
    let prompt = PromptProcessor::from_dir(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-phi3v"),
    )
    .unwrap();
    let mut failures = Vec::new();
    for dir in &cases {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let spec: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap())
                .unwrap_or_else(|e| panic!("{case}/case.json: {e}"));
        let tensors = Tensors::open(&dir.join("tensors.safetensors"));

        if let (Some(messages), Some(templated)) = (
            spec.get("messages"),
            spec.get("templated").and_then(|t| t.as_str()),
        ) {
            let messages: Vec<ChatMessage> = serde_json::from_value(messages.clone()).unwrap();
            let ours = prompt.apply_chat_template(&messages, true).unwrap();
            if ours != templated {
                failures.push(format!(
                    "{case}: chat template {ours:?} versus {templated:?}"
                ));
            }
        }

        let processor = match spec.get("num_crops").and_then(|n| n.as_u64()) {
            Some(n) => ImageProcessor::default()
                .with_num_crops(n as usize)
                .unwrap(),
            None => ImageProcessor::default(),
        };
        let files: Vec<String> = spec
            .get("images")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let goldens_from: Vec<String> = spec
            .get("image_goldens_from")
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();

        let mut counts = Vec::new();
        let mut sizes = Vec::new();
        for (k, f) in files.iter().enumerate() {
            let img = decode_image(&fixtures().join("images").join(f)).unwrap();
            let p = processor
                .process(&img)
                .unwrap_or_else(|e| panic!("{case}: image {k}: {e}"));
            counts.push(p.num_img_tokens as i64);
            sizes.extend([p.image_size[0] as i64, p.image_size[1] as i64]);

            // HD image and global view: `hd_<k>.png` / `global_view_<k>` in this case, or
            // image 0 of the case named by `image_goldens_from[k]`.
            let (src_dir, idx) = match goldens_from.get(k) {
                Some(other) => (golden.join(other), 0),
                None => (dir.clone(), k),
            };
            let hd_path = src_dir.join(format!("hd_{idx}.png"));
            if hd_path.is_file() {
                let hd_ref = decode_image(&hd_path).unwrap();
                match max_abs_diff(&p.hd, &hd_ref) {
                    Some(0) => {}
                    Some(d) => failures.push(format!("{case}: HD image {k} differs by up to {d}")),
                    None => failures.push(format!(
                        "{case}: HD image {k} is {}x{}, reference {}x{}",
                        p.hd.width, p.hd.height, hd_ref.width, hd_ref.height
                    )),
                }
            }
            let src_tensors = if src_dir == *dir {
                None
            } else {
                Some(Tensors::open(&src_dir.join("tensors.safetensors")))
            };
            let mut gv = src_tensors
                .as_ref()
                .unwrap_or(&tensors)
                .f32(&format!("global_view_{idx}"));
            if gv.is_none() {
                // Not stored when the reference checked it is an exact copy of the normalised
                // 336x336 HD image: rebuild it from `hd_<idx>.png` and the reference's table.
                let src_spec: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(src_dir.join("case.json")).unwrap(),
                )
                .unwrap();
                let is_copy = src_spec["global_view_is_hd_copy"][idx].as_bool() == Some(true);
                assert!(
                    is_copy,
                    "{case}: no global_view_{idx} and not marked as an HD copy"
                );
                let (_, table) = Tensors::open(&golden.join("norm_table.safetensors"))
                    .f32("table")
                    .expect("tensor `table`");
                let hd_ref = decode_image(&hd_path).unwrap();
                assert_eq!(
                    (hd_ref.width, hd_ref.height),
                    (336, 336),
                    "{case}: HD copy must be 336x336"
                );
                let rebuilt = phi3v::parity::normalize_with_table(&hd_ref, &table);
                gv = Some((vec![3, 336, 336], rebuilt));
            }
            if let Some((shape, reference)) = gv {
                assert_eq!(shape, vec![3, 336, 336], "{case}: global_view_{idx}");
                let max = p
                    .global_view()
                    .iter()
                    .zip(&reference)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                let n_diff = p
                    .global_view()
                    .iter()
                    .zip(&reference)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                println!("{case}: global view {k}: max abs {max:.3e}, {n_diff} of {} values not bit-equal", reference.len());
                if max > GLOBAL_VIEW_TOL || max.is_nan() {
                    failures.push(format!(
                        "{case}: global view {k} max abs {max:e} > {GLOBAL_VIEW_TOL:e}"
                    ));
                }
            }
        }

        let text = spec
            .get("prompt")
            .and_then(|p| p.as_str())
            .expect("case.json: prompt");
        match prompt.encode(
            text,
            &counts.iter().map(|&c| c as usize).collect::<Vec<_>>(),
        ) {
            Err(e) => failures.push(format!("{case}: encode: {e}")),
            Ok(ids) => {
                if let Some(reference) = tensors.ints("input_ids") {
                    if ids != reference {
                        let first = ids.iter().zip(&reference).position(|(a, b)| a != b);
                        failures.push(format!(
                            "{case}: input_ids differ (ours {} ids, reference {}; first difference at {first:?})",
                            ids.len(),
                            reference.len()
                        ));
                    }
                }
            }
        }
        if !files.is_empty() {
            if let Some(reference) = tensors.ints("image_sizes") {
                if sizes != reference {
                    failures.push(format!(
                        "{case}: image_sizes {sizes:?} versus {reference:?}"
                    ));
                }
            }
            if let Some(reference) = tensors.ints("num_img_tokens") {
                if counts != reference {
                    failures.push(format!(
                        "{case}: num_img_tokens {counts:?} versus {reference:?}"
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "golden mismatches:\n{}",
        failures.join("\n")
    );
}
