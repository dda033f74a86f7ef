//! `--dump FILE`: the pipeline's tensors in one safetensors file, named as the reference's,
//! so a run can be compared with PyTorch tensor by tensor.

use std::path::Path;

use safetensors::tensor::{Dtype, TensorView};

use crate::{Error, Generation, Prepared, Result};

/// Writes `input_ids`, `image_sizes`, `pixel_values`, `image_embeds`, `inputs_embeds`,
/// `logits`, `generated_ids` (image tensors only when there are images).
pub fn write(path: &Path, prepared: &Prepared, gen: &Generation, hidden: usize) -> Result<()> {
    let err = |msg: String| Error::Dump {
        path: path.to_path_buf(),
        msg,
    };
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let i64s = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();

    tensors.push((
        "input_ids".into(),
        Dtype::I64,
        vec![prepared.input_ids.len()],
        i64s(&prepared.input_ids),
    ));
    if !prepared.images.is_empty() {
        let n = prepared.images.len();
        let sizes: Vec<i64> = prepared
            .images
            .iter()
            .flat_map(|p| [p.image_size[0] as i64, p.image_size[1] as i64])
            .collect();
        tensors.push(("image_sizes".into(), Dtype::I64, vec![n, 2], i64s(&sizes)));
        let crops = prepared.images[0].num_crops + 1;
        if prepared.images.iter().any(|p| p.num_crops + 1 != crops) {
            return Err(err("images have different crop counts".into()));
        }
        let pixels: Vec<f32> = prepared
            .images
            .iter()
            .flat_map(|p| p.pixel_values.iter().copied())
            .collect();
        tensors.push((
            "pixel_values".into(),
            Dtype::F32,
            vec![n, crops, 3, 336, 336],
            f32s(&pixels),
        ));
        tensors.push((
            "image_embeds".into(),
            Dtype::F32,
            vec![gen.image_embeds.len() / hidden, hidden],
            f32s(&gen.image_embeds),
        ));
    }
    tensors.push((
        "inputs_embeds".into(),
        Dtype::F32,
        vec![gen.prompt_len, hidden],
        f32s(&gen.inputs_embeds),
    ));
    tensors.push((
        "logits".into(),
        Dtype::F32,
        vec![gen.prompt_logits.len()],
        f32s(&gen.prompt_logits),
    ));
    let ids: Vec<i64> = gen.ids.iter().map(|&i| i as i64).collect();
    tensors.push((
        "generated_ids".into(),
        Dtype::I64,
        vec![ids.len()],
        i64s(&ids),
    ));

    let views = tensors
        .iter()
        .map(|(name, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| err(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, path).map_err(|e| err(e.to_string()))
}
