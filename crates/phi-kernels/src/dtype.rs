//! Weight views: a slice of f32, bf16 or f16 values, widened to f32 by the kernels that read it.

use half::{bf16, f16};

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum DType {
    #[default]
    F32,
    BF16,
    F16,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
}

/// A borrowed weight tensor in its storage dtype, row-major.
#[derive(Copy, Clone, Debug)]
pub enum Weight<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> Weight<'a> {
    pub fn len(&self) -> usize {
        match self {
            Weight::F32(s) => s.len(),
            Weight::Bf16(s) => s.len(),
            Weight::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dtype(&self) -> DType {
        match self {
            Weight::F32(_) => DType::F32,
            Weight::Bf16(_) => DType::BF16,
            Weight::F16(_) => DType::F16,
        }
    }

    /// Elements `range` of the flat tensor, still in storage dtype.
    pub fn slice(&self, range: std::ops::Range<usize>) -> Weight<'a> {
        match *self {
            Weight::F32(s) => Weight::F32(&s[range]),
            Weight::Bf16(s) => Weight::Bf16(&s[range]),
            Weight::F16(s) => Weight::F16(&s[range]),
        }
    }

    /// Element `i` widened to f32.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Weight::F32(s) => s[i],
            Weight::Bf16(s) => s[i].to_f32(),
            Weight::F16(s) => s[i].to_f32(),
        }
    }

    /// Widens `self[start..start + out.len()]` into `out`.
    #[inline]
    pub fn widen_into(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Weight::F32(s) => out.copy_from_slice(&s[start..start + n]),
            Weight::Bf16(s) => {
                // bf16 is the top half of an f32: a shift, which the compiler vectorises.
                // `half`'s `to_f32` also quiets NaNs, and that loop took 69% of a 4.4k-key
                // decode attention over a bf16 cache (`timing attn` with KV=bf16: 15 ms per
                // layer, 8 ms with the shift). A NaN stays a NaN.
                for (o, v) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = f32::from_bits((v.to_bits() as u32) << 16);
                }
            }
            Weight::F16(s) => {
                for (o, v) in out.iter_mut().zip(&s[start..start + n]) {
                    *o = v.to_f32();
                }
            }
        }
    }

    /// The whole tensor widened to an owned f32 vector (for small tensors: norms, biases).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.len()];
        self.widen_into(0, &mut v);
        v
    }
}
