//! The model on a GPU: the layer crates' `cuda` halves wired together (CLIP on every real crop
//! in one batch, merge + separators + projector on the device, decoder with a device KV cache).
//! Built with the `cuda` feature (on by default); without it [`GpuModel`] cannot be made and
//! `--device cuda` says why.
//!
//! Stage boundaries stay on the host as f32 (image features, prompt embeddings, logits), so
//! `--dump`, `--trace` and the CPU sampler work the same on both devices.

use phi_decoder::RopeFactors;

use crate::{Phi3V, Result};

/// Where the model runs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl DeviceKind {
    /// The default: CUDA when this binary has the `cuda` feature and a GPU answers, else CPU.
    pub fn detect() -> DeviceKind {
        #[cfg(feature = "cuda")]
        if phi_kernels::cuda::Device::new(0).is_ok() {
            return DeviceKind::Cuda;
        }
        DeviceKind::Cpu
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use super::*;
    use phi_clip::ClipVisionModelCuda;
    use phi_decoder::Logits;
    use phi_decoder::{KvCacheCuda, Phi3ModelCuda};
    use phi_kernels::cuda::Device;
    use phi_projector::ImageProjectorCuda;

    pub struct GpuModel {
        pub dev: Device,
        clip: ClipVisionModelCuda,
        projector: ImageProjectorCuda,
        decoder: Phi3ModelCuda,
    }

    pub struct GpuCache(KvCacheCuda);

    impl GpuCache {
        pub fn len(&self) -> usize {
            self.0.len()
        }

        pub fn is_empty(&self) -> bool {
            self.0.is_empty()
        }

        pub fn truncate(&mut self, len: usize) {
            self.0.truncate(len)
        }

        pub fn capacity(&self) -> usize {
            self.0.capacity()
        }
    }

    impl GpuModel {
        /// Opens GPU 0 and uploads every weight once in bf16, reporting progress on stderr.
        pub fn upload(model: &Phi3V) -> Result<Self> {
            let dev = Device::new(0)?;
            eprintln!(
                "uploading weights to {} ({})",
                dev.describe(),
                dev.image_kind()
            );
            let clip = ClipVisionModelCuda::upload(&dev, &model.clip)?;
            let projector = ImageProjectorCuda::upload(&dev, &model.projector)?;
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template("decoder upload [{bar:30}] {pos}/{len}")
                    .expect("a valid template"),
            );
            let decoder = Phi3ModelCuda::upload(&dev, &model.decoder, |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            })?;
            bar.finish_and_clear();
            dev.synchronize()?;
            Ok(GpuModel {
                dev,
                clip,
                projector,
                decoder,
            })
        }

        /// CLIP output `[n, 577, c]` (host f32) of `n` crops.
        pub fn clip_hidden(&self, crops: &[f32], n: usize) -> Result<Vec<f32>> {
            Ok(self.clip.forward(&self.dev, crops, n)?)
        }

        /// Projected image features `[T, hidden]` (host f32) of the real crops of images whose
        /// crop grids are `grids`, CLIP output never leaving the device.
        pub fn image_embeds(
            &self,
            crops: &[f32],
            n: usize,
            grids: &[(usize, usize)],
        ) -> Result<Vec<f32>> {
            let hidden = self.clip.forward_device(&self.dev, crops, n)?;
            let out = self.projector.forward_device(&self.dev, &hidden, grids)?;
            Ok(self
                .dev
                .download(&out)?
                .iter()
                .map(|v| v.to_f32())
                .collect())
        }

        pub fn new_cache(&self, capacity: usize) -> Result<GpuCache> {
            Ok(GpuCache(self.decoder.new_cache(&self.dev, capacity)?))
        }

        /// The prompt's embeddings `[t, hidden]` (host f32) through the decoder.
        pub fn prefill(
            &self,
            embeds: &[f32],
            cache: &mut GpuCache,
        ) -> Result<(Vec<f32>, RopeFactors)> {
            let xs = self.decoder.upload_embeds(&self.dev, embeds)?;
            Ok(self
                .decoder
                .forward(&self.dev, xs, &mut cache.0, Logits::Last)?)
        }

        /// Logits at every position of `embeds [t, hidden]` (host f32) run from an empty cache:
        /// `[t, vocab]`, for teacher-forced comparisons.
        pub fn logits_all(&self, embeds: &[f32]) -> Result<Vec<f32>> {
            let t = embeds.len() / self.decoder.hidden_size();
            let mut cache = self.new_cache(t)?;
            let xs = self.decoder.upload_embeds(&self.dev, embeds)?;
            Ok(self
                .decoder
                .forward(&self.dev, xs, &mut cache.0, Logits::All)?
                .0)
        }

        /// [`Self::step`] for greedy decoding: the next token is chosen on the device.
        pub fn step_greedy(&self, token: u32, cache: &mut GpuCache) -> Result<(u32, RopeFactors)> {
            let xs = self.decoder.embed(&self.dev, &[token as i64])?;
            Ok(self.decoder.forward_greedy(&self.dev, xs, &mut cache.0)?)
        }

        /// One generated token through the decoder (its embedding looked up on the device).
        pub fn step(&self, token: u32, cache: &mut GpuCache) -> Result<(Vec<f32>, RopeFactors)> {
            let xs = self.decoder.embed(&self.dev, &[token as i64])?;
            Ok(self
                .decoder
                .forward(&self.dev, xs, &mut cache.0, Logits::Last)?)
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    use super::*;
    use crate::Error;

    /// Uninhabited: this build has no GPU support.
    pub enum GpuModel {}

    pub enum GpuCache {}

    impl GpuCache {
        pub fn len(&self) -> usize {
            match *self {}
        }

        pub fn is_empty(&self) -> bool {
            match *self {}
        }

        pub fn truncate(&mut self, _: usize) {
            match *self {}
        }

        pub fn capacity(&self) -> usize {
            match *self {}
        }
    }

    impl GpuModel {
        pub fn upload(_model: &Phi3V) -> Result<Self> {
            Err(Error::Input(
                "--device cuda: this phi3v was built without the `cuda` feature".into(),
            ))
        }
        pub fn clip_hidden(&self, _: &[f32], _: usize) -> Result<Vec<f32>> {
            match *self {}
        }
        pub fn image_embeds(&self, _: &[f32], _: usize, _: &[(usize, usize)]) -> Result<Vec<f32>> {
            match *self {}
        }
        pub fn new_cache(&self, _: usize) -> Result<GpuCache> {
            match *self {}
        }
        pub fn prefill(&self, _: &[f32], _: &mut GpuCache) -> Result<(Vec<f32>, RopeFactors)> {
            match *self {}
        }
        pub fn step(&self, _: u32, _: &mut GpuCache) -> Result<(Vec<f32>, RopeFactors)> {
            match *self {}
        }
        pub fn step_greedy(&self, _: u32, _: &mut GpuCache) -> Result<(u32, RopeFactors)> {
            match *self {}
        }
        pub fn logits_all(&self, _: &[f32]) -> Result<Vec<f32>> {
            match *self {}
        }
    }
}

pub use imp::{GpuCache, GpuModel};
