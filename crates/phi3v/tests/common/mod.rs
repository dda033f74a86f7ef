//! Helpers shared by the integration tests that compare two runs of the pipeline.
#![allow(dead_code)]

use std::path::PathBuf;

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
