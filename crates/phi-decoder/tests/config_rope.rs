//! Decoder configuration checks and the LongRoPE factor choice.

use phi_decoder::{Phi3Config, RopeFactors, RotaryEmbedding};
use serde_json::json;

fn base() -> serde_json::Value {
    json!({
        "vocab_size": 100, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096,
        "original_max_position_embeddings": 64,
        "rope_scaling": {"type": "su", "short_factor": [1.0, 1.5, 2.0, 2.5], "long_factor": [1.0, 4.0, 8.0, 16.0]},
        "eos_token_id": 2, "some_unrelated_key": true
    })
}

#[test]
fn factor_set_switches_strictly_above_the_original_length() {
    let cfg = Phi3Config::from_json(&base()).unwrap();
    let rope = RotaryEmbedding::new(&cfg);
    // seq_len = max position + 1; long only when seq_len > 64.
    assert_eq!(rope.factors_for(62), RopeFactors::Short);
    assert_eq!(rope.factors_for(63), RopeFactors::Short);
    assert_eq!(rope.factors_for(64), RopeFactors::Long);
    let (_, _, f) = rope.cos_sin(0..64);
    assert_eq!(f, RopeFactors::Short);
    let (_, _, f) = rope.cos_sin(60..65);
    assert_eq!(f, RopeFactors::Long);
}

#[test]
fn mscale_and_tables_follow_the_formula() {
    let cfg = Phi3Config::from_json(&base()).unwrap();
    let rope = RotaryEmbedding::new(&cfg);
    let expect = (1.0 + (4096.0f64 / 64.0).ln() / 64f64.ln()).sqrt();
    assert!((rope.mscale() as f64 - expect).abs() < 1e-6);
    let (cos, sin, _) = rope.cos_sin(5..6);
    let d = 8;
    for k in 0..4 {
        let inv = 1.0 / ([1.0, 1.5, 2.0, 2.5][k] * 10000f64.powf(2.0 * k as f64 / d as f64));
        let ang = 5.0 * inv;
        for idx in [k, k + 4] {
            assert!((cos[idx] as f64 - ang.cos() * expect).abs() < 1e-5);
            assert!((sin[idx] as f64 - ang.sin() * expect).abs() < 1e-5);
        }
    }
    // The real Phi-3-vision value from the spec.
    let mut real = base();
    real["max_position_embeddings"] = json!(131072);
    real["original_max_position_embeddings"] = json!(4096);
    let rope = RotaryEmbedding::new(&Phi3Config::from_json(&real).unwrap());
    assert!((rope.mscale() as f64 - 1.1902380714238083).abs() < 1e-6);
}

#[test]
fn unsupported_settings_are_rejected_with_the_key_named() {
    let cases = [
        (
            "rope_scaling",
            json!({"type": "yarn", "short_factor": [1.0, 1.0, 1.0, 1.0], "long_factor": [1.0, 1.0, 1.0, 1.0]}),
            "yarn",
        ),
        (
            "rope_scaling",
            json!({"type": "su", "short_factor": [1.0], "long_factor": [1.0, 1.0, 1.0, 1.0]}),
            "short_factor",
        ),
        ("hidden_act", json!("gelu"), "hidden_act"),
        ("num_key_value_heads", json!(1), "num_key_value_heads"),
        ("num_attention_heads", json!(3), "num_attention_heads"),
        ("partial_rotary_factor", json!(0.5), "partial_rotary_factor"),
    ];
    for (key, value, needle) in cases {
        let mut j = base();
        j[key] = value;
        let e = Phi3Config::from_json(&j).unwrap_err().to_string();
        assert!(e.contains(needle), "{key}: {e}");
    }
    let mut j = base();
    j.as_object_mut().unwrap().remove("hidden_size");
    assert!(Phi3Config::from_json(&j)
        .unwrap_err()
        .to_string()
        .contains("hidden_size"));
}

#[test]
fn longrope_name_and_eos_lists_are_accepted() {
    let mut j = base();
    j["rope_scaling"]["type"] = json!("longrope");
    j["eos_token_id"] = json!([2, 32000, 32007]);
    let cfg = Phi3Config::from_json(&j).unwrap();
    assert_eq!(cfg.eos_token_ids(), vec![2, 32000, 32007]);
}

#[test]
fn bf16_kv_cache_holds_half_the_bytes() {
    use phi_decoder::KvCache;
    use phi_kernels::DType;
    let cfg = phi_decoder::Phi3Config::from_file(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/tiny-phi3v/config.json"),
    )
    .unwrap();
    let f = KvCache::with_dtype(&cfg, 8, DType::F32).unwrap();
    let b = KvCache::with_dtype(&cfg, 8, DType::BF16).unwrap();
    assert_eq!(b.dtype(), DType::BF16);
    assert_eq!(2 * b.bytes_per_position(), f.bytes_per_position());
    assert_eq!(
        f.bytes_per_position(),
        2 * cfg.num_hidden_layers * cfg.hidden_size * 4
    );
    assert!(KvCache::with_dtype(&cfg, 8, DType::F16).is_err());
}
