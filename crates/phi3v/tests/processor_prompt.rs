//! Chat template, chunked tokenisation and placeholder expansion (spec §3, §11), on the real
//! Phi-3-vision tokenizer files as copied into the bundled model `fixtures/tiny-phi3v/`.

use std::path::PathBuf;

use phi3v::processor::{ChatMessage, PromptProcessor, TextStreamer};

fn prompt() -> PromptProcessor {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-phi3v");
    PromptProcessor::from_dir(&dir).expect("load tokenizer")
}

const CANONICAL: &str =
    "<|user|>\n<|image_1|>\nWhat is shown in this image?<|end|>\n<|assistant|>\n";

/// Spec §11: `1, 32010, 29871, 13, -1 x N, 1, 29871, 13, 5618, 338, 4318, 297, 445, 1967, 29973,
/// 32007, 29871, 13, 32001`, confirmed by running the reference processor.
#[test]
fn canonical_prompt_ids() {
    let p = prompt();
    for n in [1usize, 757, 2509] {
        let ids = p.encode(CANONICAL, &[n]).unwrap();
        let mut expected: Vec<i64> = vec![1, 32010, 29871, 13];
        expected.extend(std::iter::repeat_n(-1, n));
        expected.extend([
            1, 29871, 13, 5618, 338, 4318, 297, 445, 1967, 29973, 32007, 29871, 13, 32001,
        ]);
        assert_eq!(ids, expected, "N = {n}");
    }
}

#[test]
fn chat_template_single_user_message() {
    let p = prompt();
    let content = "<|image_1|>\nWhat is shown in this image?";
    let msgs = [ChatMessage::new("user", content)];
    assert_eq!(
        p.apply_chat_template(&msgs, true).unwrap(),
        format!("<|user|>\n{content}<|end|>\n<|assistant|>\n")
    );
    assert_eq!(p.apply_chat_template(&msgs, true).unwrap(), CANONICAL);
    // Without the generation prompt the assistant tag is absent.
    assert_eq!(
        p.apply_chat_template(&msgs, false).unwrap(),
        format!("<|user|>\n{content}<|end|>\n")
    );
}

#[test]
fn chat_template_multi_turn() {
    let p = prompt();
    let msgs = [
        ChatMessage::new("system", "Be brief."),
        ChatMessage::new("user", "<|image_1|>\nWhat is it?"),
        ChatMessage::new("assistant", "A cat."),
        ChatMessage::new("user", "And its colour?"),
    ];
    assert_eq!(
        p.apply_chat_template(&msgs, true).unwrap(),
        "<|system|>\nBe brief.<|end|>\n<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\nA cat.<|end|>\n\
         <|user|>\nAnd its colour?<|end|>\n<|assistant|>\n"
    );
    // A conversation ending with the assistant gets no new assistant tag.
    assert_eq!(
        p.apply_chat_template(&msgs[..3], true).unwrap(),
        "<|system|>\nBe brief.<|end|>\n<|user|>\n<|image_1|>\nWhat is it?<|end|>\n<|assistant|>\nA cat.<|end|>\n"
    );
}

#[test]
fn special_tokens_and_ids() {
    let p = prompt();
    assert_eq!(p.bos_token(), Some("<s>"));
    assert_eq!(p.eos_token(), Some("<|endoftext|>"));
    for (tok, id) in [
        ("<s>", 1),
        ("</s>", 2),
        ("<|endoftext|>", 32000),
        ("<|assistant|>", 32001),
        ("<|system|>", 32006),
        ("<|end|>", 32007),
        ("<|user|>", 32010),
    ] {
        assert_eq!(p.token_id(tok), Some(id), "{tok}");
    }
    assert_eq!(p.token_id("<|image_1|>"), None);
}

#[test]
fn no_images_is_plain_tokenisation() {
    let p = prompt();
    let text = "<|user|>\nHello<|end|>\n<|assistant|>\n";
    let ids = p.encode(text, &[]).unwrap();
    let plain: Vec<i64> = p
        .encode_text(text, true)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    assert_eq!(ids, plain);
    assert_eq!(ids[0], 1);
    assert_eq!(
        ids.iter().filter(|&&i| i == 1).count(),
        1,
        "one BOS only: {ids:?}"
    );
}

#[test]
fn bos_starts_every_chunk() {
    let p = prompt();
    // Starts with an image: the empty first chunk gives [1]; ends with an image: trailing [1].
    let ids = p.encode("<|image_1|>", &[3]).unwrap();
    assert_eq!(ids, vec![1, -1, -1, -1, 1]);

    let ids = p.encode("<|image_1|>a<|image_2|>", &[2, 3]).unwrap();
    let a: Vec<i64> = p
        .encode_text("a", true)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let mut expected = vec![1, -1, -1];
    expected.extend(&a);
    expected.extend([-2, -2, -2, 1]);
    assert_eq!(ids, expected);
    assert_eq!(a[0], 1);
}

#[test]
fn two_images_placeholders() {
    let p = prompt();
    let text = "<|user|>\n<|image_1|>\n<|image_2|>\nCompare.<|end|>\n<|assistant|>\n";
    let ids = p.encode(text, &[757, 1921]).unwrap();
    assert_eq!(ids.iter().filter(|&&i| i == -1).count(), 757);
    assert_eq!(ids.iter().filter(|&&i| i == -2).count(), 1921);
    // Runs are contiguous and in order.
    let first_m2 = ids.iter().position(|&i| i == -2).unwrap();
    let last_m1 = ids.iter().rposition(|&i| i == -1).unwrap();
    assert!(last_m1 < first_m2);
    assert_eq!(
        ids.iter().filter(|&&i| i == 1).count(),
        3,
        "three chunks, three BOS"
    );
}

fn err_of(p: &PromptProcessor, text: &str, n: &[usize]) -> String {
    match p.encode(text, n) {
        Ok(ids) => panic!(
            "expected an error for {text:?} with {n:?}, got {} ids",
            ids.len()
        ),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_tags() {
    let p = prompt();
    let e = err_of(&p, "<|image_1|> <|image_3|>", &[10, 10]);
    assert!(
        e.contains("prompt references <|image_3|> but only 2 images were given"),
        "{e}"
    );

    let e = err_of(&p, "<|image_1|> <|image_1|>", &[10]);
    assert!(
        e.contains("<|image_1|>") && e.contains("more than once"),
        "{e}"
    );

    let e = err_of(&p, "<|image_2|> <|image_1|>", &[10, 10]);
    assert!(
        e.contains("ascending order") && e.contains("<|image_2|> comes before <|image_1|>"),
        "{e}"
    );

    let e = err_of(&p, "<|image_1|> only", &[10, 10]);
    assert!(
        e.contains("no <|image_2|> tag") && e.contains("2 images were given"),
        "{e}"
    );

    let e = err_of(&p, "no tags at all", &[10]);
    assert!(
        e.contains("no <|image_1|> tag") && e.contains("1 image was given"),
        "{e}"
    );

    let e = err_of(&p, "<|image_1|> but no images", &[]);
    assert!(
        e.contains("prompt references <|image_1|> but no images were given"),
        "{e}"
    );

    let e = err_of(&p, "<|image_0|>", &[10]);
    assert!(
        e.contains("<|image_0|>") && e.contains("start at <|image_1|>"),
        "{e}"
    );

    let e = err_of(&p, "<|image_2|>", &[10]);
    assert!(
        e.contains("prompt references <|image_2|> but only 1 image was given"),
        "{e}"
    );
}

#[test]
fn decode_round_trip() {
    let p = prompt();
    let text = "What is shown in this image? A cat, naïve café — 猫.";
    let ids = p.encode_text(text, true).unwrap();
    assert_eq!(p.decode(&ids, true).unwrap(), text);
    // With special tokens kept, the BOS shows.
    assert_eq!(p.decode(&ids, false).unwrap(), format!("<s> {text}"));
    assert_eq!(p.decode(&[32007], true).unwrap(), "");
    assert_eq!(p.decode(&[32007], false).unwrap(), "<|end|>");
}

#[test]
fn streamer_matches_final_decode() {
    let p = prompt();
    let text = "Hello world!\nA cat 🐈 sits on a 猫 mat — naïve.  Done";
    // Without BOS: as the model generates it. The emoji and 猫 go through byte-fallback tokens.
    let mut ids = p.encode_text(text, false).unwrap();
    ids.push(32007);
    let mut s = TextStreamer::new(&p);
    let mut out = String::new();
    let mut pieces = Vec::new();
    for &id in &ids {
        let piece = s.push(id).unwrap();
        assert!(
            !piece.contains('\u{FFFD}'),
            "partial UTF-8 leaked: {piece:?}"
        );
        out.push_str(&piece);
        pieces.push(piece);
    }
    out.push_str(&s.finish().unwrap());
    assert_eq!(out, p.decode(&ids, true).unwrap());
    assert_eq!(out, text);
    assert!(pieces.len() > 5 && pieces.iter().filter(|x| !x.is_empty()).count() > 5);
}

#[test]
fn streamer_flushes_incomplete_bytes_on_finish() {
    let p = prompt();
    // "🐈" is F0 9F 90 88: push only its first two byte tokens.
    let b0 = p.token_id("<0xF0>").unwrap();
    let b1 = p.token_id("<0x9F>").unwrap();
    let mut s = TextStreamer::new(&p);
    assert_eq!(s.push(p.token_id("▁Hi").unwrap()).unwrap(), "Hi");
    assert_eq!(s.push(b0).unwrap(), "");
    assert_eq!(s.push(b1).unwrap(), "");
    let rest = s.finish().unwrap();
    assert!(
        rest.chars().all(|c| c == '\u{FFFD}') && !rest.is_empty(),
        "{rest:?}"
    );
}

#[test]
fn missing_tokenizer_is_an_error() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/no-such-dir");
    let e = PromptProcessor::from_dir(&dir).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json"), "{e}");
}
