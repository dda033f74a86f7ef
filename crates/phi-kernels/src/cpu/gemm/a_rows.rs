//! The A operand of a GEMM: a plain matrix, or rows that are produced while they are packed.
//!
//! The blocked GEMM reads A once, to pack it into `MR`-row micro-panels. When A is the output of
//! a row-wise op (LayerNorm, RMSNorm, or the 2×2 merge with its separator rows), that op can run
//! inside the packing: each micro-panel's rows are produced into a per-thread staging buffer
//! (at most `MR·k` floats, which stays in L2) and packed from there. The matrix A stands for is
//! never written out whole, which saves writing it and reading it back: 40 MB each way per
//! LayerNorm in CLIP over 17 crops, and for the projector the merged tokens (41 MB) plus the two
//! copies that built the grid with its separators.
//!
//! The staged rows are computed by the same ISA kernel as the unfused op, row by row, so a
//! fused GEMM gives the unfused results bit for bit.

use crate::cpu::layer_norm::{layer_norm_ref, layer_norm_seq};
use crate::cpu::rms_norm::{rms_norm_ref, rms_norm_seq};
use crate::Isa;

/// Where the `m` rows (`k` values each) of a GEMM's A operand come from.
#[derive(Copy, Clone, Debug)]
pub enum ARows<'a> {
    /// Row `i` is `a[i·lda .. i·lda + k]`.
    Dense { a: &'a [f32], lda: usize },
    /// Row `i` is `LayerNorm(x[i·k .. (i+1)·k])`, as [`crate::cpu::layer_norm`] computes it.
    LayerNorm {
        x: &'a [f32],
        weight: &'a [f32],
        bias: &'a [f32],
        eps: f32,
    },
    /// Row `i` is `RMSNorm(x[i·k .. (i+1)·k])`, as [`crate::cpu::rms_norm`] computes it.
    RmsNorm {
        x: &'a [f32],
        weight: &'a [f32],
        eps: f32,
    },
    /// Tokens of the 2×2 merge picked by a table, with literal rows among them.
    Merged(&'a MergedRows<'a>),
}

/// Tokens of the 2×2 merge (see [`crate::cpu::merge_2x2`]) of several `g×g` grids of `c`-wide
/// patch vectors, in the order a table gives, with literal `4c`-wide rows among them (the
/// separators of Phi-3-vision's image layout). `k = 4c`.
#[derive(Copy, Clone, Debug)]
pub struct MergedRows<'a> {
    /// The grids: patch `(y, x)` of grid `b` starts at `b·grid_stride + first + (y·g + x)·c`.
    pub feat: &'a [f32],
    pub grid_stride: usize,
    /// Values before each grid's first patch (CLIP's CLS row, which the merge skips).
    pub first: usize,
    /// Patches per side of a grid (even).
    pub g: usize,
    /// Channels per patch.
    pub c: usize,
    /// Row `i` of A: `s = sources[i] >= 0` is merged token `s` (grid `s / (g/2)²`, then
    /// row-major over its `(g/2)×(g/2)` tokens); `s < 0` is `literals[-1 - s]`.
    pub sources: &'a [i32],
    pub literals: &'a [&'a [f32]],
}

impl MergedRows<'_> {
    /// The two `2c`-long runs of merged token `s`: patches `(2i, 2j), (2i, 2j+1)` and
    /// `(2i+1, 2j), (2i+1, 2j+1)` lie side by side in their grid rows.
    fn runs(&self, s: usize) -> [&[f32]; 2] {
        let h = self.g / 2;
        let (b, p) = (s / (h * h), s % (h * h));
        let (i, j) = (p / h, p % h);
        std::array::from_fn(|dy| {
            let at = b * self.grid_stride + self.first + ((2 * i + dy) * self.g + 2 * j) * self.c;
            &self.feat[at..at + 2 * self.c]
        })
    }

    /// Row `i` into `out` (`4c` values).
    fn row_into(&self, i: usize, out: &mut [f32]) {
        let c2 = 2 * self.c;
        match self.sources[i] {
            s if s >= 0 => {
                let [r0, r1] = self.runs(s as usize);
                out[..c2].copy_from_slice(r0);
                out[c2..2 * c2].copy_from_slice(r1);
            }
            s => out.copy_from_slice(self.literals[(-1 - s) as usize]),
        }
    }

    fn check(&self, m: usize, k: usize) {
        let (g, c) = (self.g, self.c);
        assert!(g > 0 && g.is_multiple_of(2), "merged rows: grid {g} is odd");
        assert_eq!(k, 4 * c, "merged rows: k = {k} must be 4·c = {}", 4 * c);
        assert!(
            self.sources.len() >= m,
            "merged rows: {} sources for {m} rows",
            self.sources.len()
        );
        for l in self.literals {
            assert_eq!(l.len(), k, "merged rows: a literal row is not {k} wide");
        }
        let per_grid = (g / 2) * (g / 2);
        let grids = if self.feat.len() < self.first + g * g * c {
            0
        } else {
            (self.feat.len() - self.first - g * g * c) / self.grid_stride.max(1) + 1
        };
        for (i, &s) in self.sources[..m].iter().enumerate() {
            if s >= 0 {
                assert!(
                    (s as usize) < grids * per_grid,
                    "merged rows: row {i} is token {s}, but feat holds {grids} grids of {per_grid}"
                );
            } else {
                assert!(
                    ((-1 - s) as usize) < self.literals.len(),
                    "merged rows: row {i} names literal {}, of {}",
                    -1 - s,
                    self.literals.len()
                );
            }
        }
    }
}

impl<'a> ARows<'a> {
    /// `a [m, lda]` row-major.
    pub fn dense(a: &'a [f32], lda: usize) -> Self {
        ARows::Dense { a, lda }
    }

    /// The matrix itself, if A is one.
    pub(crate) fn as_dense(&self) -> Option<(&'a [f32], usize)> {
        match *self {
            ARows::Dense { a, lda } => Some((a, lda)),
            _ => None,
        }
    }

    /// Panics, naming what is wrong, unless the source holds `m` rows of `k` values.
    pub(crate) fn check(&self, m: usize, k: usize) {
        if m == 0 {
            return;
        }
        let norm = |what: &str, x: &[f32], params: &[&[f32]]| {
            assert!(
                x.len() >= m * k,
                "gemm: {what} input has {} elements, needs [{m}, {k}]",
                x.len()
            );
            for p in params {
                assert!(p.len() >= k, "gemm: {what} parameters shorter than {k}");
            }
        };
        match self {
            ARows::Dense { a, lda } => {
                assert!(*lda >= k, "gemm: lda {lda} < k {k}");
                assert!(
                    a.len() >= (m - 1) * lda + k,
                    "gemm: A has {} elements, needs {}",
                    a.len(),
                    (m - 1) * lda + k
                );
            }
            ARows::LayerNorm {
                x, weight, bias, ..
            } => norm("LayerNorm", x, &[weight, bias]),
            ARows::RmsNorm { x, weight, .. } => norm("RMSNorm", x, &[weight]),
            ARows::Merged(r) => r.check(m, k),
        }
    }

    /// Rows `i0..i0 + rows` into `out [rows, k]`, computed on `isa` (on the calling thread).
    pub(crate) fn fill(&self, isa: Isa, i0: usize, rows: usize, k: usize, out: &mut [f32]) {
        let out = &mut out[..rows * k];
        match *self {
            ARows::Dense { a, lda } => {
                for (r, o) in out.chunks_exact_mut(k).enumerate() {
                    o.copy_from_slice(&a[(i0 + r) * lda..(i0 + r) * lda + k]);
                }
            }
            ARows::LayerNorm {
                x,
                weight,
                bias,
                eps,
            } => {
                let x = &x[i0 * k..(i0 + rows) * k];
                layer_norm_seq(isa, x, weight, bias, eps, out, rows, k)
            }
            ARows::RmsNorm { x, weight, eps } => {
                rms_norm_seq(isa, &x[i0 * k..(i0 + rows) * k], weight, eps, out, rows, k)
            }
            ARows::Merged(mr) => {
                for (r, o) in out.chunks_exact_mut(k).enumerate() {
                    mr.row_into(i0 + r, o);
                }
            }
        }
    }

    /// The whole `[m, k]` matrix by the `_ref` twins of the row ops: the oracle's A.
    pub fn to_matrix_ref(&self, m: usize, k: usize) -> Vec<f32> {
        self.check(m, k);
        let mut out = vec![0f32; m * k];
        match *self {
            ARows::LayerNorm {
                x,
                weight,
                bias,
                eps,
            } => layer_norm_ref(&x[..m * k], weight, bias, eps, &mut out, m, k),
            ARows::RmsNorm { x, weight, eps } => {
                rms_norm_ref(&x[..m * k], weight, eps, &mut out, m, k)
            }
            // Copies: the same in any implementation.
            ARows::Dense { .. } | ARows::Merged(_) => self.fill(Isa::Scalar, 0, m, k, &mut out),
        }
        out
    }
}
