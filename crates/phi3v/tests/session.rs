//! Sessions (`Pipeline::feed` / `step` / `Decoding`): a later turn that shares a prefix with
//! what a session holds runs only the new tokens and gives what a fresh run gives; cached image
//! features equal freshly computed ones.

mod common;

use std::sync::Arc;

use phi3v::feature_cache::FeatureCache;
use phi3v::processor::{decode_image, ChatMessage};
use phi3v::trace::Trace;
use phi3v::{Decoding, Pipeline, Session};

fn pipeline() -> Pipeline {
    Pipeline::load(&common::fixtures().join("tiny-phi3v")).unwrap()
}

/// Feeds `messages` and decodes `n` greedy tokens: (reused positions, first logits, tokens).
fn turn(
    p: &Pipeline,
    s: &mut Session,
    messages: &[ChatMessage],
    images: &[phi3v::processor::RgbImage],
    n: usize,
) -> (usize, Vec<f32>, Vec<u32>) {
    let trace = Trace::new(false);
    let prompt = p.prompt.apply_chat_template(messages, true).unwrap();
    let prepared = p
        .prepare(images, &prompt, &p.image_processor, &trace)
        .unwrap();
    let fed = p.feed(s, &prepared, None, &trace).unwrap();
    let opts = common::greedy(n);
    let mut dec = Decoding::new(p, &opts, n, &fed);
    while dec.next(p, s).unwrap().is_some() {}
    assert_eq!(s.ids().len(), prepared.input_ids.len() + n - 1);
    (fed.reused, fed.logits.clone(), dec.ids)
}

#[test]
fn a_second_turn_reuses_the_first_and_matches_a_fresh_run() {
    let p = pipeline();
    let img = decode_image(&common::fixtures().join("images/square.png")).unwrap();
    let images = vec![img];
    let mut msgs = vec![ChatMessage::new(
        "user",
        "<|image_1|>\nWhat is in the picture?",
    )];

    let mut s = p.new_session(2048).unwrap();
    let (reused, _, first) = turn(&p, &mut s, &msgs, &images, 6);
    assert_eq!(reused, 0);
    msgs.push(ChatMessage::new(
        "assistant",
        p.prompt.decode(&first, true).unwrap(),
    ));
    msgs.push(ChatMessage::new("user", "And the colours?"));

    let (reused, logits, second) = turn(&p, &mut s, &msgs, &images, 8);
    // The whole first prompt, image placeholders included, comes from the cache.
    assert!(reused > 144, "only {reused} positions reused");

    let mut fresh = p.new_session(2048).unwrap();
    let (r0, want_logits, want) = turn(&p, &mut fresh, &msgs, &images, 8);
    assert_eq!(r0, 0);
    assert_eq!(
        second, want,
        "tokens after KV reuse differ from a fresh run"
    );
    let err = common::rel_l2(&logits, &want_logits);
    assert!(err < 1e-5, "prompt logits rel L2 {err}");
}

#[test]
fn a_different_image_behind_the_same_placeholders_is_not_reused() {
    let p = pipeline();
    let a = decode_image(&common::fixtures().join("images/square.png")).unwrap();
    let mut b = a.clone();
    b.data[0] ^= 0xff; // same size, so the same ids; different pixels
    let msgs = vec![ChatMessage::new("user", "<|image_1|>\nDescribe.")];
    let mut s = p.new_session(1024).unwrap();
    turn(&p, &mut s, &msgs, &[a], 2);
    let (reused, logits, _) = turn(&p, &mut s, &msgs, std::slice::from_ref(&b), 2);
    let first_placeholder = s.ids().iter().position(|&i| i < 0).unwrap();
    assert_eq!(
        reused, first_placeholder,
        "reuse must stop at the changed image"
    );
    let mut fresh = p.new_session(1024).unwrap();
    let (_, want, _) = turn(&p, &mut fresh, &msgs, &[b], 2);
    assert!(common::rel_l2(&logits, &want) < 1e-5);
}

#[test]
fn a_prompt_beyond_the_session_is_refused() {
    let p = pipeline();
    let mut s = p.new_session(8).unwrap();
    let prompt = "word ".repeat(50);
    let prepared = p
        .prepare(&[], &prompt, &p.image_processor, &Trace::new(false))
        .unwrap();
    let e = p
        .feed(&mut s, &prepared, None, &Trace::new(false))
        .unwrap_err()
        .to_string();
    assert!(e.contains("context holds 8 positions"), "{e}");
    let limit = p.model.decoder.cfg.max_position_embeddings;
    assert!(p.new_session(limit + 1).is_err());
}

#[test]
fn cached_image_features_equal_fresh_ones() {
    let p = pipeline();
    let trace = Trace::new(false);
    let img = decode_image(&common::fixtures().join("images/wide.png")).unwrap();
    let other = decode_image(&common::fixtures().join("images/portrait.png")).unwrap();
    let a = p.image_processor.process(&img).unwrap();
    let b = p.image_processor.process(&other).unwrap();
    let cache = FeatureCache::new(64 << 20);
    let first = p.image_features(&[&a], Some(&cache), &trace).unwrap();
    // One hit (a) and one miss (b) in a single call; b's rows must not shift a's.
    let both = p.image_features(&[&b, &a], Some(&cache), &trace).unwrap();
    let fresh = p.image_features(&[&b, &a], None, &trace).unwrap();
    assert!(Arc::ptr_eq(&first[0], &both[1]), "a came from the cache");
    assert_eq!(*both[0], *fresh[0]);
    assert_eq!(*both[1], *fresh[1]);
    let h = p.model.decoder.hidden_size();
    assert_eq!(both[0].len(), b.num_img_tokens * h);
    let st = cache.stats();
    assert_eq!((st.hits, st.misses, st.entries), (1, 2, 2));
    // Another num_crops is another key.
    let other_n = if p.image_processor.num_crops == 9 {
        4
    } else {
        9
    };
    let c = p
        .image_processor
        .with_num_crops(other_n)
        .unwrap()
        .process(&img)
        .unwrap();
    assert_ne!(c.key, a.key);
}

#[test]
fn a_batched_step_equals_each_sessions_own_step() {
    let p = pipeline();
    let trace = Trace::new(false);
    let prompts = [
        "<|user|>\nHello<|end|>\n<|assistant|>\n",
        "Once upon a time there was",
        "x",
    ];
    let prep = |t: &str| p.prepare(&[], t, &p.image_processor, &trace).unwrap();
    let mut batched: Vec<Session> = Vec::new();
    let mut alone: Vec<Session> = Vec::new();
    for t in prompts {
        for v in [&mut batched, &mut alone] {
            let mut s = p.new_session(256).unwrap();
            p.feed(&mut s, &prep(t), None, &trace).unwrap();
            v.push(s);
        }
    }
    // Three steps: sessions at different positions in one batch each time.
    for step in 0..3u32 {
        let tokens: Vec<u32> = (0..3).map(|r| 100 + 17 * r + step).collect();
        let mut refs: Vec<&mut Session> = batched.iter_mut().collect();
        let got = p.step_batch(&mut refs, &tokens).unwrap();
        for (r, s) in alone.iter_mut().enumerate() {
            let want = p.step(s, tokens[r], false).unwrap();
            let err = common::rel_l2(&got[r].logits, &want.logits);
            assert!(err < 1e-6, "step {step} row {r}: rel L2 {err}");
            assert_eq!(got[r].factors, want.factors);
            assert_eq!(batched[r].ids(), s.ids());
        }
    }
}

#[test]
fn a_grown_session_goes_on_as_a_big_one_would() {
    let p = pipeline();
    let trace = Trace::new(false);
    let prepared = p
        .prepare(&[], "Once upon a time", &p.image_processor, &trace)
        .unwrap();
    let n = prepared.input_ids.len();
    let mut small = p.new_session(n).unwrap();
    let mut big = p.new_session(n + 8).unwrap();
    p.feed(&mut small, &prepared, None, &trace).unwrap();
    p.feed(&mut big, &prepared, None, &trace).unwrap();
    assert!(
        p.step(&mut small, 500, false).is_err(),
        "a full session refuses a step"
    );
    assert!(p.grow(&mut small, n + 8).unwrap());
    assert_eq!(small.capacity(), n + 8);
    for t in [500u32, 600, 700] {
        let a = p.step(&mut small, t, false).unwrap();
        let b = p.step(&mut big, t, false).unwrap();
        assert_eq!(a.logits, b.logits);
    }
    let limit = p.model.decoder.cfg.max_position_embeddings;
    assert!(p.grow(&mut small, limit + 1).is_err());
}
