//! The pipeline on a GPU (`--device cuda`) against the CPU f32 path on the bundled model:
//! image features, prompt logits and teacher-forced logits (the CPU's tokens fed back) within
//! relative L2 2e-2, and the same greedy token wherever the CPU top-2 margin exceeds 0.05. Without a GPU these
//! report themselves skipped; what must hold there (a clear error, never a panic, and the CPU
//! path as the default) is checked always.
//!
//! `PHI3V_REPO_ROOT` points the tests at the fixtures when the binary runs away from its
//! checkout (the device bundle).

mod common;
use common::{argmax_and_margin, comparison_cases, fixtures, greedy, rel_l2};
use std::io::Write;

use phi3v::gpu::DeviceKind;
use phi3v::sampling::SamplingParams;
use phi3v::trace::Trace;
use phi3v::{GenerateOptions, Pipeline};

fn skip(test: &str, why: &str) {
    // Outside the harness' capture, so `cargo test` shows it.
    let _ = writeln!(std::io::stderr(), "SKIPPED phi3v::{test}: {why}");
}

#[test]
fn gpu_pipeline_matches_the_cpu_f32_path() {
    let dir = fixtures().join("tiny-phi3v");
    let cpu = Pipeline::load(&dir).unwrap();
    let mut gpu = Pipeline::load(&dir).unwrap();
    if let Err(e) = gpu.use_device(DeviceKind::Cuda) {
        return skip("gpu_pipeline_matches_the_cpu_f32_path", &e.to_string());
    }
    assert_eq!(gpu.device(), DeviceKind::Cuda);
    let trace = Trace::new(false);
    let opts = greedy(12);
    let cases = comparison_cases();
    for (text, images) in cases {
        let prompt = cpu.build_prompt(text, images.len(), true).unwrap();
        let prepared = cpu
            .prepare(&images, &prompt, &cpu.image_processor, &trace)
            .unwrap();
        let want = cpu.generate(&prepared, &opts, &trace, |_| {}).unwrap();
        let got = gpu.generate(&prepared, &opts, &trace, |_| {}).unwrap();
        if !want.image_embeds.is_empty() {
            let e = rel_l2(&got.image_embeds, &want.image_embeds);
            assert!(e < 2e-2, "{text}: image features rel L2 {e:.2e}");
        }
        let e = rel_l2(&got.prompt_logits, &want.prompt_logits);
        assert!(e < 2e-2, "{text}: prompt logits rel L2 {e:.2e}");
        let (tok, margin) = argmax_and_margin(&want.prompt_logits);
        if margin > 0.05 {
            assert_eq!(
                argmax_and_margin(&got.prompt_logits).0,
                tok,
                "{text}: first token (margin {margin})"
            );
        }
        // Teacher-forced with the CPU's tokens: at every generated position where the CPU's
        // top-2 margin exceeds 0.05, the GPU picks the same token.
        let decoder = &cpu.model.decoder;
        let mut seq = want.inputs_embeds.clone();
        seq.extend(
            decoder
                .embed(
                    &want.ids[..want.ids.len() - 1]
                        .iter()
                        .map(|&i| i as i64)
                        .collect::<Vec<_>>(),
                )
                .unwrap(),
        );
        let v = decoder.vocab_size();
        let mut cache = decoder
            .new_cache(seq.len() / decoder.hidden_size())
            .unwrap();
        let (cpu_all, _) = decoder
            .forward(&seq, &mut cache, phi_decoder::Logits::All)
            .unwrap();
        let gpu_all = gpu.gpu.as_ref().unwrap().logits_all(&seq).unwrap();
        let e = rel_l2(&gpu_all, &cpu_all);
        assert!(e < 2e-2, "{text}: teacher-forced logits rel L2 {e:.2e}");
        let first = want.prompt_len - 1;
        let mut checked = 0;
        for (i, &w) in want.ids.iter().enumerate() {
            let row = first + i;
            let (cpu_tok, margin) = argmax_and_margin(&cpu_all[row * v..(row + 1) * v]);
            if margin > 0.05 {
                assert_eq!(cpu_tok as u32, w, "the CPU's own greedy token at {i}");
                let (gpu_tok, _) = argmax_and_margin(&gpu_all[row * v..(row + 1) * v]);
                assert_eq!(
                    gpu_tok, cpu_tok,
                    "{text}: generated position {i} (CPU margin {margin})"
                );
                checked += 1;
            }
        }
        eprintln!(
            "{text}: {checked} of {} generated positions checked",
            want.ids.len()
        );
        assert_eq!(got.ids[0], want.ids[0], "{text}: first generated token");
    }
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    let dir = fixtures().join("tiny-phi3v");
    let mut p = Pipeline::load(&dir).unwrap();
    match p.use_device(DeviceKind::Cuda) {
        Ok(()) => assert_eq!(p.device(), DeviceKind::Cuda),
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("no CUDA device") || msg.contains("without the `cuda` feature"),
                "{msg}"
            );
            // The pipeline stays on the CPU and still works.
            assert_eq!(p.device(), DeviceKind::Cpu);
            let prompt = p.build_prompt("Hi.", 0, true).unwrap();
            let prepared = p
                .prepare(&[], &prompt, &p.image_processor, &Trace::new(false))
                .unwrap();
            let opts = GenerateOptions {
                max_new_tokens: 2,
                sampling: SamplingParams::default(),
                ignore_stop: true,
            };
            let g = p
                .generate(&prepared, &opts, &Trace::new(false), |_| {})
                .unwrap();
            assert_eq!(g.ids.len(), 2);
        }
    }
}

#[cfg(feature = "cuda")]
#[test]
fn the_default_device_is_the_cpu_without_a_gpu() {
    let has_gpu = phi_kernels::cuda::Device::new(0).is_ok();
    assert_eq!(DeviceKind::detect() == DeviceKind::Cuda, has_gpu);
}
