//! GEMM on every instruction set against `gemm_ref`: awkward shapes, every weight dtype, bias
//! and accumulate on/off, strided A and C, then proptest over small shapes.

mod common;

use common::{assert_close, isas, poisoned, tol, OwnedWeight, Rng, WDType, WDTYPES};
use phi_kernels::cpu::gemm::{gemm_ref, gemm_with};
use proptest::prelude::*;

#[derive(Copy, Clone, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    /// Extra elements per row of A and C beyond k and n (0 = packed).
    pad_a: usize,
    pad_c: usize,
    bias: bool,
    accumulate: bool,
    dtype: WDType,
}

/// Runs one case on every instruction set against one reference result.
fn run(case: Case, seed: u64) {
    let Case {
        m,
        n,
        k,
        pad_a,
        pad_c,
        bias,
        accumulate,
        dtype,
    } = case;
    let (lda, ldc) = (k + pad_a, n + pad_c);
    let mut rng = Rng::new(seed);
    let a = rng.vec(m * lda, 1.0);
    let b = OwnedWeight::random(&mut rng, n * k, 1.0, dtype);
    let bias_v = rng.vec(n, 1.0);
    let bias = bias.then_some(&bias_v[..]);
    // Initial C: random when accumulating (both sides get the same), NaN otherwise. Padding
    // columns are random in both and must come back untouched.
    let c0: Vec<f32> = if accumulate {
        rng.vec(m * ldc, 1.0)
    } else {
        poisoned(m * ldc)
    };
    let mut want = c0.clone();
    let mut got = c0.clone();
    for i in 0..m {
        for j in n..ldc {
            want[i * ldc + j] = 7.0;
            got[i * ldc + j] = 7.0;
        }
    }
    gemm_ref(&a, lda, b.view(), bias, &mut want, ldc, m, n, k, accumulate);
    for isa in isas() {
        let mut got = got.clone();
        gemm_with(
            isa,
            &a,
            lda,
            b.view(),
            bias,
            &mut got,
            ldc,
            m,
            n,
            k,
            accumulate,
        );
        assert_close(&format!("gemm {isa:?} {case:?}"), &got, &want, tol::gemm(k));
    }
}

/// Shapes from {0, 1, 15, 16, 17, 63, 64, 65, 96, 577, 1024, 3072}, big dims only beside small
/// ones, plus the GEMV/blocked boundary (m = 4, 5), tile edges of every microkernel, and m past
/// the 768-row packing super-block (757 stays one block, 1545 takes three), and a few rows
/// (short prompts, decode batches) over several k slices.
const SHAPES: &[(usize, usize, usize)] = &[
    (0, 16, 16),
    (16, 0, 16),
    (16, 16, 0),
    (1, 1, 1),
    (1, 17, 15),
    (1, 3072, 96),
    (2, 65, 63),
    (3, 70, 40),
    (4, 64, 17),
    (4, 23, 100),
    (5, 33, 16),
    (15, 16, 17),
    (16, 17, 15),
    (17, 15, 16),
    (63, 64, 65),
    (64, 65, 63),
    (65, 17, 3072),
    (96, 96, 96),
    (13, 1024, 65),
    (577, 64, 1024),
    (577, 65, 17),
    (757, 17, 16),
    (1545, 33, 17),
    (16, 14, 1025),
    (17, 45, 2100),
    (32, 29, 1030),
];

#[test]
fn gemm_awkward_shapes_every_isa_and_dtype() {
    {
        for (s, &(m, n, k)) in SHAPES.iter().enumerate() {
            for dtype in WDTYPES {
                for (bias, accumulate) in
                    [(false, false), (true, false), (true, true), (false, true)]
                {
                    let case = Case {
                        m,
                        n,
                        k,
                        pad_a: 0,
                        pad_c: 0,
                        bias,
                        accumulate,
                        dtype,
                    };
                    run(case, s as u64);
                }
            }
        }
    }
}

#[test]
fn gemm_strided_a_and_c() {
    {
        for &(m, n, k) in &[
            (1, 17, 33),
            (3, 40, 20),
            (17, 33, 65),
            (64, 96, 64),
            (31, 100, 300),
        ] {
            for dtype in WDTYPES {
                for accumulate in [false, true] {
                    let case = Case {
                        m,
                        n,
                        k,
                        pad_a: 5,
                        pad_c: 3,
                        bias: true,
                        accumulate,
                        dtype,
                    };
                    run(case, 99);
                }
            }
        }
    }
}

/// Decode GEMVs (m = 1..4) big enough to run in parallel: the threads take shrinking pieces of
/// B's rows, so the last piece is ragged against the kernels' 8- and 6-row groups; k with a
/// masked tail and k spanning several prefetch distances.
#[test]
fn gemm_parallel_gemv_pieces() {
    for m in 1..=4 {
        for (s, &(n, k, dtype)) in [
            (1237, 333, WDType::Bf16),
            (4099, 64, WDType::F32),
            (611, 1030, WDType::F16),
        ]
        .iter()
        .enumerate()
        {
            let case = Case {
                m,
                n,
                k,
                pad_a: 2,
                pad_c: 1,
                bias: true,
                accumulate: m % 2 == 0,
                dtype,
            };
            run(case, 900 + (10 * m + s) as u64);
        }
    }
}

/// A few rows of A against bf16 weights (a short prompt, or more than four sequences decoded
/// together): AVX2 streams B unpacked, in slabs of 48 rows and k chunks of 1024, A in blocks
/// of 4 rows. Every remainder block (1-3 rows), ragged last slabs and groups, k over several
/// chunks with a 16-value step and a scalar tail, and pieces split over the pool; 33 rows is
/// past that path, in the blocked GEMM.
#[test]
fn gemm_few_rows_bf16_weights() {
    for (s, m) in [5, 6, 7, 8, 13, 32, 33].into_iter().enumerate() {
        for (t, &(n, k)) in [(101, 2069), (1237, 333), (50, 16)].iter().enumerate() {
            let case = Case {
                m,
                n,
                k,
                pad_a: 3,
                pad_c: 1,
                bias: t != 1,
                accumulate: m % 2 == 1,
                dtype: WDType::Bf16,
            };
            run(case, 1300 + (10 * s + t) as u64);
        }
    }
}

/// Every row count of a panel's last tile (the kernels have one instance per count), on both
/// sides of the GEMV boundary and of two 14-row AVX-512 panels.
#[test]
fn gemm_every_tail_row_count() {
    for m in 1..=2 * 14 + 1 {
        for (dtype, accumulate) in [(WDType::F32, false), (WDType::Bf16, true)] {
            let case = Case {
                m,
                n: 40,
                k: 37,
                pad_a: 1,
                pad_c: 2,
                bias: true,
                accumulate,
                dtype,
            };
            run(case, 500 + m as u64);
        }
    }
}

/// Packed A well past the 4 MiB threshold (601 rows × 7200 k, about 17 MiB in 14-row f32
/// panels) takes the order with the k slices outside the parallel column blocks; a ragged last
/// N block and k slice, with bias and with an accumulated C.
#[test]
fn gemm_big_packed_a_slices_outside() {
    for (dtype, accumulate) in [(WDType::F32, false), (WDType::Bf16, true)] {
        let case = Case {
            m: 601,
            n: 45,
            k: 7200,
            pad_a: 3,
            pad_c: 1,
            bias: true,
            accumulate,
            dtype,
        };
        run(case, 77);
    }
}

#[test]
fn gemm_k_zero_is_bias_or_unchanged() {
    {
        for accumulate in [false, true] {
            for bias in [false, true] {
                let case = Case {
                    m: 5,
                    n: 7,
                    k: 0,
                    pad_a: 0,
                    pad_c: 2,
                    bias,
                    accumulate,
                    dtype: WDType::F32,
                };
                run(case, 3);
            }
        }
    }
}

#[test]
fn gemm_single_thread_pool_matches() {
    // The blocked driver picks a different task split with one thread.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();
    pool.install(|| {
        let case = Case {
            m: 70,
            n: 600,
            k: 300,
            pad_a: 1,
            pad_c: 1,
            bias: true,
            accumulate: true,
            dtype: WDType::Bf16,
        };
        run(case, 5);
        let case = Case {
            m: 1,
            n: 600,
            k: 300,
            pad_a: 0,
            pad_c: 0,
            bias: true,
            accumulate: false,
            dtype: WDType::F16,
        };
        run(case, 6);
    });
}

fn dtype_strategy() -> impl Strategy<Value = WDType> {
    prop_oneof![Just(WDType::F32), Just(WDType::Bf16), Just(WDType::F16)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(common::proptest_cases(24)))]
    #[test]
    fn gemm_fuzz(
        m in 0usize..40, n in 0usize..80, k in 0usize..80,
        pad_a in 0usize..3, pad_c in 0usize..3,
        bias: bool, accumulate: bool, dtype in dtype_strategy(), seed: u64,
    ) {
        {
            run(Case { m, n, k, pad_a, pad_c, bias, accumulate, dtype }, seed);
        }
    }
}

#[test]
fn gemm_nested_in_parallel_callers() {
    // Model code may call GEMM from inside rayon tasks (one per crop): the per-thread packing
    // buffers must survive re-entry while a caller waits in its own parallel section.
    use rayon::prelude::*;
    let (m, n, k) = (40, 700, 300);
    let mut rng = Rng::new(11);
    let a = rng.vec(m * k, 1.0);
    let b = OwnedWeight::random(&mut rng, n * k, 1.0, WDType::Bf16);
    let mut want = poisoned(m * n);
    gemm_ref(&a, k, b.view(), None, &mut want, n, m, n, k, false);
    for isa in isas() {
        let outs: Vec<Vec<f32>> = (0..6)
            .into_par_iter()
            .map(|_| {
                let mut c = poisoned(m * n);
                gemm_with(isa, &a, k, b.view(), None, &mut c, n, m, n, k, false);
                c
            })
            .collect();
        for c in &outs {
            assert_close(&format!("nested gemm {isa:?}"), c, &want, tol::gemm(k));
        }
    }
}

/// The fused epilogue (bias + activation) and bf16 products, on every ISA and weight dtype,
/// against `gemm_opts_ref`; shapes cross the GEMV/blocked boundary and every tile edge.
#[test]
fn gemm_opts_activation_and_bf16_products() {
    use phi_kernels::cpu::gemm::{gemm_opts_ref, gemm_opts_with, GemmOpts};
    use phi_kernels::cpu::Activation;
    use phi_kernels::DType;
    let shapes = [
        (1, 40, 33),
        (4, 65, 17),
        (5, 33, 300),
        (29, 70, 64),
        (64, 600, 270),
        (33, 150, 1100),
    ];
    for (s, &(m, n, k)) in shapes.iter().enumerate() {
        for dtype in WDTYPES {
            for activation in [
                Activation::Identity,
                Activation::QuickGelu,
                Activation::GeluErf,
            ] {
                for precision in [DType::F32, DType::BF16] {
                    let mut rng = Rng::new(100 + s as u64);
                    let ldc = n + 2;
                    // Scale 2 so the activations see both signs and their curved region.
                    let a = rng.vec(m * k, 2.0);
                    let b = OwnedWeight::random(&mut rng, n * k, 0.2, dtype);
                    let bias = rng.vec(n, 1.0);
                    let opts = GemmOpts {
                        bias: Some(&bias),
                        activation,
                        accumulate: false,
                        precision,
                    };
                    let mut want = poisoned(m * ldc);
                    gemm_opts_ref(&a, k, b.view(), &mut want, ldc, m, n, k, &opts);
                    for isa in isas() {
                        let mut got = poisoned(m * ldc);
                        gemm_opts_with(isa, &a, k, b.view(), &mut got, ldc, m, n, k, &opts);
                        // Compare the written columns only (the padding stays NaN in both).
                        let cols = |v: &[f32]| -> Vec<f32> {
                            (0..m)
                                .flat_map(|i| v[i * ldc..i * ldc + n].to_vec())
                                .collect()
                        };
                        assert_close(
                            &format!("gemm_opts {isa:?} {m}x{n}x{k} {dtype:?} {activation:?} {precision:?}"),
                            &cols(&got),
                            &cols(&want),
                            tol::gemm(k),
                        );
                    }
                }
            }
        }
    }
}

/// bf16 products against the exact (f64, unrounded) product: relative L2 under 1e-2, the
/// issue's bound for a bf16 GEMM; and not bit-identical to f32 (the rounding really happens).
#[test]
fn gemm_bf16_products_within_1e_2_of_f64() {
    use phi_kernels::cpu::gemm::{gemm_opts_with, GemmOpts};
    use phi_kernels::DType;
    let (m, n, k) = (37, 300, 1024);
    let mut rng = Rng::new(7);
    let a = rng.vec(m * k, 1.0);
    let b = OwnedWeight::random(&mut rng, n * k, 1.0, WDType::F32);
    let mut exact = poisoned(m * n);
    gemm_ref(&a, k, b.view(), None, &mut exact, n, m, n, k, false);
    let opts = GemmOpts {
        precision: DType::BF16,
        ..GemmOpts::default()
    };
    for isa in isas() {
        let mut got = poisoned(m * n);
        gemm_opts_with(isa, &a, k, b.view(), &mut got, n, m, n, k, &opts);
        let (num, den) = got
            .iter()
            .zip(&exact)
            .fold((0f64, 0f64), |(n, d), (&g, &w)| {
                (n + (g as f64 - w as f64).powi(2), d + (w as f64).powi(2))
            });
        let rel = (num / den).sqrt();
        assert!(rel < 1e-2, "{isa:?}: bf16 GEMM relative L2 {rel:e} >= 1e-2");
        assert!(
            rel > 1e-5,
            "{isa:?}: bf16 GEMM looks unrounded (relative L2 {rel:e})"
        );
    }
}

/// The layouts of the bf16 hardware kernels (AVX512-BF16 pair panels, AMX tiles), through
/// their scalar twins, which run on any CPU: odd k and k not a multiple of 32, several KC
/// slices, tile edges, bias, accumulate and activations, against `gemm_opts_ref` with bf16
/// products.
#[test]
fn gemm_bf16_hardware_layouts_match_the_reference() {
    use half::bf16;
    use phi_kernels::cpu::gemm::{gemm_emulated, gemm_opts_ref, Emulated, GemmOpts};
    use phi_kernels::cpu::Activation;
    use phi_kernels::DType;
    let shapes = [
        (5, 33, 1),
        (31, 1, 7),
        (15, 31, 16),
        (33, 31, 32),
        (32, 32, 257),
        (47, 70, 600),
        (65, 545, 33),
        (19, 40, 2 * 1024 + 77),
        (1601, 33, 16),
    ];
    for kind in [Emulated::Bf16Pairs, Emulated::AmxTiles] {
        for (s, &(m, n, k)) in shapes.iter().enumerate() {
            for (accumulate, activation) in [
                (false, Activation::Identity),
                (true, Activation::Identity),
                (false, Activation::QuickGelu),
            ] {
                let mut rng = Rng::new(300 + s as u64);
                let ldc = n + 3;
                let a = rng.vec(m * k, 1.0);
                let b: Vec<bf16> = rng
                    .vec(n * k, 1.0)
                    .iter()
                    .map(|&x| bf16::from_f32(x))
                    .collect();
                let bias = rng.vec(n, 1.0);
                let c0 = rng.vec(m * ldc, 1.0);
                let opts = GemmOpts {
                    bias: Some(&bias),
                    activation,
                    accumulate,
                    precision: DType::BF16,
                };
                let mut want = c0.clone();
                let w = phi_kernels::Weight::Bf16(&b);
                gemm_opts_ref(&a, k, w, &mut want, ldc, m, n, k, &opts);
                let mut got = c0.clone();
                let a = phi_kernels::cpu::ARows::dense(&a, k);
                gemm_emulated(kind, a, &b, &mut got, ldc, m, n, k, &opts, None);
                assert_close(
                    &format!("{kind:?} {m}x{n}x{k} accumulate={accumulate} {activation:?}"),
                    &got,
                    &want,
                    tol::gemm(k),
                );
            }
        }
    }
}
