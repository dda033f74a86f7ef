//! LongRoPE as in `Phi3SuScaledRotaryEmbedding` (transformers 4.40 / the Phi-3-vision remote
//! code). Per forward call, with `seq_len = max(position) + 1`:
//!
//! ```text
//! ext      = long_factor if seq_len > original_max_position_embeddings else short_factor
//! inv_freq = 1 / (ext[k] · base^(2k/d))                      f32, k = 0..d/2
//! emb      = cat(pos · inv_freq, pos · inv_freq)             f32, [T, d]
//! cos, sin = cos(emb) · mscale, sin(emb) · mscale
//! mscale   = sqrt(1 + ln(max_pos / orig) / ln(orig))         (1 when max_pos <= orig)
//! ```
//!
//! The choice is made per call and never revisited: once a decode step crosses the threshold,
//! new keys get long factors while cached keys keep the short ones (the Phi-3-vision remote
//! code does not re-prefill; Phi-3.5-vision's does, which this engine does not copy).

use crate::Phi3Config;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeFactors {
    /// No scaling configured: plain RoPE.
    None,
    Short,
    Long,
}

#[derive(Debug, Clone)]
pub struct RotaryEmbedding {
    head_dim: usize,
    base: f32,
    short_factor: Vec<f32>,
    long_factor: Vec<f32>,
    original_max: Option<usize>,
    mscale: f32,
}

impl RotaryEmbedding {
    pub fn new(cfg: &Phi3Config) -> Self {
        let (short_factor, long_factor, mscale) = match &cfg.rope_scaling {
            Some(rs) => {
                let orig = cfg
                    .original_max_position_embeddings
                    .unwrap_or(cfg.max_position_embeddings) as f64;
                let scale = cfg.max_position_embeddings as f64 / orig;
                let mscale = if scale <= 1.0 {
                    1.0
                } else {
                    (1.0 + scale.ln() / orig.ln()).sqrt()
                };
                (
                    rs.short_factor.iter().map(|&v| v as f32).collect(),
                    rs.long_factor.iter().map(|&v| v as f32).collect(),
                    mscale as f32,
                )
            }
            None => (vec![], vec![], 1.0),
        };
        RotaryEmbedding {
            head_dim: cfg.head_dim(),
            base: cfg.rope_theta as f32,
            short_factor,
            long_factor,
            original_max: cfg
                .rope_scaling
                .as_ref()
                .and(cfg.original_max_position_embeddings),
            mscale,
        }
    }

    pub fn mscale(&self) -> f32 {
        self.mscale
    }

    /// Which factor set a forward call covering positions up to `max_pos` uses.
    pub fn factors_for(&self, max_pos: usize) -> RopeFactors {
        match self.original_max {
            None => RopeFactors::None,
            Some(orig) if max_pos + 1 > orig => RopeFactors::Long,
            Some(_) => RopeFactors::Short,
        }
    }

    /// `(cos, sin)`, each `[positions.len(), head_dim]`, for one forward call.
    pub fn cos_sin(&self, positions: std::ops::Range<usize>) -> (Vec<f32>, Vec<f32>, RopeFactors) {
        let d = self.head_dim;
        let half = d / 2;
        let factors = self.factors_for(positions.end.saturating_sub(1));
        let ext: Vec<f32> = match factors {
            RopeFactors::None => vec![1.0; half],
            RopeFactors::Short => self.short_factor.clone(),
            RopeFactors::Long => self.long_factor.clone(),
        };
        // Same f32 operations as the reference: arange(0, d, 2).float() / d, base ** that,
        // times ext, reciprocal.
        let inv_freq: Vec<f32> = (0..half)
            .map(|k| {
                let expo = (2 * k) as f32 / d as f32;
                1.0f32 / (ext[k] * self.base.powf(expo))
            })
            .collect();
        let n = positions.len();
        let mut cos = vec![0f32; n * d];
        let mut sin = vec![0f32; n * d];
        for (r, pos) in positions.enumerate() {
            for k in 0..half {
                let f = pos as f32 * inv_freq[k];
                // f64 evaluation rounds once: within an ulp of torch's f32 cos/sin.
                let (s, c) = (f as f64).sin_cos();
                let (c, s) = (c as f32 * self.mscale, s as f32 * self.mscale);
                cos[r * d + k] = c;
                cos[r * d + k + half] = c;
                sin[r * d + k] = s;
                sin[r * d + k + half] = s;
            }
        }
        (cos, sin, factors)
    }
}
