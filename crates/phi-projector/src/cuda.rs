//! The image side after CLIP on a GPU (`cuda` feature): CLS drop, 2×2 merge, crop tiling and
//! `sub_GN` / `glb_GN` separators as one gather kernel over CLIP's output in place (the layout
//! comes from [`hd_token_sources`], tested against the CPU layout), then `img_projection`
//! (fc0 with GELU fused, fc2).

use half::bf16;
use phi_kernels::cpu::Activation;
use phi_kernels::cuda::{self, upload_f32_as_bf16, CudaSlice, Device, DeviceLinear};

use crate::hd_feature_transform::GRID;
use crate::{hd_token_sources, ImageProjector, Result};

/// CLIP tokens per crop (CLS + 24²).
const TOKENS: usize = GRID * GRID + 1;

pub struct ImageProjectorCuda {
    /// Row 0 `sub_GN`, row 1 `glb_GN`: `[2, 4c]`.
    separators: CudaSlice<bf16>,
    fc0: DeviceLinear,
    fc2: DeviceLinear,
    c: usize,
}

impl ImageProjectorCuda {
    pub fn upload(dev: &Device, p: &ImageProjector) -> Result<Self> {
        let mut seps = p.sub_gn.clone();
        seps.extend_from_slice(&p.glb_gn);
        Ok(ImageProjectorCuda {
            separators: upload_f32_as_bf16(dev, &seps)?,
            fc0: DeviceLinear::upload(dev, &p.img_projection.fc0)?,
            fc2: DeviceLinear::upload(dev, &p.img_projection.fc2)?,
            c: p.image_dim_out,
        })
    }

    /// `clip [N, 577, c]` on the device (each image's global view, then its `h_c × w_c`
    /// sub-crops, image after image, as `grids` lists them) → projected image features
    /// `[T, hidden]` in sequence order, on the device.
    pub fn forward_device(
        &self,
        dev: &Device,
        clip: &CudaSlice<bf16>,
        grids: &[(usize, usize)],
    ) -> Result<CudaSlice<bf16>> {
        let c = self.c;
        let mut src = Vec::new();
        let mut crop0 = 0;
        for &(h_c, w_c) in grids {
            src.extend(hd_token_sources(h_c, w_c, crop0)?);
            crop0 += 1 + h_c * w_c;
        }
        let t = src.len();
        // [T, 4c]: CLIP's output read in place, past the first CLS row, crops 577·c apart.
        let mut feats: CudaSlice<bf16> = dev.zeros(t * 4 * c)?;
        cuda::merge_2x2_bf16(
            dev,
            &clip.slice(c..),
            TOKENS * c,
            crop0,
            GRID,
            c,
            &self.separators,
            &src,
            &mut feats,
        )?;
        let (i, h) = (self.fc0.in_features, self.fc0.out_features);
        let mut mid: CudaSlice<bf16> = dev.zeros(t * h)?;
        self.fc0
            .forward(dev, &feats, i, &mut mid, h, t, false, Activation::GeluErf)?;
        let mut out: CudaSlice<bf16> = dev.zeros(t * h)?;
        self.fc2
            .forward(dev, &mid, h, &mut out, h, t, false, Activation::Identity)?;
        Ok(out)
    }
}
