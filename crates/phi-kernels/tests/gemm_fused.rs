//! The fused GEMMs: a LayerNorm, an RMSNorm or the 2×2 merge made inside the packing of A, and
//! SwiGLU in the epilogue. On every instruction set (and on the scalar twins of the bf16
//! hardware kernels) each must give exactly what the unfused passes give, bit for bit, and
//! match the f64 oracle `gemm_fused_ref`.

mod common;

use common::{assert_close, isas, poisoned, Rng, Tol};
use half::bf16;
use phi_kernels::cpu::activation::silu_mul_with;
use phi_kernels::cpu::gemm::{
    gemm_emulated, gemm_fused_ref, gemm_fused_with, gemm_opts_with, ARows, Emulated, GemmOpts,
    MergedRows,
};
use phi_kernels::cpu::layer_norm::layer_norm_with;
use phi_kernels::cpu::merge_2x2_ref;
use phi_kernels::cpu::rms_norm::rms_norm_with;
use phi_kernels::{DType, Isa, Weight};

/// `m, n, k`: decode rows (1, 3, 4: the GEMV), the blocked path's tile edges, k with masked
/// tails and across two KC slices, and enough rows that the packing itself runs in parallel.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 33, 64),
    (3, 70, 100),
    (4, 40, 1031),
    (5, 33, 77),
    (29, 65, 1024 + 45),
    (400, 130, 100),
];

fn assert_bits(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            g.to_bits() == w.to_bits(),
            "{what}: [{i}] fused {g} unfused {w}"
        );
    }
}

/// The oracle's tolerance. Norm outputs reach a few units (not [-1, 1] as `tol::gemm` assumes);
/// with bf16 products, a normalised value on a rounding boundary may round the other way in
/// f64 than in f32, moving single products by 2⁻⁸ of their size.
fn oracle_tol(k: usize, precision: DType) -> Tol {
    match precision {
        DType::BF16 => Tol {
            atol: 2e-3 * (k as f32).sqrt(),
            rtol: 2e-3,
            rel_l2: 2e-3,
        },
        _ => Tol {
            atol: 1e-6 * (k as f32 + 1.0),
            rtol: 2e-5,
            rel_l2: 1e-5,
        },
    }
}

fn bf16_weights(rng: &mut Rng, len: usize) -> Vec<bf16> {
    rng.vec(len, 1.0).into_iter().map(bf16::from_f32).collect()
}

#[derive(Copy, Clone, Debug)]
enum Norm {
    Layer,
    Rms,
}

/// Rows with an offset, so the mean matters (LayerNorm) and the scale is not 1.
fn norm_input(rng: &mut Rng, m: usize, k: usize) -> Vec<f32> {
    rng.vec(m * k, 2.0).into_iter().map(|v| v + 1.5).collect()
}

#[test]
fn norm_fused_into_the_packing_matches_the_unfused_pass() {
    for isa in isas() {
        for norm in [Norm::Layer, Norm::Rms] {
            for precision in [DType::F32, DType::BF16] {
                for (s, &(m, n, k)) in SHAPES.iter().enumerate() {
                    let mut rng = Rng::new(900 + s as u64);
                    let x = norm_input(&mut rng, m, k);
                    let (gamma, beta) = (rng.vec(k, 1.0), rng.vec(k, 1.0));
                    let b = bf16_weights(&mut rng, n * k);
                    let bias = rng.vec(n, 1.0);
                    let (w, eps) = (Weight::Bf16(&b), 1e-5);
                    let opts = GemmOpts {
                        bias: Some(&bias),
                        precision,
                        ..GemmOpts::default()
                    };
                    let what = format!("{isa:?} {norm:?} {precision:?} {m}x{n}x{k}");

                    let mut normed = vec![0f32; m * k];
                    let a = match norm {
                        Norm::Layer => {
                            layer_norm_with(isa, &x, &gamma, &beta, eps, &mut normed, m, k);
                            ARows::LayerNorm {
                                x: &x,
                                weight: &gamma,
                                bias: &beta,
                                eps,
                            }
                        }
                        Norm::Rms => {
                            rms_norm_with(isa, &x, &gamma, eps, &mut normed, m, k);
                            ARows::RmsNorm {
                                x: &x,
                                weight: &gamma,
                                eps,
                            }
                        }
                    };
                    let mut want = poisoned(m * n);
                    gemm_opts_with(isa, &normed, k, w, &mut want, n, m, n, k, &opts);
                    let mut got = poisoned(m * n);
                    gemm_fused_with(isa, a, w, &mut got, n, m, n, k, &opts, None);
                    assert_bits(&what, &got, &want);

                    let mut oracle = poisoned(m * n);
                    gemm_fused_ref(a, w, &mut oracle, n, m, n, k, &opts, None);
                    assert_close(&what, &got, &oracle, oracle_tol(k, precision));
                }
            }
        }
    }
}

/// `crops` grids of `g×g` patches of `c` channels, each after a CLS row, and a table of rows:
/// merged tokens in a shuffled order with the two literal rows among them.
struct MergeCase {
    feat: Vec<f32>,
    sources: Vec<i32>,
    lit: [Vec<f32>; 2],
    g: usize,
    c: usize,
}

impl MergeCase {
    fn new(rng: &mut Rng, crops: usize, g: usize, c: usize, m: usize) -> Self {
        let feat = rng.vec(crops * (g * g + 1) * c, 1.0);
        let tokens = crops * (g / 2) * (g / 2);
        let sources = (0..m)
            .map(|_| match rng.below(8) {
                0 => -1,
                1 => -2,
                _ => rng.below(tokens as u64) as i32,
            })
            .collect();
        let lit = [rng.vec(4 * c, 1.0), rng.vec(4 * c, 1.0)];
        MergeCase {
            feat,
            sources,
            lit,
            g,
            c,
        }
    }

    /// The unfused way: CLS dropped, every grid merged by `merge_2x2_ref`, then the rows
    /// picked from those tokens and the literals.
    fn dense(&self) -> Vec<f32> {
        let (g, c) = (self.g, self.c);
        let crops = self.feat.len() / ((g * g + 1) * c);
        let patches: Vec<f32> = self
            .feat
            .chunks_exact((g * g + 1) * c)
            .flat_map(|grid| grid[c..].iter().copied())
            .collect();
        let mut merged = vec![0f32; crops * g * g * c];
        merge_2x2_ref(&patches, &mut merged, crops, g, c);
        self.sources
            .iter()
            .flat_map(|&s| match s {
                s if s >= 0 => merged[s as usize * 4 * c..(s as usize + 1) * 4 * c].to_vec(),
                s => self.lit[(-1 - s) as usize].clone(),
            })
            .collect()
    }
}

#[test]
fn merge_fused_into_the_packing_matches_the_gathered_matrix() {
    // (grid, channels, rows, n): k = 4c from 32 to 4·80 (masked tails); rows on both paths.
    let cases = [
        (4, 8, 1, 33),
        (6, 24, 4, 40),
        (4, 8, 29, 65),
        (8, 80, 150, 70),
    ];
    for isa in isas() {
        for precision in [DType::F32, DType::BF16] {
            for (s, &(g, c, m, n)) in cases.iter().enumerate() {
                let mut rng = Rng::new(950 + s as u64);
                let case = MergeCase::new(&mut rng, 3, g, c, m);
                let k = 4 * c;
                let b = bf16_weights(&mut rng, n * k);
                let w = Weight::Bf16(&b);
                let opts = GemmOpts {
                    precision,
                    ..GemmOpts::default()
                };
                let lits: [&[f32]; 2] = [&case.lit[0], &case.lit[1]];
                let rows = MergedRows {
                    feat: &case.feat,
                    grid_stride: (g * g + 1) * c,
                    first: c,
                    g,
                    c,
                    sources: &case.sources,
                    literals: &lits,
                };
                let what = format!("{isa:?} {precision:?} merged g={g} c={c} m={m}");
                let dense = case.dense();
                let mut want = poisoned(m * n);
                gemm_opts_with(isa, &dense, k, w, &mut want, n, m, n, k, &opts);
                let mut got = poisoned(m * n);
                gemm_fused_with(
                    isa,
                    ARows::Merged(&rows),
                    w,
                    &mut got,
                    n,
                    m,
                    n,
                    k,
                    &opts,
                    None,
                );
                assert_bits(&what, &got, &want);
                // The oracle's A is the same gather, so only the products differ.
                let mut oracle = poisoned(m * n);
                let a = ARows::Merged(&rows);
                gemm_fused_ref(a, w, &mut oracle, n, m, n, k, &opts, None);
                assert_close(&what, &got, &oracle, oracle_tol(k, precision));
            }
        }
    }
}

/// `(m, half, k)`: GEMV rows, a half that is a whole number of 64-column blocks and ones that
/// are not, k over several KC slices, and parallel tasks.
const GLU_SHAPES: &[(usize, usize, usize)] = &[
    (1, 40, 64),
    (4, 100, 1031),
    (5, 33, 77),
    (40, 64, 32),
    (29, 200, 2 * 1024 + 45),
    (300, 150, 100),
];

/// `out` rows `ldo` apart, the padding past `half` set to 7 (it must come back untouched).
fn glu_out(m: usize, half: usize, ldo: usize) -> Vec<f32> {
    let mut out = poisoned(m * ldo);
    for row in out.chunks_mut(ldo) {
        row[half..].fill(7.0);
    }
    out
}

#[test]
fn swiglu_fused_into_the_epilogue_matches_the_unfused_pass() {
    for isa in isas() {
        for precision in [DType::F32, DType::BF16] {
            for (s, &(m, half, k)) in GLU_SHAPES.iter().enumerate() {
                for with_bias in [false, true] {
                    let mut rng = Rng::new(1000 + s as u64);
                    let n = 2 * half;
                    let x = norm_input(&mut rng, m, k);
                    let gamma = rng.vec(k, 1.0);
                    let b = bf16_weights(&mut rng, n * k);
                    let bias = rng.vec(n, 1.0);
                    let w = Weight::Bf16(&b);
                    let opts = GemmOpts {
                        bias: with_bias.then_some(&bias[..]),
                        precision,
                        ..GemmOpts::default()
                    };
                    let what = format!("{isa:?} {precision:?} bias={with_bias} {m}x{n}x{k}");
                    let a = ARows::RmsNorm {
                        x: &x,
                        weight: &gamma,
                        eps: 1e-5,
                    };
                    // Unfused: norm, GEMM, then silu_mul over the whole of C.
                    let mut normed = vec![0f32; m * k];
                    rms_norm_with(isa, &x, &gamma, 1e-5, &mut normed, m, k);
                    let mut c_want = poisoned(m * n);
                    gemm_opts_with(isa, &normed, k, w, &mut c_want, n, m, n, k, &opts);
                    let mut want = vec![0f32; m * half];
                    silu_mul_with(isa, &c_want, &mut want, m, half);

                    let ldo = half + 3;
                    let mut c_got = poisoned(m * n);
                    let mut got = glu_out(m, half, ldo);
                    gemm_fused_with(
                        isa,
                        a,
                        w,
                        &mut c_got,
                        n,
                        m,
                        n,
                        k,
                        &opts,
                        Some((&mut got, ldo)),
                    );
                    assert_bits(&format!("{what} C"), &c_got, &c_want);
                    for (i, row) in got.chunks(ldo).enumerate() {
                        assert_bits(&what, &row[..half], &want[i * half..(i + 1) * half]);
                        assert!(row[half..].iter().all(|&v| v == 7.0), "{what}: padding");
                    }

                    let mut c_ref = poisoned(m * n);
                    let mut oracle = glu_out(m, half, ldo);
                    gemm_fused_ref(
                        a,
                        w,
                        &mut c_ref,
                        n,
                        m,
                        n,
                        k,
                        &opts,
                        Some((&mut oracle, ldo)),
                    );
                    assert_close(&what, &got, &oracle, oracle_tol(k, precision));
                }
            }
        }
    }
}

/// The AMX and AVX512-BF16 layouts (through their scalar twins): a fused norm in the pair and
/// tile packings, SwiGLU over their tiles, against the same twin unfused.
#[test]
fn fusions_on_the_bf16_hardware_layouts() {
    for kind in [Emulated::Bf16Pairs, Emulated::AmxTiles] {
        for (s, &(m, half, k)) in GLU_SHAPES.iter().enumerate() {
            let mut rng = Rng::new(1100 + s as u64);
            let n = 2 * half;
            let x = norm_input(&mut rng, m, k);
            let (gamma, beta) = (rng.vec(k, 1.0), rng.vec(k, 1.0));
            let b = bf16_weights(&mut rng, n * k);
            let opts = GemmOpts {
                precision: DType::BF16,
                ..GemmOpts::default()
            };
            let what = format!("{kind:?} {m}x{n}x{k}");
            let a = ARows::LayerNorm {
                x: &x,
                weight: &gamma,
                bias: &beta,
                eps: 1e-5,
            };
            let mut normed = vec![0f32; m * k];
            layer_norm_with(Isa::Scalar, &x, &gamma, &beta, 1e-5, &mut normed, m, k);
            let mut c_want = poisoned(m * n);
            let dense = ARows::dense(&normed, k);
            gemm_emulated(kind, dense, &b, &mut c_want, n, m, n, k, &opts, None);
            let mut want = vec![0f32; m * half];
            silu_mul_with(Isa::Scalar, &c_want, &mut want, m, half);

            let mut c_got = poisoned(m * n);
            let mut got = poisoned(m * half);
            gemm_emulated(
                kind,
                a,
                &b,
                &mut c_got,
                n,
                m,
                n,
                k,
                &opts,
                Some((&mut got, half)),
            );
            assert_bits(&format!("{what} C"), &c_got, &c_want);
            assert_bits(&what, &got, &want);
        }
    }
}

#[test]
#[should_panic(expected = "merged rows: row 1 is token 12")]
fn a_merged_row_past_the_grids_is_named() {
    let (g, c) = (4, 2);
    let feat = vec![0f32; 3 * (g * g + 1) * c];
    let rows = MergedRows {
        feat: &feat,
        grid_stride: (g * g + 1) * c,
        first: c,
        g,
        c,
        sources: &[0, 12],
        literals: &[],
    };
    let b = vec![bf16::ZERO; 4 * 4 * c];
    let mut out = vec![0f32; 2 * 4];
    let opts = GemmOpts::default();
    let a = ARows::Merged(&rows);
    gemm_fused_with(
        Isa::Scalar,
        a,
        Weight::Bf16(&b),
        &mut out,
        4,
        2,
        4,
        4 * c,
        &opts,
        None,
    );
}

#[test]
#[should_panic(expected = "SwiGLU needs [gate; up] rows, n = 5 is odd")]
fn swiglu_with_an_odd_width_is_refused() {
    let (m, n, k) = (2, 5, 3);
    let (a, b) = (vec![0f32; m * k], vec![0f32; n * k]);
    let (mut c, mut out) = (vec![0f32; m * n], vec![0f32; m * n]);
    let a = ARows::dense(&a, k);
    let opts = GemmOpts::default();
    let glu = Some((&mut out[..], 2));
    gemm_fused_with(
        Isa::Scalar,
        a,
        Weight::F32(&b),
        &mut c,
        n,
        m,
        n,
        k,
        &opts,
        glu,
    );
}

/// The tolerance helper is not vacuous: a one-ulp change in one element fails `assert_bits`.
#[test]
#[should_panic(expected = "fused")]
fn bit_comparison_catches_one_ulp() {
    let want = vec![1.0f32, 2.0];
    let got = vec![1.0f32, f32::from_bits(2.0f32.to_bits() + 1)];
    assert_bits("probe", &got, &want);
}
