//! Byte-exact agreement with Pillow 10.3.0 on small fixtures made by
//! `tests/data/pillow/make_fixtures.py`: decoding (every format and mode we accept), the
//! bilinear resize, and the HD transform.

use std::path::{Path, PathBuf};

use phi3v::processor::{decode_image, decode_image_bytes, hd_transform, resize_bilinear, RgbImage};

fn data_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/pillow")
}

fn manifest() -> serde_json::Value {
    let text = std::fs::read_to_string(data_dir().join("manifest.json")).expect("manifest.json");
    serde_json::from_str(&text).expect("manifest json")
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Files we refuse on purpose although Pillow reads them (none at present).
const REFUSED_ON_PURPOSE: &[&str] = &[];

/// Files whose decoder differs from Pillow's bundled library, to compare loosely (none at
/// present: lossy WebP goes through the pure-Rust image-webp, not libwebp 1.3.2, yet agrees on
/// these fixtures).
const APPROXIMATE: &[&str] = &[];

#[test]
fn decode_matches_pillow() {
    let m = manifest();
    let mut checked = 0;
    let mut failures = Vec::new();
    for e in m["decode"].as_array().unwrap() {
        let file = e["file"].as_str().unwrap();
        let path = data_dir().join("decode").join(file);
        let ours = decode_image(&path);
        if let Some(err) = e.get("pillow_error") {
            match ours {
                Ok(img) => failures.push(format!(
                    "{file}: Pillow refuses it ({err}) but we decoded {}x{}",
                    img.width, img.height
                )),
                Err(ours) => {
                    let msg = ours.to_string();
                    assert!(
                        msg.contains(file),
                        "{file}: the error must name the file: {msg}"
                    );
                }
            }
            checked += 1;
            continue;
        }
        if REFUSED_ON_PURPOSE.contains(&file) {
            assert!(ours.is_err(), "{file}");
            continue;
        }
        let (w, h) = (
            e["width"].as_u64().unwrap() as usize,
            e["height"].as_u64().unwrap() as usize,
        );
        let expected = read(&data_dir().join("decode").join(format!("{file}.rgb")));
        let img = match ours {
            Ok(img) => img,
            Err(err) => {
                failures.push(format!("{file}: we fail where Pillow decodes it: {err}"));
                continue;
            }
        };
        if (img.width, img.height) != (w, h) {
            failures.push(format!(
                "{file}: size {}x{} versus Pillow {w}x{h}",
                img.width, img.height
            ));
            continue;
        }
        let diff: Vec<u8> = img
            .data
            .iter()
            .zip(&expected)
            .map(|(a, b)| a.abs_diff(*b))
            .collect();
        let n_diff = diff.iter().filter(|&&d| d != 0).count();
        let max = diff.iter().copied().max().unwrap_or(0);
        if APPROXIMATE.contains(&file) {
            // Loose: a few levels on a minority of samples.
            if max > 8 || n_diff * 4 > diff.len() {
                failures.push(format!(
                    "{file}: {n_diff}/{} samples differ, max {max}",
                    diff.len()
                ));
            } else if n_diff > 0 {
                eprintln!("note: {file}: {n_diff}/{} samples differ from Pillow, max {max} (approximate decoder)", diff.len());
            }
        } else if n_diff != 0 {
            failures.push(format!(
                "{file} ({}): {n_diff}/{} samples differ, max {max}",
                e["mode"],
                diff.len()
            ));
        }
        checked += 1;
    }
    assert!(
        failures.is_empty(),
        "decode mismatches:\n{}",
        failures.join("\n")
    );
    assert!(checked >= 40, "only {checked} fixtures checked");
}

#[test]
fn decode_from_bytes_equals_decode_from_file() {
    let path = data_dir().join("decode/q90_420.jpg");
    let a = decode_image(&path).unwrap();
    let b = decode_image_bytes(&read(&path), "q90_420.jpg").unwrap();
    assert_eq!(a, b);
}

#[test]
fn format_is_sniffed_not_taken_from_the_name() {
    // A PNG named .jpg and a JPEG named .png decode as what they are.
    let png = read(&data_dir().join("decode/rgb8.png"));
    let jpg = read(&data_dir().join("decode/q95_444.jpg"));
    let a = decode_image_bytes(&png, "really_a_png.jpg").unwrap();
    assert_eq!(
        a,
        decode_image(&data_dir().join("decode/rgb8.png")).unwrap()
    );
    let b = decode_image_bytes(&jpg, "really_a_jpeg.png").unwrap();
    assert_eq!(
        b,
        decode_image(&data_dir().join("decode/q95_444.jpg")).unwrap()
    );
}

#[test]
fn resize_matches_pillow() {
    let m = manifest();
    let src_wh = m["resize_src"].as_array().unwrap();
    let (sw, sh) = (
        src_wh[0].as_u64().unwrap() as usize,
        src_wh[1].as_u64().unwrap() as usize,
    );
    let src = RgbImage::new(sw, sh, read(&data_dir().join("resize/src.rgb"))).unwrap();
    let cases = m["resize"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for c in cases {
        let (w, h) = (
            c[0].as_u64().unwrap() as usize,
            c[1].as_u64().unwrap() as usize,
        );
        let expected = read(&data_dir().join(format!("resize/{w}x{h}.rgb")));
        let ours = resize_bilinear(&src, w, h).unwrap();
        assert_eq!((ours.width, ours.height), (w, h));
        let n_diff = ours
            .data
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            n_diff, 0,
            "{sw}x{sh} -> {w}x{h}: {n_diff} samples differ from Pillow"
        );
    }
}

#[test]
fn hd_transform_matches_reference() {
    let m = manifest();
    for c in m["hd"].as_array().unwrap() {
        let name = c["name"].as_str().unwrap();
        let n = c["num_crops"].as_u64().unwrap() as usize;
        let src = decode_image(&data_dir().join(format!("hd/{name}_src.png"))).unwrap();
        let expected = decode_image(&data_dir().join(format!("hd/{name}.png"))).unwrap();
        let ours = hd_transform(&src, n).unwrap();
        assert_eq!(
            (ours.width, ours.height),
            (expected.width, expected.height),
            "{name}"
        );
        let n_diff = ours
            .data
            .iter()
            .zip(&expected.data)
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(n_diff, 0, "{name}: {n_diff} samples differ");
    }
}
