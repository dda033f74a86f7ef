//! Helpers shared by the integration tests that compare two runs of the pipeline.
#![allow(dead_code)]

use std::path::PathBuf;

use phi3v::processor::{decode_image, RgbImage};
use phi3v::sampling::SamplingParams;
use phi3v::GenerateOptions;

/// The repository's `fixtures/`; `PHI3V_REPO_ROOT` points there when a test binary runs away
/// from its checkout (the device bundle).
pub fn fixtures() -> PathBuf {
    std::env::var_os("PHI3V_REPO_ROOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .join("fixtures")
}

/// ‖got − want‖ / ‖want‖; a non-finite value never passes.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den).sqrt()
}

/// The index of the largest value and its lead over the second largest.
pub fn argmax_and_margin(row: &[f32]) -> (usize, f32) {
    let (mut best, mut second) = ((0, f32::MIN), f32::MIN);
    for (i, &v) in row.iter().enumerate() {
        if v > best.1 {
            second = best.1;
            best = (i, v);
        } else if v > second {
            second = v;
        }
    }
    (best.0, best.1 - second)
}

/// Greedy decoding of exactly `n` tokens (stop ids ignored: random weights rarely stop, and
/// two runs then compare position by position).
pub fn greedy(n: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens: n,
        sampling: SamplingParams::default(),
        ignore_stop: true,
    }
}

/// The prompts two pipeline runs are compared on: one image, two images, text only.
pub fn comparison_cases() -> Vec<(&'static str, Vec<RgbImage>)> {
    let landscape = decode_image(&fixtures().join("images/landscape.jpg")).unwrap();
    let portrait = decode_image(&fixtures().join("images/portrait.png")).unwrap();
    vec![
        ("Describe the image.", vec![landscape.clone()]),
        ("Compare the two pictures.", vec![landscape, portrait]),
        ("Write a haiku about the sea.", vec![]),
    ]
}
