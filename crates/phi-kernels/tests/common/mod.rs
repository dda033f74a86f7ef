//! Shared test helpers: a seeded RNG, NaN-poisoned outputs and the one tolerance check.
//!
//! Tolerances (`Tol`) are stated per op and dtype in one place, [`tol`]. Weights in bf16/f16 are
//! widened exactly to f32 by both the kernels and the references, so the storage dtype does not
//! change a tolerance: what matters is f32 accumulation against the f64 references.
#![allow(dead_code)]

use half::{bf16, f16};
use phi_kernels::{Isa, Weight};

/// splitmix64: tiny, seedable, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`.
    pub fn f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// `n` values uniform in `[-scale, scale)`.
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// Output buffer full of NaN, so any element a kernel forgets to write fails the check.
pub fn poisoned(n: usize) -> Vec<f32> {
    vec![f32::NAN; n]
}

/// Owned weights in one storage dtype, viewable as a [`Weight`].
pub enum OwnedWeight {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum WDType {
    F32,
    Bf16,
    F16,
}

pub const WDTYPES: [WDType; 3] = [WDType::F32, WDType::Bf16, WDType::F16];

impl OwnedWeight {
    pub fn random(rng: &mut Rng, n: usize, scale: f32, dtype: WDType) -> Self {
        let v = rng.vec(n, scale);
        match dtype {
            WDType::F32 => OwnedWeight::F32(v),
            WDType::Bf16 => OwnedWeight::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            WDType::F16 => OwnedWeight::F16(v.iter().map(|&x| f16::from_f32(x)).collect()),
        }
    }

    pub fn view(&self) -> Weight<'_> {
        match self {
            OwnedWeight::F32(v) => Weight::F32(v),
            OwnedWeight::Bf16(v) => Weight::Bf16(v),
            OwnedWeight::F16(v) => Weight::F16(v),
        }
    }
}

/// Every instruction set this CPU runs, each checked against the reference.
pub fn isas() -> Vec<Isa> {
    Isa::available()
}

/// Element-wise `|got - want| <= atol + rtol·|want|`, plus a relative L2 bound on the whole
/// buffer (`‖got - want‖ <= rel_l2·‖want‖ + atol·√n`, the absolute floor so all-tiny outputs
/// do not divide by ~0), which catches small systematic errors. NaN never passes.
#[derive(Copy, Clone, Debug)]
pub struct Tol {
    pub atol: f32,
    pub rtol: f32,
    pub rel_l2: f64,
}

/// Bit-exact (copies, gathers).
pub const EXACT: Tol = Tol {
    atol: 0.0,
    rtol: 0.0,
    rel_l2: 0.0,
};

/// The per-op tolerances, all for f32 activations (weights of any dtype widen exactly).
pub mod tol {
    use super::Tol;

    /// f32 accumulation over `k` products of values in [-1, 1]: the rounding error of a sum
    /// grows with its length, so atol scales with `k` (about 50x the typical error).
    pub fn gemm(k: usize) -> Tol {
        Tol {
            atol: 1e-6 * (k as f32 + 1.0),
            rtol: 1e-5,
            rel_l2: 1e-5,
        }
    }
    /// Two-pass statistics in f32 over a row.
    pub const NORM: Tol = Tol {
        atol: 2e-5,
        rtol: 2e-5,
        rel_l2: 2e-6,
    };
    /// One polynomial `exp`/`erf` (~1e-7 relative) plus a division.
    pub const ACTIVATION: Tol = Tol {
        atol: 1e-6,
        rtol: 1e-5,
        rel_l2: 1e-6,
    };
    /// `exp` per element and an f32 row sum.
    pub const SOFTMAX: Tol = Tol {
        atol: 1e-8,
        rtol: 2e-5,
        rel_l2: 2e-6,
    };
    /// One complex multiply per pair; FMA vs separate rounding.
    pub const ROPE: Tol = Tol {
        atol: 1e-6,
        rtol: 1e-6,
        rel_l2: 1e-6,
    };
    /// Online softmax in f32 over the keys, dot products over head_dim.
    pub const ATTENTION: Tol = Tol {
        atol: 2e-5,
        rtol: 1e-4,
        rel_l2: 1e-5,
    };
}

/// Panics with the first few mismatches if `got` is not within `tol` of `want`.
#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: Tol) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut bad = Vec::new();
    let (mut num, mut den) = (0f64, 0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        // Negated so that NaN (which compares false) fails.
        #[allow(clippy::neg_cmp_op_on_partial_ord)]
        if !(d <= tol.atol + tol.rtol * w.abs()) {
            bad.push((i, g, w));
        }
        if w.is_finite() {
            num += (g as f64 - w as f64).powi(2);
            den += (w as f64).powi(2);
        }
    }
    if !bad.is_empty() {
        let first: Vec<String> = bad
            .iter()
            .take(5)
            .map(|(i, g, w)| format!("[{i}] got {g} want {w}"))
            .collect();
        panic!(
            "{what}: {} of {} elements out of tolerance {tol:?}: {}",
            bad.len(),
            got.len(),
            first.join(", ")
        );
    }
    let (err, norm) = (num.sqrt(), den.sqrt());
    let bound = tol.rel_l2 * norm + tol.atol as f64 * (got.len() as f64).sqrt();
    assert!(
        err <= bound,
        "{what}: L2 error {err:e} > {bound:e} (relative {:e})",
        err / norm
    );
}

/// proptest case count: `default` unless `PROPTEST_CASES` says otherwise.
pub fn proptest_cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// The blocked GEMM at the packed-B block width `PHI_KERNELS_NC` sets, against the f64
/// reference on every instruction set: blocks of both widths, ragged last blocks, two KC
/// slices, and the SwiGLU pairing of half blocks. For a test binary of its own (the width is
/// read once per process), so both widths are tested whatever this machine's L2 picks.
pub fn gemm_at_block_width(width: &str) {
    use phi_kernels::cpu::gemm::{gemm_fused_ref, gemm_fused_with, ARows, GemmOpts};
    // SAFETY (of set_var): the binary's only test runs this before any thread reads the
    // environment.
    unsafe { std::env::set_var("PHI_KERNELS_NC", width) };
    for isa in isas() {
        for (s, &(m, n, k)) in [(40, 300, 1100), (17, 256, 64), (9, 130, 40)]
            .iter()
            .enumerate()
        {
            let mut rng = Rng::new(1200 + s as u64);
            let a = rng.vec(m * k, 1.0);
            let b: Vec<bf16> = rng
                .vec(n * k, 1.0)
                .into_iter()
                .map(bf16::from_f32)
                .collect();
            let bias = rng.vec(n, 1.0);
            let w = Weight::Bf16(&b);
            let opts = GemmOpts {
                bias: Some(&bias),
                ..GemmOpts::default()
            };
            let a = ARows::dense(&a, k);
            let what = format!("nc={width} {isa:?} {m}x{n}x{k}");
            let (mut got, mut want) = (poisoned(m * n), poisoned(m * n));
            let (mut act, mut act_want) = (poisoned(m * n / 2), poisoned(m * n / 2));
            gemm_fused_with(
                isa,
                a,
                w,
                &mut got,
                n,
                m,
                n,
                k,
                &opts,
                Some((&mut act, n / 2)),
            );
            gemm_fused_ref(
                a,
                w,
                &mut want,
                n,
                m,
                n,
                k,
                &opts,
                Some((&mut act_want, n / 2)),
            );
            assert_close(&what, &got, &want, tol::gemm(k));
            assert_close(&what, &act, &act_want, tol::gemm(k));
        }
    }
}
