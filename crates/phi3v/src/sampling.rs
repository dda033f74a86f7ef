//! Next-token choice: greedy (temperature 0) or sampling with temperature, top-k and top-p,
//! applied in that order as transformers' logits warpers do, from a seeded generator.

/// SplitMix64: tiny, seedable, good enough to draw one uniform number per token.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0 disables.
    pub top_k: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(format!(
                "--temperature must be a finite number >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("--top-p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// Index of the largest logit (the first on ties, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best
}

/// Largest minus second-largest logit: how decisive a greedy choice was.
pub fn top2_margin(logits: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in logits {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Sampler { params, rng }
    }

    /// The next token. The rule (what [`sample_ref`] spells out with a full sort): order the
    /// logits descending (ties by index), keep the `top_k` best, softmax at `temperature` over
    /// them, keep the shortest prefix holding `top_p` of the mass, and walk it with one uniform
    /// draw. Only the prefix the walk reaches is ever sorted: on a real model's peaked
    /// distribution that is a few dozen of the 32064 candidates, which keeps sampling far
    /// below a decode step even on a GPU.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        let u = self.rng.next_f64();
        sample_with(logits, p, u) as u32
    }
}

/// Rows of `idx` sorted into place per step of the walk: small first, since most draws end in
/// the first few candidates.
const FIRST_CHUNK: usize = 64;

fn sample_with(logits: &[f32], p: &SamplingParams, u: f64) -> usize {
    let inv_t = 1.0 / p.temperature as f64;
    let scaled = |i: usize| logits[i] as f64 * inv_t;
    let desc = |a: &usize, b: &usize| scaled(*b).total_cmp(&scaled(*a)).then(a.cmp(b));
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    if p.top_k > 0 && p.top_k < idx.len() {
        idx.select_nth_unstable_by(p.top_k - 1, desc);
        idx.truncate(p.top_k);
    }
    let max = idx
        .iter()
        .map(|&i| scaled(i))
        .fold(f64::NEG_INFINITY, f64::max);
    let total: f64 = idx.iter().map(|&i| (scaled(i) - max).exp()).sum();
    // Sorted so far: idx[..sorted]. Sorts the next chunk of the remaining candidates.
    let mut sorted = 0;
    let grow = |idx: &mut Vec<usize>, sorted: &mut usize| {
        let rest = &mut idx[*sorted..];
        let c = (2 * *sorted).max(FIRST_CHUNK).min(rest.len());
        if c < rest.len() {
            rest.select_nth_unstable_by(c - 1, desc);
        }
        rest[..c].sort_unstable_by(desc);
        *sorted += c;
    };
    // top_p: the mass of the shortest prefix reaching it (the nucleus).
    let mut kept_mass = 1.0;
    let mut kept = idx.len();
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut i = 0;
        loop {
            if i == sorted {
                grow(&mut idx, &mut sorted);
            }
            acc += (scaled(idx[i]) - max).exp() / total;
            i += 1;
            if acc >= p.top_p as f64 || i == idx.len() {
                break;
            }
        }
        kept = i;
        kept_mass = acc;
    }
    // The draw: the first candidate whose cumulative (renormalised) mass exceeds u.
    let mut acc = 0.0;
    for i in 0..kept {
        if i == sorted {
            grow(&mut idx, &mut sorted);
        }
        acc += (scaled(idx[i]) - max).exp() / total / kept_mass;
        if u < acc {
            return idx[i];
        }
    }
    // Rounding left the sum just under u: the last kept candidate.
    while sorted < kept {
        grow(&mut idx, &mut sorted);
    }
    idx[kept - 1]
}

/// The plain twin of [`Sampler::sample`]'s rule: a full sort, then the same walk.
pub fn sample_ref(logits: &[f32], p: &SamplingParams, u: f64) -> usize {
    let mut cand: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &v)| (i, v as f64 / p.temperature as f64))
        .collect();
    cand.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
    if p.top_k > 0 && p.top_k < cand.len() {
        cand.truncate(p.top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand.iter().map(|c| (c.1 - max).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|q| *q /= total);
    if p.top_p < 1.0 {
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, q) in probs.iter().enumerate() {
            acc += q;
            if acc >= p.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
    }
    let mut acc = 0.0;
    for (i, q) in probs.iter().enumerate() {
        acc += q;
        if u < acc {
            return cand[i].0;
        }
    }
    cand[probs.len() - 1].0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_first_on_ties() {
        let mut s = Sampler::new(SamplingParams::default());
        assert_eq!(s.sample(&[0.0, 3.0, 3.0, 1.0]), 1);
    }

    #[test]
    fn top_k_one_is_greedy_at_any_temperature() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 5.0,
            top_k: 1,
            ..Default::default()
        });
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.1, 0.2, 2.0, -1.0]), 2);
        }
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Softmax of [10, 9, 0, 0]: the first two hold > 99.9% of the mass.
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            seed: 7,
            ..Default::default()
        });
        for _ in 0..200 {
            assert!(s.sample(&[10.0, 9.0, 0.0, 0.0]) < 2);
        }
    }

    #[test]
    fn same_seed_same_draws() {
        let params = SamplingParams {
            temperature: 1.0,
            seed: 42,
            ..Default::default()
        };
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = {
            let mut s = Sampler::new(params.clone());
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(params);
            (0..20).map(|_| s.sample(&logits)).collect()
        };
        assert_eq!(a, b);
        assert!(
            a.iter().any(|&x| x != a[0]),
            "sampling at temperature 1 should vary"
        );
    }

    #[test]
    fn margin() {
        assert_eq!(top2_margin(&[1.0, 4.0, 2.5]), 1.5);
    }

    #[test]
    fn partial_sort_walk_picks_what_the_full_sort_picks() {
        let mut rng = Rng::new(11);
        for case in 0..300 {
            let n = [5usize, 70, 300, 5000][case % 4];
            // Peaked and flat distributions, with ties.
            let spread = [0.5f64, 4.0, 20.0][case % 3];
            let logits: Vec<f32> = (0..n)
                .map(|_| ((rng.next_f64() * spread * 4.0).round() / 4.0) as f32)
                .collect();
            let p = SamplingParams {
                temperature: [0.3f32, 1.0, 1.7][case % 3],
                top_p: [1.0f32, 0.9, 0.5, 0.05][case % 4 / 2 + case % 2],
                top_k: [0usize, 1, 40, n + 3][case % 4],
                seed: 0,
            };
            for _ in 0..20 {
                let u = rng.next_f64();
                assert_eq!(
                    sample_with(&logits, &p, u),
                    sample_ref(&logits, &p, u),
                    "case {case}: n {n}, {p:?}, u {u}"
                );
            }
        }
    }
}
