//! Every CUDA kernel against the CPU `_ref` oracle: an awkward shape list, then proptest, fresh
//! random inputs each run (the seed is printed on failure), outputs poisoned with NaN before
//! each launch, relative L2 tolerances per dtype (bf16 storage: < 1e-2).
//!
//! Without a GPU (no driver library, or no device) each test says so on stderr, outside the
//! harness' capture so it shows in `cargo test` output, and passes: CI has no GPU.
#![cfg(feature = "cuda")]

use std::io::Write;
use std::sync::OnceLock;

use half::bf16;
use phi_kernels::cpu::{self, Activation, AttnDims, AttnLayout, GemmOpts};
use phi_kernels::cuda::{self, AttnShape, CudaSlice, Device, Epilogue};
use phi_kernels::{Error, Weight};
use proptest::prelude::*;

mod common;
use common::Rng;

/// The device, or `None` after telling the terminal this test is skipped.
fn gpu(test: &str) -> Option<&'static Device> {
    static DEV: OnceLock<Result<Device, String>> = OnceLock::new();
    match DEV.get_or_init(|| match Device::new(0) {
        Ok(d) => Ok(d),
        Err(Error::NoGpu(why)) => Err(why),
        Err(e) => panic!("opening the GPU failed: {e}"),
    }) {
        Ok(d) => Some(d),
        Err(why) => {
            // Written to the process' stderr, not through eprintln!, so the harness does not
            // capture it; once per test (proptest asks once per case).
            static TOLD: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
            let mut told = TOLD.lock().unwrap_or_else(|e| e.into_inner());
            if !told.iter().any(|t| t == test) {
                told.push(test.to_string());
                let _ = writeln!(std::io::stderr(), "SKIPPED cuda::{test}: {why}");
            }
            None
        }
    }
}

/// The shared test RNG with a fresh seed each run (printed, so a failure can be replayed with
/// `PHI_CUDA_TEST_SEED`).
fn fresh_rng(test: &str) -> Rng {
    let seed = std::env::var("PHI_CUDA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let _ = writeln!(
        std::io::stderr(),
        "cuda::{test}: seed {seed} (PHI_CUDA_TEST_SEED)"
    );
    Rng::new(seed)
}

fn to_bf16(x: &[f32]) -> Vec<bf16> {
    x.iter().map(|&v| bf16::from_f32(v)).collect()
}

fn from_bf16(x: &[bf16]) -> Vec<f32> {
    x.iter().map(|v| v.to_f32()).collect()
}

/// The values a bf16 buffer holds, as f32 (what the CPU oracle gets as input).
fn rounded(x: &[f32]) -> Vec<f32> {
    from_bf16(&to_bf16(x))
}

fn poisoned_bf16(dev: &Device, n: usize) -> CudaSlice<bf16> {
    dev.upload(&vec![bf16::NAN; n.max(1)]).unwrap()
}

fn poisoned_f32(dev: &Device, n: usize) -> CudaSlice<f32> {
    dev.upload(&vec![f32::NAN; n.max(1)]).unwrap()
}

/// ‖got − want‖ / ‖want‖ over the elements `pick` selects; NaN never passes.
fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_l2(got, want);
    assert!(e < tol, "{what}: relative L2 error {e:.3e} >= {tol:.0e}");
}

/// Rows `rows` of `width` out of a buffer with rows `ld` apart.
fn rows_of(x: &[f32], rows: usize, width: usize, ld: usize) -> Vec<f32> {
    (0..rows)
        .flat_map(|r| x[r * ld..r * ld + width].to_vec())
        .collect()
}

const BF16_TOL: f64 = 1e-2;

// ------------------------------------------------------------------------------------------------
// GEMM / GEMV

#[allow(clippy::too_many_arguments)]
fn check_gemm(
    dev: &Device,
    rng: &mut Rng,
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldc: usize,
    act: Activation,
    bias: bool,
    residual: bool,
    f32_out: bool,
) {
    let what = format!("gemm m={m} n={n} k={k} lda={lda} ldc={ldc} {act:?} bias={bias} residual={residual} f32_out={f32_out}");
    let a = rounded(&rng.vec(m * lda, 1.0));
    let b = rounded(&rng.vec(n * k, 1.0 / (k as f32).sqrt()));
    let bias_v = rng.vec(n, 0.5);
    let res = rounded(&rng.vec(m * ldc, 1.0));
    // Oracle: act(A·Bᵀ + bias) + residual, f64 sums over the bf16 values.
    let mut want = vec![0f32; m * ldc];
    let opts = GemmOpts {
        bias: bias.then_some(&bias_v[..]),
        activation: act,
        ..GemmOpts::default()
    };
    cpu::gemm_opts_ref(&a, lda, Weight::F32(&b), &mut want, ldc, m, n, k, &opts);
    if residual {
        for i in 0..m {
            for j in 0..n {
                want[i * ldc + j] += res[i * ldc + j];
            }
        }
    }
    let d_a = dev.upload(&to_bf16(&a)).unwrap();
    let d_b = dev.upload(&to_bf16(&b)).unwrap();
    let d_bias = dev.upload(&bias_v).unwrap();
    let got = if f32_out {
        let d_res = dev.upload(&res).unwrap();
        let mut c = poisoned_f32(dev, m * ldc);
        let ep = Epilogue {
            bias: bias.then_some(&d_bias),
            activation: act,
            residual: residual.then_some(&d_res),
        };
        cuda::gemm_bf16_f32(dev, &d_a, lda, &d_b, &mut c, ldc, m, n, k, &ep).unwrap();
        dev.download(&c).unwrap()
    } else {
        // The residual goes in through C itself (accumulate), as the decoder adds its stream.
        let mut c = if residual {
            dev.upload(&to_bf16(&res)).unwrap()
        } else {
            poisoned_bf16(dev, m * ldc)
        };
        let ep = Epilogue {
            bias: bias.then_some(&d_bias),
            activation: act,
            residual: None,
        };
        cuda::gemm_bf16(dev, &d_a, lda, &d_b, &mut c, ldc, m, n, k, residual, &ep).unwrap();
        from_bf16(&dev.download(&c).unwrap())
    };
    assert_close(
        &what,
        &rows_of(&got, m, n, ldc),
        &rows_of(&want, m, n, ldc),
        BF16_TOL,
    );
}

#[test]
fn gemm_matches_the_reference_on_awkward_shapes() {
    let Some(dev) = gpu("gemm_matches_the_reference_on_awkward_shapes") else {
        return;
    };
    let mut rng = fresh_rng("gemm");
    // m <= 4 takes the GEMV; the rest the tensor-core tiles, with ragged edges everywhere.
    let shapes = [
        (1, 1, 8),
        (1, 3072, 3072),
        (2, 17, 24),
        (3, 129, 64),
        (4, 1000, 136),
        (5, 33, 40),
        (16, 16, 16),
        (17, 129, 72),
        (63, 64, 96),
        (64, 128, 32),
        (65, 130, 264),
        (127, 255, 8),
        (128, 128, 1024),
        (129, 257, 520),
        (577, 1024, 1024),
        (300, 32064, 64),
    ];
    for (m, n, k) in shapes {
        check_gemm(
            dev,
            &mut rng,
            m,
            n,
            k,
            k,
            n,
            Activation::Identity,
            false,
            false,
            false,
        );
    }
    // Epilogues and strides (a fused QKV slice reads A with lda > k and writes C with ldc > n).
    for &(m, n, k) in &[
        (1usize, 40usize, 32usize),
        (3, 72, 48),
        (77, 200, 96),
        (130, 136, 128),
    ] {
        for act in [
            Activation::Identity,
            Activation::QuickGelu,
            Activation::GeluErf,
        ] {
            check_gemm(
                dev,
                &mut rng,
                m,
                n,
                k,
                k + 16,
                n + 8,
                act,
                true,
                false,
                false,
            );
        }
        check_gemm(
            dev,
            &mut rng,
            m,
            n,
            k,
            k,
            n,
            Activation::Identity,
            true,
            true,
            false,
        );
        check_gemm(
            dev,
            &mut rng,
            m,
            n,
            k,
            k,
            n,
            Activation::Identity,
            false,
            true,
            true,
        );
        check_gemm(
            dev,
            &mut rng,
            m,
            n,
            k,
            k,
            n,
            Activation::GeluErf,
            true,
            false,
            true,
        );
    }
}

#[test]
fn gemm_refuses_what_the_kernels_cannot_take() {
    let Some(dev) = gpu("gemm_refuses_what_the_kernels_cannot_take") else {
        return;
    };
    let a = dev.upload(&[bf16::ONE; 8 * 12]).unwrap();
    let b = dev.upload(&[bf16::ONE; 8 * 12]).unwrap();
    let mut c = poisoned_bf16(dev, 64);
    // k = 12 is not a multiple of 8 (16-byte cp.async).
    let e = cuda::gemm_bf16(
        dev,
        &a,
        12,
        &b,
        &mut c,
        8,
        8,
        8,
        12,
        false,
        &Epilogue::default(),
    );
    assert!(matches!(e, Err(Error::CudaArgs { .. })), "{:?}", e.err());
    // C too small for the shape.
    let e = cuda::gemm_bf16(
        dev,
        &a,
        8,
        &b,
        &mut c,
        16,
        8,
        8,
        8,
        false,
        &Epilogue::default(),
    );
    assert!(matches!(e, Err(Error::CudaArgs { .. })), "{:?}", e.err());
    // A view that starts one element in: not 16-byte aligned for cp.async.
    let e = cuda::gemm_bf16(
        dev,
        &a.slice(1..),
        8,
        &b,
        &mut c,
        8,
        8,
        8,
        8,
        false,
        &Epilogue::default(),
    );
    assert!(matches!(e, Err(Error::CudaArgs { .. })), "{:?}", e.err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn gemm_shape_fuzz(m in 1usize..300, n in 1usize..300, k8 in 1usize..48, f32_out: bool) {
        if let Some(dev) = gpu("gemm_shape_fuzz") {
            let mut rng = fresh_rng("gemm_shape_fuzz");
            check_gemm(dev, &mut rng, m, n, 8 * k8, 8 * k8, n, Activation::Identity, true, false, f32_out);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Attention

/// Q, K, V as one fused buffer `[batch, len, 3·heads·d]` (the QKV projection's output), the
/// output packed; compared with the CPU oracle on the same bf16 values.
#[allow(clippy::too_many_arguments)]
fn check_attention(
    dev: &Device,
    rng: &mut Rng,
    batch: usize,
    heads: usize,
    q_len: usize,
    kv_len: usize,
    d: usize,
    causal: bool,
) {
    let what = format!(
        "attention batch={batch} heads={heads} q_len={q_len} kv_len={kv_len} d={d} causal={causal}"
    );
    let width = heads * d;
    // Queries and keys/values in separate fused-style buffers so q_len != kv_len works.
    let q = rounded(&rng.vec(batch * q_len * 3 * width, 1.0));
    let kv = rounded(&rng.vec(batch * kv_len * 3 * width, 1.0));
    let dims = AttnDims {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim: d,
        causal,
        scale: 1.0 / (d as f32).sqrt(),
    };
    let ql = AttnLayout {
        batch_stride: q_len * 3 * width,
        row_stride: 3 * width,
        head_stride: None,
    };
    let kl = AttnLayout {
        batch_stride: kv_len * 3 * width,
        row_stride: 3 * width,
        head_stride: None,
    };
    let ol = AttnLayout::packed(q_len, width);
    let mut want = vec![0f32; batch * q_len * width];
    cpu::attention_ref(
        &q,
        ql,
        &kv[width..],
        kl,
        &kv[2 * width..],
        kl,
        &mut want,
        ol,
        &dims,
    );
    let d_q = dev.upload(&to_bf16(&q)).unwrap();
    let d_kv = dev.upload(&to_bf16(&kv)).unwrap();
    let mut o = poisoned_bf16(dev, want.len());
    let s = AttnShape {
        batch,
        heads,
        q_len,
        kv_len,
        head_dim: d,
        causal,
        scale: dims.scale,
        q_off: 0,
        k_off: width,
        v_off: 2 * width,
        q_batch_stride: q_len * 3 * width,
        q_row_stride: 3 * width,
        kv_batch_stride: kv_len * 3 * width,
        kv_row_stride: 3 * width,
        o_batch_stride: q_len * width,
        o_row_stride: width,
    };
    cuda::flash_attn_bf16(dev, &d_q, &d_kv, &d_kv, &mut o, &s).unwrap();
    assert_close(
        &what,
        &from_bf16(&dev.download(&o).unwrap()),
        &want,
        BF16_TOL,
    );
}

#[test]
fn flash_attention_matches_the_reference() {
    let Some(dev) = gpu("flash_attention_matches_the_reference") else {
        return;
    };
    let mut rng = fresh_rng("flash_attention");
    // CLIP: 577 tokens, d = 64, non-causal, batched over crops.
    check_attention(dev, &mut rng, 2, 16, 577, 577, 64, false);
    // Decoder prefill: d = 96, causal, ragged lengths; and a continued prompt (q_len < kv_len).
    for (q_len, kv_len) in [
        (1, 1),
        (15, 15),
        (63, 63),
        (64, 64),
        (65, 65),
        (130, 130),
        (17, 100),
        (64, 200),
    ] {
        check_attention(dev, &mut rng, 1, 3, q_len, kv_len, 96, true);
        check_attention(
            dev,
            &mut rng,
            2,
            2,
            q_len,
            kv_len,
            64,
            q_len == kv_len && q_len % 2 == 1,
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]
    #[test]
    fn flash_attention_shape_fuzz(q_len in 1usize..200, extra in 0usize..100, d96: bool, causal: bool) {
        if let Some(dev) = gpu("flash_attention_shape_fuzz") {
            let mut rng = fresh_rng("flash_attention_shape_fuzz");
            check_attention(dev, &mut rng, 1, 2, q_len, q_len + extra, if d96 { 96 } else { 64 }, causal);
        }
    }
}

#[test]
fn flash_decode_matches_the_reference() {
    let Some(dev) = gpu("flash_decode_matches_the_reference") else {
        return;
    };
    let mut rng = fresh_rng("flash_decode");
    let (heads, d, capacity) = (4, 96, 2100);
    for (kv_len, splits) in [(1, 1), (1, 8), (7, 3), (128, 4), (2049, 16), (2100, 7)] {
        let q = rounded(&rng.vec(heads * d, 1.0));
        let kc = rounded(&rng.vec(heads * capacity * d, 1.0));
        let vc = rounded(&rng.vec(heads * capacity * d, 1.0));
        let dims = AttnDims {
            batch: 1,
            heads,
            q_len: 1,
            kv_len,
            head_dim: d,
            causal: true,
            scale: 1.0 / (d as f32).sqrt(),
        };
        let cache = AttnLayout::head_major(heads, capacity, d);
        let mut want = vec![0f32; heads * d];
        cpu::attention_ref(
            &q,
            AttnLayout::packed(1, heads * d),
            &kc,
            cache,
            &vc,
            cache,
            &mut want,
            AttnLayout::packed(1, heads * d),
            &dims,
        );
        let (d_q, d_k, d_v) = (
            dev.upload(&to_bf16(&q)).unwrap(),
            dev.upload(&to_bf16(&kc)).unwrap(),
            dev.upload(&to_bf16(&vc)).unwrap(),
        );
        let mut o = poisoned_bf16(dev, heads * d);
        cuda::flash_decode_bf16(
            dev,
            &d_q,
            &d_k,
            &d_v,
            &mut o,
            heads,
            kv_len,
            d,
            capacity * d,
            splits,
            dims.scale,
        )
        .unwrap();
        assert_close(
            &format!("decode kv_len={kv_len} splits={splits}"),
            &from_bf16(&dev.download(&o).unwrap()),
            &want,
            BF16_TOL,
        );
    }
}

// ------------------------------------------------------------------------------------------------
// Norms, activations, RoPE, merge, embedding, casts, sampling

#[test]
fn norms_match_the_reference() {
    let Some(dev) = gpu("norms_match_the_reference") else {
        return;
    };
    let mut rng = fresh_rng("norms");
    for (rows, width, ld) in [
        (1, 1, 1),
        (3, 1024, 1024),
        (577, 1024, 1032),
        (5, 3072, 3072),
        (2, 4097, 4100),
    ] {
        // A large common offset, as CLIP's residual stream has: two passes keep the variance.
        let x: Vec<f32> = rounded(
            &rng.vec(rows * ld, 1.0)
                .iter()
                .map(|v| v + 30.0)
                .collect::<Vec<_>>(),
        );
        let w = rounded(&rng.vec(width, 1.0));
        let b = rounded(&rng.vec(width, 0.5));
        let packed = rows_of(&x, rows, width, ld);
        let d_x = dev.upload(&to_bf16(&x)).unwrap();
        let (d_w, d_b) = (
            dev.upload(&to_bf16(&w)).unwrap(),
            dev.upload(&to_bf16(&b)).unwrap(),
        );

        let mut want = vec![0f32; rows * width];
        cpu::layer_norm_ref(&packed, &w, &b, 1e-5, &mut want, rows, width);
        let mut out = poisoned_bf16(dev, rows * ld);
        cuda::layer_norm_bf16(dev, &d_x, &d_w, &d_b, &mut out, rows, width, ld, 1e-5).unwrap();
        let got = rows_of(&from_bf16(&dev.download(&out).unwrap()), rows, width, ld);
        assert_close(
            &format!("layer_norm {rows}x{width} ld {ld}"),
            &got,
            &want,
            BF16_TOL,
        );

        cpu::rms_norm_ref(&packed, &w, 1e-5, &mut want, rows, width);
        let mut out = poisoned_bf16(dev, rows * ld);
        cuda::rms_norm_bf16(dev, &d_x, &d_w, &mut out, rows, width, ld, 1e-5).unwrap();
        let got = rows_of(&from_bf16(&dev.download(&out).unwrap()), rows, width, ld);
        assert_close(
            &format!("rms_norm {rows}x{width} ld {ld}"),
            &got,
            &want,
            BF16_TOL,
        );
    }
}

#[test]
fn rms_norm_rounds_like_the_reference() {
    // Spec §5.5: bf16(x·r) first, then bf16(weight · that). Exact, value by value.
    let Some(dev) = gpu("rms_norm_rounds_like_the_reference") else {
        return;
    };
    let mut rng = fresh_rng("rms_norm_rounding");
    let (rows, width) = (4, 3072);
    let x = rounded(&rng.vec(rows * width, 2.0));
    let w = rounded(&rng.vec(width, 1.5));
    let mut want = vec![0f32; rows * width];
    for r in 0..rows {
        let xs = &x[r * width..(r + 1) * width];
        let ms = xs.iter().map(|&v| v * v).sum::<f32>() / width as f32;
        let rs = 1.0 / (ms + 1e-5).sqrt();
        for c in 0..width {
            let y = bf16::from_f32(xs[c] * rs);
            want[r * width + c] = bf16::from_f32(w[c] * y.to_f32()).to_f32();
        }
    }
    let (d_x, d_w) = (
        dev.upload(&to_bf16(&x)).unwrap(),
        dev.upload(&to_bf16(&w)).unwrap(),
    );
    let mut out = poisoned_bf16(dev, rows * width);
    cuda::rms_norm_bf16(dev, &d_x, &d_w, &mut out, rows, width, width, 1e-5).unwrap();
    let got = from_bf16(&dev.download(&out).unwrap());
    // The f32 sum of squares may round differently in its last bit; allow one bf16 ulp.
    let off = got
        .iter()
        .zip(&want)
        .filter(|(g, w)| (**g - **w).abs() > w.abs() * 2f32.powi(-7) + 1e-30)
        .count();
    assert_eq!(
        off,
        0,
        "{off} of {} values differ by more than one bf16 ulp",
        got.len()
    );
}

#[test]
fn activations_match_the_reference() {
    let Some(dev) = gpu("activations_match_the_reference") else {
        return;
    };
    let mut rng = fresh_rng("activations");
    for n in [1, 7, 8, 9, 1000, 577 * 4096 + 3] {
        let x = rounded(&rng.vec(n, 4.0));
        let d_x = dev.upload(&to_bf16(&x)).unwrap();
        type Ref = fn(&mut [f32]);
        type Gpu =
            fn(&Device, &CudaSlice<bf16>, &CudaSlice<bf16>, usize) -> phi_kernels::Result<()>;
        let pairs: [(&str, Ref, Gpu); 2] = [
            ("quick_gelu", cpu::quick_gelu_ref, cuda::quick_gelu_bf16),
            ("gelu", cpu::gelu_erf_ref, cuda::gelu_bf16),
        ];
        for (name, reference, kernel) in pairs {
            let mut want = x.clone();
            reference(&mut want);
            let y = poisoned_bf16(dev, n);
            kernel(dev, &d_x, &y, n).unwrap();
            assert_close(
                &format!("{name} n={n}"),
                &from_bf16(&dev.download(&y).unwrap()),
                &want,
                BF16_TOL,
            );
        }
        // The residual add.
        let r = rounded(&rng.vec(n, 1.0));
        let mut d_r = dev.upload(&to_bf16(&r)).unwrap();
        cuda::add_bf16(dev, &d_x, &mut d_r, n).unwrap();
        let want: Vec<f32> = x.iter().zip(&r).map(|(a, b)| a + b).collect();
        assert_close(
            &format!("add n={n}"),
            &from_bf16(&dev.download(&d_r).unwrap()),
            &want,
            BF16_TOL,
        );
    }
    for (rows, inter) in [(1, 8), (3, 13), (5, 8192)] {
        let gu = rounded(&rng.vec(rows * 2 * inter, 4.0));
        let mut want = vec![0f32; rows * inter];
        cpu::silu_mul_ref(&gu, &mut want, rows, inter);
        let d_gu = dev.upload(&to_bf16(&gu)).unwrap();
        let mut out = poisoned_bf16(dev, rows * inter);
        cuda::silu_mul_bf16(dev, &d_gu, &mut out, rows, inter).unwrap();
        assert_close(
            &format!("silu_mul {rows}x{inter}"),
            &from_bf16(&dev.download(&out).unwrap()),
            &want,
            BF16_TOL,
        );
    }
}

#[test]
fn rope_matches_the_reference() {
    let Some(dev) = gpu("rope_matches_the_reference") else {
        return;
    };
    let mut rng = fresh_rng("rope");
    for (rows, heads, d, stride) in [(1, 1, 2, 2), (5, 32, 96, 9216), (17, 3, 64, 200)] {
        let x = rounded(&rng.vec(rows * stride, 2.0));
        let cos = rng.vec(rows * d, 1.2);
        let sin = rng.vec(rows * d, 1.2);
        let mut want = x.clone();
        cpu::rope_ref(&mut want, rows, stride, heads, d, &cos, &sin);
        let mut d_x = dev.upload(&to_bf16(&x)).unwrap();
        let (d_c, d_s) = (dev.upload(&cos).unwrap(), dev.upload(&sin).unwrap());
        cuda::rope_bf16(dev, &mut d_x, rows, stride, heads, d, &d_c, &d_s).unwrap();
        let got = from_bf16(&dev.download(&d_x).unwrap());
        // Columns past the heads must be untouched.
        assert_close(
            &format!("rope {rows}x{heads}x{d}"),
            &got,
            &rounded(&want),
            BF16_TOL,
        );
    }
}

#[test]
fn merge_with_separators_matches_the_reference() {
    let Some(dev) = gpu("merge_with_separators_matches_the_reference") else {
        return;
    };
    let mut rng = fresh_rng("merge");
    let (n, g, c) = (3, 24, 1024);
    let feat = rounded(&rng.vec(n * g * g * c, 1.0));
    let sep = rounded(&rng.vec(2 * 4 * c, 1.0));
    let mut merged = vec![0f32; n * (g / 2) * (g / 2) * 4 * c];
    cpu::merge_2x2_ref(&feat, &mut merged, n, g, c);
    // A layout like spec §4's: each 12-token row of a crop closed by separator 0, then
    // separator 1, then one more crop without separators.
    let h = g / 2;
    let mut src = Vec::new();
    for crop in 0..2 {
        for i in 0..h {
            src.extend((0..h).map(|j| (crop * h * h + i * h + j) as i32));
            src.push(-1);
        }
    }
    src.push(-2);
    src.extend((0..h * h).map(|t| (2 * h * h + t) as i32));
    let want: Vec<f32> = src
        .iter()
        .flat_map(|&s| {
            if s >= 0 {
                merged[s as usize * 4 * c..(s as usize + 1) * 4 * c].to_vec()
            } else {
                let r = (-s - 1) as usize;
                sep[r * 4 * c..(r + 1) * 4 * c].to_vec()
            }
        })
        .collect();
    let (d_feat, d_sep) = (
        dev.upload(&to_bf16(&feat)).unwrap(),
        dev.upload(&to_bf16(&sep)).unwrap(),
    );
    let mut out = poisoned_bf16(dev, src.len() * 4 * c);
    cuda::merge_2x2_bf16(dev, &d_feat, g * g * c, n, g, c, &d_sep, &src, &mut out).unwrap();
    // A copy: exact.
    assert_eq!(from_bf16(&dev.download(&out).unwrap()), want);
    // CLIP's output read in place: a CLS row before each crop's patches.
    let with_cls: Vec<f32> = (0..n)
        .flat_map(|b| {
            let mut crop = vec![f32::NAN; c];
            crop.extend_from_slice(&feat[b * g * g * c..(b + 1) * g * g * c]);
            crop
        })
        .collect();
    let d_cls = dev.upload(&to_bf16(&with_cls)).unwrap();
    let mut out2 = poisoned_bf16(dev, src.len() * 4 * c);
    cuda::merge_2x2_bf16(
        dev,
        &d_cls.slice(c..),
        (g * g + 1) * c,
        n,
        g,
        c,
        &d_sep,
        &src,
        &mut out2,
    )
    .unwrap();
    assert_eq!(from_bf16(&dev.download(&out2).unwrap()), want);
    // A source past the end is refused before the launch.
    let e = cuda::merge_2x2_bf16(
        dev,
        &d_feat,
        g * g * c,
        n,
        g,
        c,
        &d_sep,
        &[(n * h * h) as i32],
        &mut out,
    );
    assert!(matches!(e, Err(Error::CudaArgs { .. })));
}

#[test]
fn embedding_and_scatter_match_the_reference() {
    let Some(dev) = gpu("embedding_and_scatter_match_the_reference") else {
        return;
    };
    let mut rng = fresh_rng("embedding");
    let (vocab, width) = (1000, 3072);
    let table = to_bf16(&rng.vec(vocab * width, 1.0));
    let ids: Vec<u32> = (0..77).map(|_| (rng.below(vocab as u64)) as u32).collect();
    let mut want = vec![0f32; ids.len() * width];
    cpu::embedding_ref(&ids, Weight::Bf16(&table), width, &mut want);
    let d_table = dev.upload(&table).unwrap();
    let mut out = poisoned_bf16(dev, ids.len() * width);
    cuda::embedding_bf16(dev, &ids, &d_table, width, &mut out).unwrap();
    assert_eq!(from_bf16(&dev.download(&out).unwrap()), want);
    // Image features into rows 3..8 and 40.
    let feats = to_bf16(&rng.vec(6 * width, 1.0));
    let rows = [3, 4, 5, 6, 7, 40];
    let mut host = want.clone();
    cpu::embedding::scatter_rows(&mut host, &rows, &from_bf16(&feats), width);
    cuda::scatter_rows_bf16(dev, &mut out, &rows, &dev.upload(&feats).unwrap(), width).unwrap();
    assert_eq!(from_bf16(&dev.download(&out).unwrap()), host);
    let e = cuda::embedding_bf16(dev, &[vocab as u32], &d_table, width, &mut out);
    assert!(matches!(e, Err(Error::CudaArgs { .. })));
}

#[test]
fn casts_round_like_half() {
    let Some(dev) = gpu("casts_round_like_half") else {
        return;
    };
    let mut rng = fresh_rng("casts");
    let mut x = rng.vec(100_003, 1e3);
    x.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        3.0e38,
        1.0 + 1.0 / 256.0,
    ]);
    let d_x = dev.upload(&x).unwrap();
    let mut y = poisoned_bf16(dev, x.len());
    cuda::cast_f32_bf16(dev, &d_x, &mut y, x.len()).unwrap();
    let got = dev.download(&y).unwrap();
    assert!(got
        .iter()
        .zip(&x)
        .all(|(g, &v)| g.to_bits() == bf16::from_f32(v).to_bits()));
    let mut back = poisoned_f32(dev, x.len());
    cuda::cast_bf16_f32(dev, &y, &mut back, x.len()).unwrap();
    assert_eq!(dev.download(&back).unwrap(), from_bf16(&got));
}

/// The CPU sampler's rule for one draw `u` (phi3v::sampling::Sampler): sort descending (ties
/// by index), keep the k best, then the smallest prefix holding top_p, walk until the mass
/// passes u.
fn sample_rule(logits: &[f32], temperature: f32, top_k: usize, top_p: f32, u: f64) -> usize {
    let mut cand: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, v as f64 / temperature as f64))
        .collect();
    cand.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
    if top_k > 0 && top_k < cand.len() {
        cand.truncate(top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|c| (c.1 - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if top_p < 1.0 {
        let mut acc = 0.0;
        let keep = probs
            .iter()
            .position(|q| {
                acc += q;
                acc >= top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
    }
    let mut acc = 0.0;
    for (i, q) in probs.iter().enumerate() {
        acc += q;
        if u < acc {
            return cand[i].0;
        }
    }
    cand[probs.len() - 1].0
}

#[test]
fn argmax_and_sampling_follow_the_cpu_rule() {
    let Some(dev) = gpu("argmax_and_sampling_follow_the_cpu_rule") else {
        return;
    };
    let mut rng = fresh_rng("sampling");
    // Argmax over rows of the real vocabulary size, with a tie (the first index wins).
    let (rows, vocab) = (3, 32064);
    let mut logits = rng.vec(rows * vocab, 10.0);
    logits[vocab + 100] = 50.0;
    logits[vocab + 20_000] = 50.0;
    let d_l = dev.upload(&logits).unwrap();
    let mut out: CudaSlice<i32> = dev.upload(&[-1; 3]).unwrap();
    cuda::argmax_f32(dev, &d_l, rows, vocab, &mut out).unwrap();
    let want: Vec<i32> = logits
        .chunks(vocab)
        .map(|r| {
            let mut best = 0;
            for (i, &v) in r.iter().enumerate() {
                if v > r[best] {
                    best = i;
                }
            }
            best as i32
        })
        .collect();
    assert_eq!(dev.download(&out).unwrap(), want);
    // Sampling: distinct logits, so the rule has no ties; every draw must pick the same token.
    let small: Vec<f32> = (0..300)
        .map(|i| ((i * 7919) % 300) as f32 * 0.02 + rng.f32() * 0.001)
        .collect();
    let d_s = dev.upload(&small).unwrap();
    for (temperature, top_k, top_p) in
        [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 50, 1.0), (0.5, 20, 0.5)]
    {
        for step in 0..100 {
            let u = (step as f32 + 0.5) / 100.0;
            let mut tok: CudaSlice<i32> = dev.upload(&[-1]).unwrap();
            cuda::sample_f32(
                dev,
                &d_s,
                small.len(),
                temperature,
                top_k,
                top_p,
                u,
                &mut tok,
            )
            .unwrap();
            let got = dev.download(&tok).unwrap()[0] as usize;
            // f32 sums on the device, f64 here: a draw or a cut within 1e-4 of a boundary may
            // land on either side.
            let near = [-1e-4, 0.0, 1e-4];
            let ok = near.iter().any(|&du| {
                near.iter().any(|&dp| {
                    sample_rule(
                        &small,
                        temperature,
                        top_k,
                        (top_p + dp as f32).min(1.0),
                        u as f64 + du,
                    ) == got
                })
            });
            let want = sample_rule(&small, temperature, top_k, top_p, u as f64);
            assert!(ok, "temperature {temperature} top_k {top_k} top_p {top_p} u {u}: got {got}, want {want}");
        }
    }
}

#[test]
fn no_gpu_is_an_error_not_a_panic() {
    // On a machine without a GPU this is the whole check; with one, the device opens.
    match Device::new(0) {
        Ok(d) => assert!(!d.describe().is_empty()),
        Err(Error::NoGpu(why)) => assert!(!why.is_empty()),
        Err(e) => panic!("unexpected error: {e}"),
    }
    // A device ordinal that cannot exist is refused the same way, never a panic.
    assert!(matches!(Device::new(1 << 20), Err(Error::NoGpu(_))));
}
