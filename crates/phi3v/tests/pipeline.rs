//! Prompt assembly of `--prompt` and the placeholder/feature count check.

use std::path::Path;

use phi3v::Pipeline;

fn pipeline() -> Pipeline {
    Pipeline::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-phi3v"))
        .unwrap()
}

#[test]
fn chat_prompt_gets_one_tag_per_image_unless_it_has_tags() {
    let p = pipeline();
    assert_eq!(
        p.build_prompt("Compare them.", 2, true).unwrap(),
        "<|user|>\n<|image_1|>\n<|image_2|>\nCompare them.<|end|>\n<|assistant|>\n"
    );
    assert_eq!(
        p.build_prompt("Left <|image_2|> right <|image_1|>", 2, true)
            .unwrap(),
        "<|user|>\nLeft <|image_2|> right <|image_1|><|end|>\n<|assistant|>\n"
    );
    assert_eq!(
        p.build_prompt("Hi", 0, true).unwrap(),
        "<|user|>\nHi<|end|>\n<|assistant|>\n"
    );
    // --raw-prompt: untouched.
    assert_eq!(
        p.build_prompt("<|image_1|>x", 1, false).unwrap(),
        "<|image_1|>x"
    );
}

#[test]
fn feature_count_must_match_the_placeholders() {
    let p = pipeline();
    let h = p.model.decoder.hidden_size();
    let ids = [1i64, -1, -1, 5];
    assert!(p.inputs_embeds(&ids, &vec![0.5; 2 * h]).is_ok());
    let e = p
        .inputs_embeds(&ids, &vec![0.5; 3 * h])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2 image placeholder tokens") && e.contains("3 features"),
        "{e}"
    );
    // Ids beyond the vocabulary are an error, not an out-of-bounds read.
    assert!(p.inputs_embeds(&[1, 40_000], &[]).is_err());
}
