//! Every fixture case against the reference goldens, stage by stage (the table of
//! `cargo xtask parity`): exact HD images, input ids and sizes; pixel values within 1e-5;
//! CLIP output, image embeddings, inputs_embeds and logits within 1e-4 relative L2; the RoPE
//! factor set of every forward call; greedy tokens wherever the reference margin exceeds 1e-3.

use std::path::Path;

use phi3v::parity::{cases, run_case, Row};
use phi3v::Pipeline;

#[test]
fn all_fixture_cases_match_the_reference() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let pipeline = Pipeline::load(&fixtures.join("tiny-phi3v")).expect("load the bundled model");
    let names = cases(&fixtures).unwrap();
    assert!(
        names.len() >= 8,
        "expected the 8 fixture cases, found {names:?}"
    );
    let mut rows = Vec::new();
    for case in &names {
        rows.extend(
            run_case(&pipeline, &fixtures, case).unwrap_or_else(|e| panic!("case {case}: {e}")),
        );
    }
    println!("{}", Row::format_table(&rows));
    let failed: Vec<&Row> = rows.iter().filter(|r| !r.pass).collect();
    assert!(
        failed.is_empty(),
        "{} parity rows failed:\n{}",
        failed.len(),
        Row::format_table(&rows)
    );
    // Every stage the issue names is covered somewhere.
    for stage in [
        "HD image 0 (uint8)",
        "pixel_values 0",
        "input_ids",
        "CLIP hidden_states[-2]",
        "image_embeds",
        "inputs_embeds",
        "logits (last prompt pos)",
        "greedy tokens",
        "rope factors per call",
        "chat template",
    ] {
        assert!(
            rows.iter().any(|r| r.stage == stage),
            "no row for stage {stage}"
        );
    }
    // Both factor sets are exercised, and one case switches during decoding.
    assert!(rows
        .iter()
        .any(|r| r.stage == "rope factors per call" && r.note.starts_with("0 of")));
    assert!(rows
        .iter()
        .any(|r| r.stage == "rope factors per call" && r.note.starts_with("8 of 8")));
    assert!(rows.iter().any(|r| r.case == "rope_cross"
        && r.stage == "rope factors per call"
        && r.note.starts_with("12 of 24")));
}
