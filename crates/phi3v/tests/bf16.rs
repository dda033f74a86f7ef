//! `--dtype bf16` against the f32 path on the bundled model: image features and logits within
//! relative L2 2e-2 (the bound), and the same greedy token wherever the f32 top-2
//! margin exceeds 0.05. The f32 path itself is checked against PyTorch in tests/parity.rs.

mod common;
use common::{argmax_and_margin, comparison_cases, fixtures, greedy, rel_l2};

use phi3v::trace::Trace;
use phi3v::Pipeline;
use phi_decoder::Logits;
use phi_kernels::DType;

#[test]
fn bf16_products_track_the_f32_path() {
    let dir = fixtures().join("tiny-phi3v");
    let f32p = Pipeline::load_with(&dir, DType::F32).unwrap();
    let bf16p = Pipeline::load_with(&dir, DType::BF16).unwrap();
    let trace = Trace::new(false);
    let opts = greedy(12);
    let cases = comparison_cases();
    let (mut compared, mut margins_checked) = (0, 0);
    for (text, images) in cases {
        let prompt = f32p.build_prompt(text, images.len(), true).unwrap();
        let prepared = f32p
            .prepare(&images, &prompt, &f32p.image_processor, &trace)
            .unwrap();
        let want = f32p.generate(&prepared, &opts, &trace, |_| {}).unwrap();
        let got = bf16p.generate(&prepared, &opts, &trace, |_| {}).unwrap();
        if !images.is_empty() {
            let r = rel_l2(&got.image_embeds, &want.image_embeds);
            assert!(r < 2e-2, "{text}: image_embeds relative L2 {r:e}");
            // The rounding is real: bf16 products are not the f32 ones.
            assert!(r > 1e-5, "{text}: bf16 image_embeds equal f32 ({r:e})");
        }
        let r = rel_l2(&got.prompt_logits, &want.prompt_logits);
        assert!(r < 2e-2, "{text}: prompt logits relative L2 {r:e}");
        eprintln!(
            "{text:32} image_embeds rel L2 {}, prompt logits rel L2 {r:.3e}, tokens {:?} vs {:?}",
            if images.is_empty() {
                "-".to_string()
            } else {
                format!("{:.3e}", rel_l2(&got.image_embeds, &want.image_embeds))
            },
            got.ids,
            want.ids
        );

        // Teacher-forced over the f32 continuation: logits at every generated position.
        let mut ids = prepared.input_ids.clone();
        ids.extend(want.ids.iter().map(|&t| t as i64));
        let run = |p: &Pipeline| {
            let embeds = p.inputs_embeds(&ids, &want.image_embeds).unwrap();
            let dec = &p.model.decoder;
            let mut cache = dec.new_cache(ids.len()).unwrap();
            dec.forward(&embeds, &mut cache, Logits::All).unwrap().0
        };
        let (lw, lg) = (run(&f32p), run(&bf16p));
        let v = f32p.model.decoder.vocab_size();
        for pos in prepared.input_ids.len() - 1..ids.len() - 1 {
            let (w, g) = (&lw[pos * v..(pos + 1) * v], &lg[pos * v..(pos + 1) * v]);
            let r = rel_l2(g, w);
            assert!(r < 2e-2, "{text}: logits at {pos}: relative L2 {r:e}");
            let ((tw, margin), (tg, _)) = (argmax_and_margin(w), argmax_and_margin(g));
            if margin > 0.05 {
                assert_eq!(
                    tg, tw,
                    "{text}: greedy token at {pos} (f32 margin {margin})"
                );
                margins_checked += 1;
            }
            compared += 1;
        }
    }
    eprintln!("{margins_checked} of {compared} positions had an f32 margin over 0.05");
    // The margin rule must not have skipped (nearly) everything.
    assert!(
        margins_checked * 2 >= compared,
        "only {margins_checked} of {compared} positions had a margin over 0.05"
    );
}
