//! Device copies of the parameter holders of [`crate::nn`] (Linear, LayerNorm, RmsNorm), so a
//! model crate uploads what it loaded and calls the same layer with device buffers. Weights go
//! up once in bf16 (bf16 checkpoints straight from the memory map; others rounded on the way),
//! biases in f32 (the GEMM epilogue adds them in f32).

use half::bf16;

use super::{gemm_bf16, layer_norm_bf16, rms_norm_bf16, CudaSlice, Device, DevicePtr, Epilogue};
use crate::cpu::Activation;
use crate::{LayerNorm, Linear, Result, RmsNorm, Weight};

/// `w` as bf16 on the device.
pub fn upload_weight(dev: &Device, w: Weight<'_>) -> Result<CudaSlice<bf16>> {
    match w {
        Weight::Bf16(s) => dev.upload(s),
        other => {
            let v: Vec<bf16> = (0..other.len())
                .map(|i| bf16::from_f32(other.get(i)))
                .collect();
            dev.upload(&v)
        }
    }
}

/// f32 values as bf16 on the device.
pub fn upload_f32_as_bf16(dev: &Device, xs: &[f32]) -> Result<CudaSlice<bf16>> {
    let v: Vec<bf16> = xs.iter().map(|&x| bf16::from_f32(x)).collect();
    dev.upload(&v)
}

pub struct DeviceLinear {
    /// `[out, in]` bf16.
    pub weight: CudaSlice<bf16>,
    pub bias: Option<CudaSlice<f32>>,
    pub in_features: usize,
    pub out_features: usize,
}

impl DeviceLinear {
    pub fn upload(dev: &Device, l: &Linear) -> Result<Self> {
        Ok(DeviceLinear {
            weight: upload_weight(dev, l.weight.view())?,
            bias: l.bias.as_deref().map(|b| dev.upload(b)).transpose()?,
            in_features: l.in_features,
            out_features: l.out_features,
        })
    }

    /// Several Linear layers with the same input stacked into one (`[Σ out, in]`), as CLIP's
    /// q/k/v projections become one GEMM whose output is the fused QKV buffer.
    pub fn upload_stacked(dev: &Device, parts: &[&Linear]) -> Result<Self> {
        let in_f = parts[0].in_features;
        let mut w: Vec<bf16> = Vec::new();
        let mut b: Vec<f32> = Vec::new();
        for l in parts {
            assert_eq!(
                l.in_features, in_f,
                "stacked Linear layers share their input"
            );
            let v = l.weight.view();
            w.extend((0..v.len()).map(|i| bf16::from_f32(v.get(i))));
            match &l.bias {
                Some(bias) => b.extend_from_slice(bias),
                None => b.extend(std::iter::repeat_n(0.0, l.out_features)),
            }
        }
        let has_bias = parts.iter().any(|l| l.bias.is_some());
        Ok(DeviceLinear {
            weight: dev.upload(&w)?,
            bias: if has_bias {
                Some(dev.upload(&b)?)
            } else {
                None
            },
            in_features: in_f,
            out_features: parts.iter().map(|l| l.out_features).sum(),
        })
    }

    /// `out[rows, out] (+)= act(xs[rows, in] · Wᵀ + b)`, rows `ld_x` / `ld_out` apart.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        dev: &Device,
        xs: &impl DevicePtr<bf16>,
        ld_x: usize,
        out: &mut impl DevicePtr<bf16>,
        ld_out: usize,
        rows: usize,
        accumulate: bool,
        activation: Activation,
    ) -> Result<()> {
        let ep = Epilogue {
            bias: self.bias.as_ref().map(|b| b as &dyn DevicePtr<f32>),
            activation,
            residual: None,
        };
        gemm_bf16(
            dev,
            xs,
            ld_x,
            &self.weight,
            out,
            ld_out,
            rows,
            self.out_features,
            self.in_features,
            accumulate,
            &ep,
        )
    }
}

pub struct DeviceLayerNorm {
    pub weight: CudaSlice<bf16>,
    pub bias: CudaSlice<bf16>,
    pub eps: f32,
}

impl DeviceLayerNorm {
    pub fn upload(dev: &Device, ln: &LayerNorm) -> Result<Self> {
        Ok(DeviceLayerNorm {
            weight: upload_f32_as_bf16(dev, &ln.weight)?,
            bias: upload_f32_as_bf16(dev, &ln.bias)?,
            eps: ln.eps,
        })
    }

    pub fn forward(
        &self,
        dev: &Device,
        xs: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtr<bf16>,
        rows: usize,
    ) -> Result<()> {
        let w = self.weight.len();
        layer_norm_bf16(dev, xs, &self.weight, &self.bias, out, rows, w, w, self.eps)
    }
}

pub struct DeviceRmsNorm {
    pub weight: CudaSlice<bf16>,
    pub eps: f32,
}

impl DeviceRmsNorm {
    pub fn upload(dev: &Device, n: &RmsNorm) -> Result<Self> {
        Ok(DeviceRmsNorm {
            weight: upload_f32_as_bf16(dev, &n.weight)?,
            eps: n.eps,
        })
    }

    pub fn forward(
        &self,
        dev: &Device,
        xs: &impl DevicePtr<bf16>,
        out: &mut impl DevicePtr<bf16>,
        rows: usize,
    ) -> Result<()> {
        let w = self.weight.len();
        rms_norm_bf16(dev, xs, &self.weight, out, rows, w, w, self.eps)
    }
}
