//! phi-clip on its own: load the vision tower straight from a Phi-3-vision model directory and
//! reproduce transformers' `CLIPVisionModel` `hidden_states[-2]` (golden from the fixtures).

use std::path::Path;

use phi_clip::ClipVisionModel;
use safetensors::SafeTensors;

fn f32s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    let t = st.tensor(name).unwrap();
    (
        t.shape().to_vec(),
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
    )
}

#[test]
fn hidden_states_of_the_global_view_match_transformers() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let clip = ClipVisionModel::from_model_dir(&fixtures.join("tiny-phi3v")).unwrap();
    // The tiny tower has 3 layers; hidden_states[-2] needs the first 2.
    assert_eq!(clip.layers.len(), clip.cfg.num_hidden_layers - 1);

    let bytes = std::fs::read(fixtures.join("golden/landscape_nc4/tensors.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (_, global) = f32s(&st, "global_view_0");
    let (shape, golden) = f32s(&st, "clip_hidden");
    let (t, c) = clip.output_dims();
    assert_eq!(&shape[1..], &[t, c]);

    let ours = clip.forward(&global, 1).unwrap();
    let reference = &golden[..t * c];
    let num: f64 = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum();
    let den: f64 = reference.iter().map(|b| (*b as f64).powi(2)).sum();
    let rel = (num / den).sqrt();
    assert!(rel < 1e-4, "relative L2 {rel}");
}

#[test]
fn wrong_pixel_count_is_an_error() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    let clip = ClipVisionModel::from_model_dir(&fixtures.join("tiny-phi3v")).unwrap();
    let e = clip.forward(&[0.0; 10], 1).unwrap_err().to_string();
    assert!(e.contains("pixel values"), "{e}");
}
