//! Checkpoint loading: good files read back exactly; bad files are errors that name the file
//! or tensor, never panics.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use phi_kernels::{Checkpoint, DType, Error, Residency, Weight};
use safetensors::tensor::{Dtype, TensorView};

fn tmpdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("phi-kernels-ckpt-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn write(path: &Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn sample() -> Vec<(&'static str, Dtype, Vec<usize>, Vec<u8>)> {
    let f: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let b: Vec<bf16> = (0..4).map(|i| bf16::from_f32(i as f32 + 0.25)).collect();
    let h: Vec<f16> = (0..3).map(|i| f16::from_f32(-(i as f32) * 0.125)).collect();
    vec![
        (
            "a.weight",
            Dtype::F32,
            vec![2, 3],
            bytemuck::cast_slice(&f).to_vec(),
        ),
        (
            "b.weight",
            Dtype::BF16,
            vec![4],
            bytemuck::cast_slice(&b).to_vec(),
        ),
        (
            "c.bias",
            Dtype::F16,
            vec![3],
            bytemuck::cast_slice(&h).to_vec(),
        ),
        ("pos_ids", Dtype::I64, vec![2], vec![0u8; 16]),
    ]
}

/// Both ways of holding a checkpoint's bytes; every reading test runs on each.
const RESIDENCIES: [Residency; 2] = [Residency::Mapped, Residency::Resident];

#[test]
fn reads_back_every_dtype() {
    let d = tmpdir("good");
    write(&d.join("model.safetensors"), &sample());
    for residency in RESIDENCIES {
        reads_back_sample(&Checkpoint::open_with(&d, residency).unwrap());
    }
}

fn reads_back_sample(ck: &Checkpoint) {
    assert_eq!(
        ck.get("a.weight", &[2, 3]).unwrap().to_f32_vec(),
        vec![-1.0, -0.5, 0.0, 0.5, 1.0, 1.5]
    );
    let b = ck.get("b.weight", &[4]).unwrap();
    assert_eq!(b.dtype(), DType::BF16);
    assert!(matches!(b.view(), Weight::Bf16(_)));
    assert_eq!(b.to_f32_vec(), vec![0.25, 1.25, 2.25, 3.25]);
    assert_eq!(
        ck.get_f32("c.bias", &[3]).unwrap(),
        vec![0.0, -0.125, -0.25]
    );
    // An I64 buffer does not stop the checkpoint from opening, only its own use.
    assert!(matches!(
        ck.tensor("pos_ids"),
        Err(Error::UnsupportedDType { .. })
    ));
}

#[test]
fn misaligned_header_still_reads_exact_values() {
    // Hand-built file whose header length is odd, so f32 data starts at an odd offset.
    let d = tmpdir("misaligned");
    let header = r#"{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} "#;
    assert!(header.len() % 2 == 1);
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&1.5f32.to_le_bytes());
    bytes.extend_from_slice(&(-2.0f32).to_le_bytes());
    let p = d.join("m.safetensors");
    std::fs::write(&p, bytes).unwrap();
    for residency in RESIDENCIES {
        let ck = Checkpoint::open_with(&p, residency).unwrap();
        assert_eq!(ck.get_f32("x", &[2]).unwrap(), vec![1.5, -2.0]);
    }
}

#[test]
fn sharded_directory_with_index() {
    let d = tmpdir("sharded");
    let s = sample();
    write(&d.join("model-00001-of-00002.safetensors"), &s[..2]);
    write(&d.join("model-00002-of-00002.safetensors"), &s[2..3]);
    let map: HashMap<&str, &str> = [
        ("a.weight", "model-00001-of-00002.safetensors"),
        ("b.weight", "model-00001-of-00002.safetensors"),
        ("c.bias", "model-00002-of-00002.safetensors"),
    ]
    .into();
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    for residency in RESIDENCIES {
        let ck = Checkpoint::open_with(&d, residency).unwrap();
        assert_eq!(ck.names(), vec!["a.weight", "b.weight", "c.bias"]);
        assert_eq!(ck.get_f32("c.bias", &[3]).unwrap()[1], -0.125);
        assert!(ck
            .file_of("c.bias")
            .unwrap()
            .ends_with("model-00002-of-00002.safetensors"));
    }
}

#[test]
fn index_naming_an_absent_tensor_is_an_error() {
    let d = tmpdir("badindex");
    write(&d.join("model-00001-of-00001.safetensors"), &sample()[..1]);
    let index = serde_json::json!({"weight_map": {"a.weight": "model-00001-of-00001.safetensors", "ghost": "model-00001-of-00001.safetensors"}});
    std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let e = Checkpoint::open(&d).err().expect("must fail");
    assert!(matches!(e, Error::BadIndex { .. }), "{e}");
    assert!(e.to_string().contains("ghost"), "{e}");
}

#[test]
fn truncated_file_is_an_error_naming_it() {
    let d = tmpdir("trunc");
    let p = d.join("model.safetensors");
    write(&p, &sample());
    let bytes = std::fs::read(&p).unwrap();
    for residency in RESIDENCIES {
        std::fs::write(&p, &bytes[..bytes.len() - 5]).unwrap();
        let e = Checkpoint::open_with(&d, residency)
            .err()
            .expect("must fail");
        assert!(matches!(e, Error::BadSafetensors { .. }), "{e}");
        assert!(e.to_string().contains("model.safetensors"), "{e}");
        // Cut inside the header, and an empty file.
        std::fs::write(&p, &bytes[..20]).unwrap();
        assert!(matches!(
            Checkpoint::open_with(&d, residency),
            Err(Error::BadSafetensors { .. })
        ));
        std::fs::write(&p, b"").unwrap();
        assert!(matches!(
            Checkpoint::open_with(&d, residency),
            Err(Error::BadSafetensors { .. })
        ));
    }
}

#[test]
fn offsets_outside_the_file_are_an_error() {
    let d = tmpdir("offsets");
    let header = r#"{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,4000]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 16]);
    let p = d.join("model.safetensors");
    std::fs::write(&p, bytes).unwrap();
    let e = Checkpoint::open(&p).err().expect("must fail");
    assert!(matches!(e, Error::BadSafetensors { .. }), "{e}");
    // A header length pointing past the end of the file.
    let mut bytes = (1u64 << 20).to_le_bytes().to_vec();
    bytes.extend_from_slice(b"{}");
    std::fs::write(&p, bytes).unwrap();
    assert!(matches!(
        Checkpoint::open(&p),
        Err(Error::BadSafetensors { .. })
    ));
}

#[test]
fn wrong_shape_and_missing_tensor_name_the_tensor() {
    let d = tmpdir("shape");
    write(&d.join("model.safetensors"), &sample());
    let ck = Checkpoint::open(&d).unwrap();
    let e = ck.get("a.weight", &[3, 2]).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains("a.weight") && msg.contains("[3, 2]") && msg.contains("[2, 3]"),
        "{msg}"
    );
    let e = ck.get("nope", &[1]).unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }) && e.to_string().contains("nope"));
}

#[test]
fn missing_files_are_io_errors() {
    let d = tmpdir("missing");
    assert!(matches!(
        Checkpoint::open(&d.join("absent")),
        Err(Error::Io { .. })
    ));
    // A directory with no safetensors at all.
    let e = Checkpoint::open(&d).err().expect("must fail");
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains("model.safetensors"),
        "{e}"
    );
}
