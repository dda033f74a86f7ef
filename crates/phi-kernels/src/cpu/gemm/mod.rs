//! GEMM with the weight transposed, as `nn.Linear` stores it:
//! `C[m×n] (+)= A[m×k] · B[n×k]ᵀ (+ bias[n])`.
//!
//! A and C are f32 row-major with leading dimensions `lda`/`ldc` (so column slices of a fused
//! buffer work without copies). B is a [`Weight`] in f32, bf16 or f16, `[n, k]` row-major and
//! contiguous; it is widened to f32 while packing. Accumulation is f32. [`GemmOpts`] adds the
//! epilogue (bias, activation or residual accumulate, applied per tile while it is hot) and the
//! precision of the products (f32, or bf16 as in `torch.matmul` on bf16 tensors).
//!
//! Algorithm (BLIS / matrixmultiply five-loop nest, see [`gemm_blocked`]): A is packed once into
//! `MR`-row micro-panels, B is widened and packed per `KC×NC` block into `NR`-column
//! micro-panels, and a register-blocked microkernel computes one `MR×NR` tile of C over `KC`.
//! Each ISA module supplies the microkernel, the B packer and a GEMV for `m <= 4` (decode),
//! where packing would cost more than it saves: there each B row is streamed once. AVX2 with
//! bf16 weights also takes up to 32 rows of A that way (short prompts, decode batches of more
//! than four), blocked as a GEMM whose B is never packed ([`Microkernel::gemv_max_m`]).
//!
//! | kernel        | products | MR×NR | accumulators | k per step       |
//! |---------------|----------|-------|--------------|------------------|
//! | amx           | bf16     | 32×32 | 4 tiles      | 32 (`tdpbf16ps`) |
//! | avx512_bf16   | bf16     | 14×32 | 28 zmm       | 2 (`vdpbf16ps`)  |
//! | avx512        | f32      | 14×32 | 28 zmm       | 1                |
//! | avx2          | f32      | 6×16  | 12 ymm       | 1                |
//! | scalar        | f32      | 4×4   | 16 f32       | 1                |
//!
//! bf16 products take the first of amx, avx512_bf16 that the CPU has and that agrees with its
//! scalar twin (`amx::AmxEmu`, `bf16_pairs::PairsEmu`: same packing, same per-element
//! semantics, tested on every CPU) in a check run once per process; otherwise the f32 kernels
//! multiply the bf16-rounded values, which gives the same numbers at f32 speed.
//!
//! Measured on the dev VM (Skylake-SP, 2 cores, shared with a neighbour whose load comes and
//! goes within seconds). `timing ratio` divides each GEMM's rate by the FMA peak probed just
//! before and after it and keeps the rounds where the probe was undisturbed; on 2026-11-26:
//! - the microkernel alone ([`microkernel_probe`]) reaches 89.6% of the peak with its B panel in
//!   L1 and 83% with 16 panels in L2; the whole one-thread GEMM reached 65-67% with KC = 256,
//!   NC = 512, and 70-78% with the KC = 1024, NC = 128 below (two threads: 56-67% against
//!   68-74% of twice the peak).
//! - with KC = 1024, skipping the C stores (wrong results, timing only) gained 5-7 points and
//!   skipping the B packing 6-8; both together reached 81-90%. What is lost lies around the
//!   kernel, not in its issue rate.
//! - tried and dropped, each within 2 points of the plain code in paired rounds: software
//!   prefetch of B panels in the kernel, prefetching each C tile (prefetchw into L1 or into
//!   L2) at kernel entry, prefetching B rows while packing, padding ldc against 4 KiB
//!   aliasing, non-temporal C stores.
//!
//! - on 2026-11-27, in a quiet hour, `cargo xtask bench --compare torch`: one thread 68-78% of
//!   the peak at the CLIP shapes; two threads 68-78% at the CLIP and 757-token prefill shapes,
//!   0.91-1.07x torch's time. The deep-k shapes (k = 4096, 8192: four and eight passes over C)
//!   are the slowest rows.
//! - with bf16 weights read from DRAM (`timing cold`), the B packing is the price of a short
//!   prompt: 17×9216×3072 spends about as long packing as multiplying.
//!
//! AMX and AVX512-BF16 never ran here (the VM has neither).
//!
//! On an AVX2 Zen 3 VM (2 cores, 512 KiB L2 each, 2026-12-05), `cargo xtask bench --compare
//! torch` after the AVX2 B packer went to 8×8 transposes: one thread 82-85% of the FMA peak at
//! the CLIP shapes, two threads 78-86% at the CLIP, projector and 757-token prefill shapes,
//! 0.70-0.98x torch's f32 time. KC = 512 and 256 measured no better there than 1024 (best of
//! 12 calls, one and two threads, two rounds), nor did the k-slice order for packed A up to 24
//! MiB (`A_IN_CACHE_BYTES`) in the 32 MiB L3.
//!
//! The AVX2 bf16 GEMV on the same VM (2026-12-05, `cargo xtask bench decode`, 2 threads, bf16
//! weights rotating over 1.25 GiB, each row against the DRAM read probed just before and after
//! it, 34.8-35.9 GB/s): one row of A 100-102%, two rows 100.5%, three 91.4%, four 85-88%; 8
//! rows 54.7% of the 223.6 GFLOP/s FMA peak, 16 rows 62% (in the full bench beside it). The
//! probe reads the way the GEMV does (8 long streams, 512 bytes prefetched ahead), so 100% is
//! the two reading alike, within the host's noise. Read from DRAM the same way (`timing
//! cold`), the blocked GEMM that packs B had run 8×9216×3072 at 64-74 GFLOP/s and 16 rows at
//! 110, against 106-116 and 118-135 with the wide GEMV (see `avx2::WIDE_MAX_M`).
//!
//! Fusions ([`gemm_fused`]): A may be made while it is packed ([`ARows`]: LayerNorm, RMSNorm, or
//! the 2×2 merge with literal separator rows), and a `[gate; up]` GEMM may apply SwiGLU to each
//! finished block pair. Either gives the unfused passes' results bit for bit. Paired rounds on an
//! AVX2 Zen 3 VM (`timing fused`, 2 threads, 2026-12-05): LayerNorm into CLIP's q/k/v (each of
//! the three redoes it) 0.99x the separate passes' time, into fc1 1.01x, into a 757-row qkv
//! 0.99x; the merge into the projector 0.97-1.0x; SwiGLU 1.02-1.05x, so the decoder keeps
//! `silu_mul` as a pass. The norms' fusion also drops their `[rows, k]` output buffers.

mod a_rows;
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod avx512_bf16;
mod bf16_pairs;
mod scalar;

use std::cell::RefCell;
use std::thread::LocalKey;

use rayon::prelude::*;

use half::bf16;

use super::activation::Activation;
use super::{check_isa, dispatch, SendPtr};
use crate::{isa, DType, HugeBuf, Isa, Weight};

pub use a_rows::{ARows, MergedRows};

/// Depth of one packed block. Each KC slice costs a pass over C (its tiles are loaded, added
/// to and stored again), so deep slices pay: at KC = 1024 CLIP's qkv, out and fc1 (k = 1024)
/// write C once and k = 4096 takes four passes instead of sixteen. The A micro-panel (56 KiB)
/// then streams from L2 like the B panel (at 14 KiB it was evicted by each 32 KiB B panel
/// anyway).
pub(crate) const KC: usize = 1024;
/// The widest packed B block: 1024×128 f32 = 512 KiB, half of a Skylake-SP L2. Narrow blocks
/// also give two threads eight or more tasks at n = 1024. See [`nc`].
pub(crate) const NC: usize = 128;

/// Width of one packed B block on this machine: [`NC`], or 64 where the core's L2 is under
/// 1 MiB, so the block (`KC·nc` f32) stays half of it. On a Zen 3 VM (512 KiB L2), where the
/// 128-wide block filled the whole L2, 64 columns ran the CLIP GEMMs at 87.1-89.5 GFLOP/s one
/// thread (577×1024×4096) against 85.0-87.1, and 84.1-87.3 against 78.8-83.7 (577×4096×1024),
/// two threads 1-3% faster, best of 12 calls in four alternating runs; 32 columns measured the
/// same as 64. Wider blocks for bigger L2s (2 MiB on Sapphire Rapids) were never measured, so
/// the width stops at 128. `PHI_KERNELS_NC` (64 or 128) overrides it, for tuning.
pub(crate) fn nc() -> usize {
    use std::sync::OnceLock;
    static WIDTH: OnceLock<usize> = OnceLock::new();
    *WIDTH.get_or_init(|| {
        if let Ok(v) = std::env::var("PHI_KERNELS_NC") {
            match v.trim() {
                "64" => return 64,
                "128" => return 128,
                _ => eprintln!("PHI_KERNELS_NC={v} ignored: 64 or 128"),
            }
        }
        match crate::isa::l2_cache_bytes() {
            Some(l2) if l2 < KC * NC * 4 * 2 => NC / 2,
            _ => NC,
        }
    })
}
/// Rows of A packed at once (at most, before rounding up to a multiple of MR), which bounds the
/// packed copy (cached per calling thread) to about `MC_SUPER · k` floats: 768 × 4096 × 4 B =
/// 12 MiB. Each super-block costs a pass that packs all of B, so `m` is cut into equal blocks.
const MC_SUPER: usize = 768;
/// Above this size of packed A, the k slices go outside the parallel column blocks (see
/// `gemm_tasks`). Alternating runs on the dev VM (`timing ratio`, % of the FMA peak, that order
/// against the other): 757×3072×8192 (24 MiB packed) 74-81% against 69-79% on 2 threads, 6 of
/// 7 pairs; 757×3072×3072 (9 MiB) 74-78% against 70-72%, and 757×9216×3072 81-83% against
/// 78-79%, 3 of 3 each; 577×1024×4096 (CLIP's fc2, 9 MiB) 72-76% against 67-73% on one thread,
/// 8 of 8, and on 2 threads better in 4 of the last 5 pairs, worse in 2 earlier noisy ones.
/// Below it (one k slice, or a few rows of A) the order hardly matters.
const A_IN_CACHE_BYTES: usize = 4 << 20;
/// Up to this many rows of A, GEMM runs as a GEMV that streams B once (decode); a kernel may
/// take more for some weights ([`Microkernel::gemv_max_m`]: AVX2 with bf16 weights, 32).
pub(crate) const GEMV_MAX_M: usize = 4;
/// How far ahead of each B row's reads the GEMV prefetches. On the dev VM the hardware
/// prefetchers alone read 3072-wide bf16 weights at 21.9-23.3 GB/s (AVX-512; AVX2 21.4-21.8);
/// with 512 bytes ahead at 23.2-25.1 (AVX2 22.3-23.6), every row faster in each of several
/// alternating bench runs; 256 and 768 bytes ahead did less (4 KiB pages, one row of A). Since
/// the prefetch runs on into the next group of rows (see [`prefetch_rows`]) it helps every
/// M, where with four rows of A it had lost 5-7% on AVX2: now AVX2 reads 4×9216×3072 at 16.7
/// GB/s with it against 15.5 without (5 of 5 alternating pairs, huge pages), two rows 20.9
/// against 19.6; AVX-512 with none at all, 23.8 against 26.1 (one row) and 21.5 against 23.3
/// (four rows), 0 of 9 pairs for dropping it.
pub(crate) const GEMV_PF_BYTES: usize = 512;
/// The GEMV's prefetch for a group of `rows` consecutive B rows (`k` values each, from `b`)
/// being read at value `p`: each row's line `GEMV_PF_BYTES` ahead. Near a row's end that address
/// runs on into the same row of the next group, which that row's stream reads next (read
/// straight on, it would land in row r + 1, which another stream is already reading).
///
/// Only addresses are computed, never dereferenced: past the end of B they are harmless (a
/// prefetch never faults).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_rows<T>(b: *const T, k: usize, rows: usize, p: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
    let q = p + GEMV_PF_BYTES / size_of::<T>();
    let mut pf = if q < k {
        b.wrapping_add(q)
    } else {
        b.wrapping_add(rows * k + (q - k))
    };
    for _ in 0..rows {
        // SAFETY: a prefetch reads nothing and never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(pf as *const i8) };
        pf = pf.wrapping_add(k);
    }
}

/// Each whole 16 values of `row` as its 8 even-indexed ones, then its 8 odd ones (the order
/// in which a GEMV that widens bf16 pairs by shift and mask multiplies them); the tail past
/// the last whole 16 stays as it is.
pub(crate) fn split_pairs(row: &mut [f32]) {
    for chunk in row.chunks_exact_mut(16) {
        let v: [f32; 16] = (*chunk).try_into().unwrap();
        for i in 0..8 {
            chunk[i] = v[2 * i];
            chunk[8 + i] = v[2 * i + 1];
        }
    }
}

/// The smallest piece of B one GEMV task takes (see `gemv_driver`).
const GEMV_MIN_PIECE_BYTES: usize = 256 * 1024;

/// What a GEMM does besides `A·Bᵀ`: the epilogue applied to each output tile while it is still
/// in registers or L1, and the precision of the products.
///
/// `C = act(A·Bᵀ + bias)`, or `C += A·Bᵀ + bias` when `accumulate` (a fused residual add; an
/// activation cannot be combined with it). With `precision == DType::BF16` both operands are
/// rounded to bf16 (round to nearest even) before they are multiplied, products and sums stay
/// f32: the numerics of a bf16 GEMM with f32 accumulation (`torch.matmul` on bf16 tensors,
/// AMX `tdpbf16ps`, AVX512-BF16 `vdpbf16ps`). Weights already in bf16 are used as they are;
/// others are rounded once per call into a temporary copy (convert them at load time instead).
#[derive(Copy, Clone, Debug, Default)]
pub struct GemmOpts<'a> {
    pub bias: Option<&'a [f32]>,
    pub activation: Activation,
    pub accumulate: bool,
    pub precision: DType,
}

/// `C = A·Bᵀ + bias`, or `C += A·Bᵀ + bias` when `accumulate` (a fused residual add).
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    a: &[f32],
    lda: usize,
    b: Weight<'_>,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    gemm_with(isa::active(), a, lda, b, bias, c, ldc, m, n, k, accumulate)
}

/// [`gemm`] on a given instruction set.
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(
    isa: Isa,
    a: &[f32],
    lda: usize,
    b: Weight<'_>,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    let opts = GemmOpts {
        bias,
        accumulate,
        ..GemmOpts::default()
    };
    gemm_opts_with(isa, a, lda, b, c, ldc, m, n, k, &opts)
}

/// The GEMM with an epilogue and a precision (see [`GemmOpts`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm_opts(
    a: &[f32],
    lda: usize,
    b: Weight<'_>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
) {
    gemm_opts_with(isa::active(), a, lda, b, c, ldc, m, n, k, opts)
}

/// [`gemm_opts`] on a given instruction set.
#[allow(clippy::too_many_arguments)]
pub fn gemm_opts_with(
    isa: Isa,
    a: &[f32],
    lda: usize,
    b: Weight<'_>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
) {
    gemm_fused_with(isa, ARows::dense(a, lda), b, c, ldc, m, n, k, opts, None)
}

/// The GEMM with A from an [`ARows`] source (a norm or the 2×2 merge fused into the packing)
/// and, with `glu = Some((out, ldo))`, SwiGLU fused into the epilogue (see [`gemm_fused_with`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm_fused(
    a: ARows<'_>,
    b: Weight<'_>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
    glu: Option<(&mut [f32], usize)>,
) {
    gemm_fused_with(isa::active(), a, b, c, ldc, m, n, k, opts, glu)
}

/// [`gemm_fused`] on a given instruction set: the one dispatch point of every GEMM.
///
/// `C = A·Bᵀ` with `opts`' epilogue, where row `i` of A is what `a` makes of it. With
/// `glu = Some((out, ldo))`, B's rows are `[gate; up]` (`n = 2·half`), C receives both halves
/// as usual, and each finished tile pair also gives `out[i, j] = silu(C[i, j]) · C[i, half + j]`
/// (`j < half`, rows `ldo` apart), bit for bit what [`silu_mul`](crate::cpu::silu_mul) makes of
/// C, while the tiles are still in L1: the separate pass re-reading all of C is saved.
#[allow(clippy::too_many_arguments)]
pub fn gemm_fused_with(
    isa: Isa,
    a: ARows<'_>,
    b: Weight<'_>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
    glu: Option<(&mut [f32], usize)>,
) {
    check_isa(isa);
    check_args(&a, b, c, ldc, m, n, k, opts);
    let glu = glu.map(|(out, ldo)| Glu::new(out, ldo, m, n, opts));
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // Empty sum: C = act(bias or 0), or C += bias.
        for i in 0..m {
            let row = &mut c[i * ldc..i * ldc + n];
            for (j, v) in row.iter_mut().enumerate() {
                let add = opts.bias.map_or(0.0, |bs| bs[j]);
                *v = if opts.accumulate { *v + add } else { add };
            }
            if !opts.accumulate {
                opts.activation.apply_with(isa, row);
            }
        }
        if let Some(g) = glu {
            // SAFETY: `check_glu` sized `out` for m rows of n/2, `ldo` apart.
            unsafe { g.rows(isa, c.as_ptr(), ldc, 0, m, 0, n / 2, n / 2) };
        }
        return;
    }
    if opts.precision != DType::BF16 {
        return dispatch!(isa, gemm(a, b, c, ldc, m, n, k, opts, glu));
    }
    // bf16 products. The slow path the doc comment warns about: round B once.
    let rounded: Vec<bf16>;
    let b = match b {
        Weight::Bf16(_) => b,
        _ => {
            rounded = (0..b.len()).map(|i| bf16::from_f32(b.get(i))).collect();
            Weight::Bf16(&rounded)
        }
    };
    match bf16_kernel_for(isa) {
        // AMX tiles: 32×32 blocks, 32 k values per `tdpbf16ps` step.
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Amx if m > GEMV_MAX_M => {
            gemm_blocked::<amx::Amx>(a, b, c, ldc, m, n, k, opts, glu)
        }
        // `vdpbf16ps`: two k steps per instruction on bf16 pair panels.
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Avx512Bf16 if m > GEMV_MAX_M => {
            gemm_blocked::<avx512_bf16::Avx512Bf16>(a, b, c, ldc, m, n, k, opts, glu)
        }
        // Elsewhere (and for the GEMV) the f32 kernels multiply the bf16-rounded values (the
        // same numbers).
        _ => dispatch!(isa, gemm(a, b, c, ldc, m, n, k, opts, glu)),
    }
}

/// Where a fused SwiGLU writes (see [`gemm_fused_with`]).
#[derive(Copy, Clone)]
pub(crate) struct Glu {
    out: SendPtr,
    ldo: usize,
}

impl Glu {
    /// Checks `out` (`m` rows of `n/2`, `ldo` apart) against the GEMM it follows (see
    /// `check_glu`) and keeps where it starts.
    fn new(out: &mut [f32], ldo: usize, m: usize, n: usize, opts: &GemmOpts<'_>) -> Glu {
        check_glu(out, ldo, m, n, opts);
        Glu {
            out: SendPtr(out.as_mut_ptr()),
            ldo,
        }
    }

    /// `out[i, j0 + jj] = silu(C[i, j0 + jj]) · C[i, half + j0 + jj]` for rows `i0..i0 + rows`,
    /// `jj < nj`, with `c` pointing at C's first row.
    ///
    /// # Safety
    /// C holds those rows, `ldc` apart, and columns `j0..j0 + nj`, `half + j0..half + j0 + nj`;
    /// `out` holds those rows and columns (as `check_glu` checked) and no other thread writes
    /// them meanwhile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows(
        self,
        isa: Isa,
        c: *const f32,
        ldc: usize,
        i0: usize,
        rows: usize,
        j0: usize,
        nj: usize,
        half: usize,
    ) {
        for i in i0..i0 + rows {
            let gate = std::slice::from_raw_parts(c.add(i * ldc + j0), nj);
            let up = std::slice::from_raw_parts(c.add(i * ldc + half + j0), nj);
            let out = std::slice::from_raw_parts_mut(self.out.get().add(i * self.ldo + j0), nj);
            super::activation::silu_mul_seq(isa, gate, up, out);
        }
    }
}

fn check_glu(out: &[f32], ldo: usize, m: usize, n: usize, opts: &GemmOpts<'_>) {
    assert!(
        n.is_multiple_of(2),
        "gemm: SwiGLU needs [gate; up] rows, n = {n} is odd"
    );
    assert!(
        !opts.accumulate && opts.activation == Activation::Identity,
        "gemm: SwiGLU cannot be combined with accumulate or an activation"
    );
    assert!(ldo >= n / 2, "gemm: SwiGLU ldo {ldo} < n/2 = {}", n / 2);
    if m > 0 && n > 0 {
        assert!(
            out.len() >= (m - 1) * ldo + n / 2,
            "gemm: SwiGLU output has {} elements, needs {}",
            out.len(),
            (m - 1) * ldo + n / 2
        );
    }
}

/// The kernel that multiplies bf16 products (`precision == DType::BF16`, `m > 4`).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX512-BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// The f32 kernels on bf16-rounded values: no bf16 hardware here (or it failed its check).
    F32,
}

impl Bf16Kernel {
    /// Short name, as the bench names this kernel's ceiling (`amx_2t`, `dpbf16_2t`).
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Amx => "amx",
            Bf16Kernel::Avx512Bf16 => "dpbf16",
            Bf16Kernel::F32 => "f32",
        }
    }
}

/// The bf16 product kernel on the active instruction set: the first of AMX, AVX512-BF16 that
/// the CPU has and that agreed with its scalar twin (checked once per process), else F32.
pub fn bf16_kernel() -> Bf16Kernel {
    bf16_kernel_for(isa::active())
}

fn bf16_kernel_for(isa: Isa) -> Bf16Kernel {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        if amx::usable() {
            return Bf16Kernel::Amx;
        }
        if bf16_pairs::hardware_kernel_ok() {
            return Bf16Kernel::Avx512Bf16;
        }
    }
    let _ = isa;
    Bf16Kernel::F32
}

/// The peak probe of [`bf16_kernel`]'s product instruction: `iters` rounds over operands that
/// stay in registers (AMX: four `tdpbf16ps`, 65 536 FLOP a round; AVX512-BF16: twelve
/// `vdpbf16ps` chains, 768 FLOP a round). Returns the FLOPs done, or None on the f32 fallback,
/// whose ceiling is the FMA probe. Run it on several threads at once for a multi-core peak.
#[doc(hidden)]
pub fn bf16_peak_loop(iters: u64) -> Option<f64> {
    match bf16_kernel() {
        // SAFETY: `bf16_kernel` returned Amx only after `amx::usable` (AMX present, tile data
        // granted), Avx512Bf16 only where the CPU has AVX512-BF16.
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Amx => Some(unsafe { amx::peak_loop(iters) }),
        #[cfg(target_arch = "x86_64")]
        Bf16Kernel::Avx512Bf16 => Some(unsafe { avx512_bf16::peak_loop(iters) }),
        _ => None,
    }
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn check_args(
    a: &ARows<'_>,
    b: Weight<'_>,
    c: &[f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
) {
    assert!(
        matches!(opts.precision, DType::F32 | DType::BF16),
        "gemm: precision {:?} is not supported (f32 or bf16)",
        opts.precision
    );
    assert!(
        !(opts.accumulate && opts.activation != Activation::Identity),
        "gemm: an activation cannot be combined with accumulate"
    );
    assert_eq!(b.len(), n * k, "gemm: B must be [n={n}, k={k}]");
    if let Some(bias) = opts.bias {
        assert!(
            bias.len() >= n,
            "gemm: bias has {} elements, needs {n}",
            bias.len()
        );
    }
    if m == 0 || n == 0 {
        return;
    }
    a.check(m, k);
    assert!(ldc >= n, "gemm: ldc {ldc} < n {n}");
    assert!(
        c.len() >= (m - 1) * ldc + n,
        "gemm: C has {} elements, needs {}",
        c.len(),
        (m - 1) * ldc + n
    );
}

/// The scalar twins of the bf16 hardware kernels (see [`gemm_emulated`]).
#[doc(hidden)]
#[derive(Copy, Clone, Debug)]
pub enum Emulated {
    /// `vdpbf16ps` pair panels ([`bf16_pairs`]).
    Bf16Pairs,
    /// AMX tiles ([`amx`]).
    AmxTiles,
}

/// The blocked GEMM on the scalar twin of a bf16 hardware kernel (its packing, its per-element
/// semantics): bf16 weights, bf16 products. Runs on any CPU, so tests check the hardware
/// kernels' layouts here; also their oracle in the once-per-process self-checks.
#[doc(hidden)]
#[allow(clippy::too_many_arguments)]
pub fn gemm_emulated(
    kind: Emulated,
    a: ARows<'_>,
    b: &[bf16],
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
    glu: Option<(&mut [f32], usize)>,
) {
    assert_eq!(opts.precision, DType::BF16, "the twins multiply in bf16");
    let b = Weight::Bf16(b);
    if m == 0 || n == 0 || k == 0 || m <= GEMV_MAX_M {
        return gemm_fused_with(Isa::Scalar, a, b, c, ldc, m, n, k, opts, glu);
    }
    check_args(&a, b, c, ldc, m, n, k, opts);
    let glu = glu.map(|(out, ldo)| Glu::new(out, ldo, m, n, opts));
    match kind {
        Emulated::Bf16Pairs => {
            gemm_blocked::<bf16_pairs::PairsEmu>(a, b, c, ldc, m, n, k, opts, glu)
        }
        Emulated::AmxTiles => gemm_blocked::<amx::AmxEmu>(a, b, c, ldc, m, n, k, opts, glu),
    }
}

/// Plain triple loop with f64 accumulation: the oracle for every path.
#[allow(clippy::too_many_arguments)]
pub fn gemm_ref(
    a: &[f32],
    lda: usize,
    b: Weight<'_>,
    bias: Option<&[f32]>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
) {
    let opts = GemmOpts {
        bias,
        accumulate,
        ..GemmOpts::default()
    };
    gemm_opts_ref(a, lda, b, c, ldc, m, n, k, &opts)
}

/// The oracle of [`gemm_opts`]: operands rounded as `opts.precision` says, f64 sums.
#[allow(clippy::too_many_arguments)]
pub fn gemm_opts_ref(
    a: &[f32],
    lda: usize,
    b: Weight<'_>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
) {
    let round = |x: f32| match opts.precision {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    };
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f64;
            for p in 0..k {
                acc += round(a[i * lda + p]) as f64 * round(b.get(j * k + p)) as f64;
            }
            if let Some(bias) = opts.bias {
                acc += bias[j] as f64;
            }
            let dst = &mut c[i * ldc + j];
            *dst = if opts.accumulate {
                *dst + acc as f32
            } else {
                acc as f32
            };
        }
        if !opts.accumulate {
            opts.activation.apply_ref(&mut c[i * ldc..i * ldc + n]);
        }
    }
}

/// The oracle of [`gemm_fused`]: A by the `_ref` twins of its row ops, then [`gemm_opts_ref`],
/// then SwiGLU by [`silu_mul_ref`](crate::cpu::silu_mul_ref).
#[allow(clippy::too_many_arguments)]
pub fn gemm_fused_ref(
    a: ARows<'_>,
    b: Weight<'_>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
    glu: Option<(&mut [f32], usize)>,
) {
    let a = a.to_matrix_ref(m, k);
    gemm_opts_ref(&a, k, b, c, ldc, m, n, k, opts);
    if let Some((out, ldo)) = glu {
        check_glu(out, ldo, m, n, opts);
        let half = n / 2;
        let mut row = vec![0f32; half];
        for i in 0..m {
            super::activation::silu_mul_ref(&c[i * ldc..i * ldc + n], &mut row, 1, half);
            out[i * ldo..i * ldo + half].copy_from_slice(&row);
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The blocked driver shared by every ISA.

/// One instruction set's building blocks for [`gemm_blocked`].
pub(crate) trait Microkernel {
    /// The instruction set this microkernel needs (the epilogue's activation runs on it too).
    const ISA: Isa;
    /// Rows of the register tile (broadcast from packed A).
    const MR: usize;
    /// Columns of the register tile (vector loads from packed B); divides [`NC`].
    const NR: usize;
    /// k values per packed 32-bit word: 1 for f32 panels, 2 for bf16 pairs (`vdpbf16ps`, AMX).
    const K_PER_WORD: usize = 1;

    /// Depth of one k slice (a multiple of 32 whose packed B block, `NC / NR` panels of
    /// `b_panel_words(kc)`, fits the `NC·KC`-float scratch): the f32 kernels use `KC`; AMX,
    /// with two k values per word, may go to `2·KC`.
    fn kc() -> usize {
        KC
    }

    /// Words of one packed A panel (`MR` rows, all `k` values).
    fn a_panel_words(k: usize) -> usize {
        Self::MR * k.div_ceil(Self::K_PER_WORD)
    }

    /// Offset in words of k value `p0` (a multiple of [`Microkernel::kc`]) within a packed A
    /// panel.
    fn a_offset(p0: usize) -> usize {
        p0 / Self::K_PER_WORD * Self::MR
    }

    /// Words of one packed B panel (`NR` columns, `kc` values).
    fn b_panel_words(kc: usize) -> usize {
        Self::NR * kc.div_ceil(Self::K_PER_WORD)
    }

    /// `C[..mr, ..nr] = Ap·Bp (+ C if load_c) (+ bias[..nr])`, where `Ap` is `kc×MR` and `Bp`
    /// is `kc×NR`, both k-major (in words of `K_PER_WORD` values); C rows are `ldc` apart. Padded rows/columns are computed in
    /// registers and never stored.
    ///
    /// # Safety
    /// `ap`/`bp` readable for `kc·MR`/`kc·NR` floats, `bp` 64-byte aligned, `c` writable for
    /// `mr` rows of `nr`, `bias` (if any) `nr` long, and the CPU has this ISA.
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel(
        kc: usize,
        ap: *const f32,
        bp: *const f32,
        c: *mut f32,
        ldc: usize,
        mr: usize,
        nr: usize,
        load_c: bool,
        bias: Option<&[f32]>,
    );

    /// Packs rows `i0..i0+rows` of A (`rows <= MR`) into one micro-panel `dst [k][MR]`,
    /// rounded to bf16 if `bf16`.
    #[allow(clippy::too_many_arguments)]
    fn pack_a(a: &[f32], lda: usize, i0: usize, rows: usize, k: usize, bf16: bool, dst: &mut [f32]);

    /// Widens rows `j0..j0+nc`, columns `p0..p0+kc` of `b [n, k]` into `out`: panel `q` is
    /// `kc×NR` with element `(p, jj) = b[j0 + q·NR + jj, p0 + p]`, columns past `nc` zero.
    ///
    /// # Safety
    /// The CPU has this ISA; `j0 + nc <= n`, `p0 + kc <= k`, `out` holds the panels.
    #[allow(clippy::too_many_arguments)]
    unsafe fn pack_b(
        b: Weight<'_>,
        n: usize,
        k: usize,
        j0: usize,
        nc: usize,
        p0: usize,
        kc: usize,
        out: &mut [f32],
    );

    /// Up to how many rows of A the GEMV path ([`Self::gemv`]) takes weights like `b`; above
    /// it the blocked GEMM packs B.
    fn gemv_max_m(_b: Weight<'_>) -> usize {
        GEMV_MAX_M
    }

    /// Whether [`Self::gemv`] wants each row of A split by [`split_pairs`] for weights like `b`.
    fn gemv_pairs(_b: Weight<'_>) -> bool {
        false
    }

    /// `out[jj·m + i] = A[i, :] · b[j0 + jj, :]` for `jj < nj`, `i < m <= Self::gemv_max_m(b)`.
    ///
    /// # Safety
    /// The CPU has this ISA; shapes as checked by [`gemm_with`], `out.len() == nj·m`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemv(
        a: &[f32],
        lda: usize,
        m: usize,
        b: Weight<'_>,
        k: usize,
        j0: usize,
        nj: usize,
        out: &mut [f32],
    );
}

thread_local! {
    /// Each worker's packed-B block, reused across calls (`nc()·KC` floats, 256 or 512 KiB).
    static B_PACK: RefCell<Scratch> = const { RefCell::new(Scratch::new()) };
    /// The calling thread's packed A, reused across calls (saves the page faults of a fresh
    /// multi-MiB buffer per call).
    static A_PACK: RefCell<Scratch> = const { RefCell::new(Scratch::new()) };
    /// Each packing thread's rows of a fused A source (see [`ARows`]): one micro-panel's
    /// worth, `MR·k` floats, produced and packed while in L2.
    static A_STAGE: RefCell<Scratch> = const { RefCell::new(Scratch::new()) };
}

/// Packing scratch in an anonymous mapping of its own, 2 MiB aligned and advised for
/// transparent huge pages: the 512 KiB B block then needs one TLB entry instead of 128 and is
/// physically contiguous, so it spreads evenly over the (physically indexed) L2 sets. Paired
/// rounds measured it 1-4 points of the FMA peak ahead of a plain vector. Falls back to a plain
/// vector when the mapping fails.
struct Scratch {
    map: Option<HugeBuf<u8>>,
    vec: Vec<f32>,
}

/// The huge page size of x86-64 Linux.
const HUGE_PAGE: usize = 2 << 20;

impl Scratch {
    const fn new() -> Self {
        Scratch {
            map: None,
            vec: Vec::new(),
        }
    }

    /// `len` floats, 64-byte aligned (2 MiB aligned when mapped), grown if needed.
    fn floats(&mut self, len: usize) -> &mut [f32] {
        let bytes = len * 4;
        if self
            .map
            .as_ref()
            .is_none_or(|m| m.len() < bytes + HUGE_PAGE)
        {
            let size = (bytes + HUGE_PAGE).next_multiple_of(HUGE_PAGE);
            self.map = HugeBuf::zeroed(size).ok();
        }
        match self.map.as_mut() {
            Some(m) => {
                let off = m.as_ptr().align_offset(HUGE_PAGE);
                bytemuck::cast_slice_mut(&mut m[off..off + bytes])
            }
            None => aligned(&mut self.vec, len),
        }
    }
}

/// `len` floats of `v`, 64-byte aligned (one cache line, one zmm), growing `v` if needed.
fn aligned(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len + 16 {
        v.resize(len + 16, 0.0);
    }
    let off = v.as_ptr().align_offset(64);
    &mut v[off..off + len]
}

/// Runs `f` on this thread's cached scratch, or on a fresh buffer if it is already in use.
fn with_scratch<R>(
    key: &'static LocalKey<RefCell<Scratch>>,
    len: usize,
    f: impl FnOnce(&mut [f32]) -> R,
) -> R {
    key.with(|cell| match cell.try_borrow_mut() {
        Ok(mut s) => f(s.floats(len)),
        Err(_) => f(aligned(&mut Vec::new(), len)),
    })
}

/// Packs rows `i0..i0+rows` of A (`rows <= MR`) into one micro-panel `dst [k][MR]`,
/// zero-padded, rounded to bf16 if `bf16`. Writes are sequential; the `rows` reads are
/// sequential streams.
pub(crate) fn pack_a<const MR: usize>(
    a: &[f32],
    lda: usize,
    i0: usize,
    rows: usize,
    k: usize,
    bf16: bool,
    dst: &mut [f32],
) {
    if rows == MR {
        let src: [&[f32]; MR] = std::array::from_fn(|i| &a[(i0 + i) * lda..(i0 + i) * lda + k]);
        for (p, d) in dst.chunks_exact_mut(MR).enumerate() {
            for i in 0..MR {
                d[i] = src[i][p];
            }
        }
    } else {
        for (p, d) in dst.chunks_exact_mut(MR).enumerate() {
            for (i, v) in d.iter_mut().enumerate() {
                *v = if i < rows { a[(i0 + i) * lda + p] } else { 0.0 };
            }
        }
    }
    if bf16 {
        round_bf16(dst);
    }
}

/// Rounds every value to the nearest bf16 (ties to even), kept as f32. Branch-free bit
/// arithmetic (as `half::bf16::from_f32` computes it) so the loop vectorises.
pub(crate) fn round_bf16(xs: &mut [f32]) {
    for x in xs {
        let b = x.to_bits();
        let r = if x.is_nan() {
            b | 0x0040_0000 // stays a (quiet) NaN
        } else {
            b.wrapping_add(0x7FFF + ((b >> 16) & 1))
        };
        *x = f32::from_bits(r & 0xFFFF_0000);
    }
}

/// The shared B packer: widens one row segment at a time with `widen(start, out)` (the ISA's
/// vector conversion) and scatters it down its column of the panel.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn pack_b_rows(
    n: usize,
    k: usize,
    j0: usize,
    nc: usize,
    p0: usize,
    kc: usize,
    nr: usize,
    out: &mut [f32],
    mut widen: impl FnMut(usize, &mut [f32]),
) {
    let mut row = [0f32; KC];
    let row = &mut row[..kc];
    for q in 0..nc.div_ceil(nr) {
        let panel = &mut out[q * nr * kc..(q + 1) * nr * kc];
        for jj in 0..nr {
            let j = j0 + q * nr + jj;
            if q * nr + jj < nc {
                debug_assert!(j < n);
                widen(j * k + p0, row);
                for (p, &v) in row.iter().enumerate() {
                    panel[p * nr + jj] = v;
                }
            } else {
                for p in 0..kc {
                    panel[p * nr + jj] = 0.0;
                }
            }
        }
    }
}

/// The blocked GEMM for `m > GEMV_MAX_M`; shapes already checked by [`gemm_opts_with`], `k > 0`,
/// and B is bf16 when `opts.precision` is.
///
/// Parallelism: tasks are (M chunk × NC block) pairs over the rayon pool. N blocks come first
/// (each packs its own B block, so B is read once); M is only split when there are fewer N
/// blocks than threads (then into about two tasks per thread), at the price of packing those B
/// blocks once per M chunk. Splitting M when N blocks already cover the threads measured
/// 577×1024×4096 on two threads at 130 GFLOP/s instead of 170-200. Sharing each packed B block
/// among all threads instead (pack together, then work-steal small chunks of A panels, one
/// fork-join per `NC×KC` block) measured 35% slower on two threads (clip_fc1 52 ms against 38).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_blocked<K: Microkernel>(
    a: ARows<'_>,
    b: Weight<'_>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
    glu: Option<Glu>,
) {
    if m <= K::gemv_max_m(b) {
        return gemv_driver::<K>(a, b, c, ldc, m, n, k, opts, glu);
    }
    debug_assert!(nc().is_multiple_of(2 * K::NR));
    // Equal super-blocks: cutting 757 rows (Phi-3's prefill of one image and a prompt) at a
    // fixed 756 left a 1-row block that paid a whole pass over B for one row of C (the
    // 757×3072×3072 GEMM ran at 45-47% of the 2-thread peak against 48-57% for 756 rows).
    let mc_super = m.div_ceil(m.div_ceil(MC_SUPER)).next_multiple_of(K::MR);
    let c_ptr = SendPtr(c.as_mut_ptr());
    let threads = rayon::current_num_threads().max(1);
    let bf16 = opts.precision == DType::BF16;

    // LOOP 6: M in super-blocks, only so the packed copy of A stays bounded.
    for m0 in (0..m).step_by(mc_super) {
        let mb = (m - m0).min(mc_super);
        let panels = mb.div_ceil(K::MR);
        let panel_words = K::a_panel_words(k);
        with_scratch(&A_PACK, panels * panel_words, |ap| {
            let pack = |(q, dst): (usize, &mut [f32])| {
                let i0 = m0 + q * K::MR;
                let rows = (m0 + mb - i0).min(K::MR);
                match a.as_dense() {
                    Some((a, lda)) => K::pack_a(a, lda, i0, rows, k, bf16, dst),
                    // A fused row op: this panel's rows are made here, then packed.
                    None => with_scratch(&A_STAGE, rows * k, |stage| {
                        a.fill(K::ISA, i0, rows, k, stage);
                        K::pack_a(stage, k, 0, rows, k, bf16, dst)
                    }),
                }
            };
            if threads > 1 && ap.len() > super::PAR_MIN_ELEMS {
                ap.par_chunks_mut(panel_words).enumerate().for_each(pack);
            } else {
                ap.chunks_mut(panel_words).enumerate().for_each(pack);
            }
            gemm_tasks::<K>(ap, m0, mb, b, c_ptr, ldc, n, k, opts, glu);
        });
    }
}

/// LOOPs 5..1 over one super-block of packed A: rows `m0..m0+mb` of C, every column.
///
/// With SwiGLU (`glu`), a task's column block is a pair: `nc()/2` gate columns `j0..` and the
/// matching up columns `n/2 + j0..`, packed side by side into the same `nc()`-wide scratch, so
/// each gate tile is followed by its up tile and the last k slice can combine the two in L1.
#[allow(clippy::too_many_arguments)]
fn gemm_tasks<K: Microkernel>(
    ap: &[f32],
    m0: usize,
    mb: usize,
    b: Weight<'_>,
    c_ptr: SendPtr,
    ldc: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
    glu: Option<Glu>,
) {
    let (mr_, nr_) = (K::MR, K::NR);
    let isa = K::ISA;
    let threads = rayon::current_num_threads().max(1);
    // Columns one task covers in each of its `pieces` (1, or 2 for gate and up), out of `span`.
    let (pieces, width, span) = match glu {
        Some(_) => (2, nc() / 2, n / 2),
        None => (1, nc(), n),
    };
    let piece_panels = width / nr_;
    // The packed B block: `pieces` of `width` columns, `kc` deep.
    let block_words = nc() / nr_ * K::b_panel_words(K::kc());
    let n_blocks = span.div_ceil(width);
    let panels = mb.div_ceil(mr_);
    let m_chunks = if threads == 1 || n_blocks >= threads {
        1
    } else {
        (2 * threads).div_ceil(n_blocks)
    };
    let per_chunk = panels.div_ceil(m_chunks.min(panels));
    let m_chunks = panels.div_ceil(per_chunk);

    let tasks = n_blocks * m_chunks;
    let slices: Vec<usize> = (0..k).step_by(K::kc()).collect();
    // Task `t` over the KC-deep slices of k starting at `starts`.
    let task = |t: usize, starts: &[usize]| {
        // LOOP 5 (jc, parallel): one block of B and C columns per task (a gate/up pair of
        // blocks with SwiGLU). Piece `pi` covers columns `col0[pi]..+nc`.
        let (jb, mi) = (t % n_blocks, t / n_blocks);
        let j0 = jb * width;
        let nc = width.min(span - j0);
        let col0 = [j0, span + j0];
        let (q0, q1) = (mi * per_chunk, ((mi + 1) * per_chunk).min(panels));
        with_scratch(&B_PACK, block_words, |bp| {
            // LOOP 4 (pc): KC-deep slices of k; C is final after the last one.
            for &p0 in starts {
                let kc = K::kc().min(k - p0);
                let (first, last) = (p0 == 0, p0 + kc == k);
                let words = K::b_panel_words(kc);
                for (pi, &j) in col0[..pieces].iter().enumerate() {
                    // SAFETY: the ISA was checked by `gemm_fused_with`; j + nc <= n,
                    // p0 + kc <= k, and bp holds NC/NR panels of kc values, 64-byte aligned
                    // (piece pi starts at panel pi·piece_panels, a whole number of panels).
                    unsafe {
                        K::pack_b(b, n, k, j, nc, p0, kc, &mut bp[pi * piece_panels * words..])
                    };
                }
                // LOOP 3 (ic, parallel across tasks): this task's MR-row panels of A.
                for q in q0..q1 {
                    let i0 = m0 + q * mr_;
                    let mr = mr_.min(m0 + mb - i0);
                    let a_panel = ap[q * K::a_panel_words(k) + K::a_offset(p0)..].as_ptr();
                    // LOOP 2 (jr): the block's B panels (in L2) against this A micro-panel
                    // (in L2 after the first of them).
                    for (jp, jr) in (0..nc).step_by(nr_).enumerate() {
                        let nr = nr_.min(nc - jr);
                        for (pi, &j) in col0[..pieces].iter().enumerate() {
                            let col = j + jr;
                            let bias = if first {
                                opts.bias.map(|bs| &bs[col..col + nr])
                            } else {
                                None
                            };
                            let tile = c_ptr.get().wrapping_add(i0 * ldc + col);
                            let panel = (pi * piece_panels + jp) * words;
                            // LOOP 1 is the microkernel's k loop.
                            // SAFETY: the tile (rows i0..i0+mr, columns col..col+nr) lies
                            // inside C (checked by `gemm_fused_with`) and only this task
                            // writes it: tasks own disjoint (row chunk, column block) pairs.
                            // The A panel holds kc·MR values from p0 on; the B panel kc·NR,
                            // 64-byte aligned.
                            unsafe {
                                K::kernel(
                                    kc,
                                    a_panel,
                                    bp.as_ptr().add(panel),
                                    tile,
                                    ldc,
                                    mr,
                                    nr,
                                    opts.accumulate || !first,
                                    bias,
                                )
                            };
                            if last && opts.activation != Activation::Identity {
                                // The epilogue: the tile was just stored and is still in L1.
                                for r in 0..mr {
                                    // SAFETY: as above, row r of this task's tile.
                                    let row = unsafe {
                                        std::slice::from_raw_parts_mut(tile.add(r * ldc), nr)
                                    };
                                    opts.activation.apply_with(isa, row);
                                }
                            }
                        }
                    }
                    if let (true, Some(g)) = (last, glu) {
                        // This panel's rows of the gate and up blocks are final and in L1 (2·MR
                        // rows of nc()/2 columns). Once per block rather than per tile: a call per
                        // 16-column tile row cost more than the separate pass it replaces.
                        // SAFETY: rows i0..i0+mr, gate columns j0..j0+nc and their up columns
                        // are this task's, inside C and `out` (`check_glu`).
                        unsafe { g.rows(isa, c_ptr.get(), ldc, i0, mr, j0, nc, span) };
                    }
                }
            }
        })
    };
    let run = |starts: &[usize]| {
        if tasks == 1 {
            task(0, starts);
        } else {
            (0..tasks).into_par_iter().for_each(|t| task(t, starts));
        }
    };
    if ap.len() * 4 > A_IN_CACHE_BYTES {
        // Packed A too big to stay near the cores while every task walks all of k: one slice
        // at a time instead, so a slice of A (every panel, kc deep) serves all column blocks
        // while it is in cache, at the price of a pass over C per slice.
        for p0 in slices {
            run(&[p0]);
        }
    } else {
        run(&slices);
    }
}

/// `m <= GEMV_MAX_M`: B rows are streamed once, split over the pool by row ranges of B (the
/// decode GEMV is memory-bound, so both cores' bandwidth is wanted).
#[allow(clippy::too_many_arguments)]
fn gemv_driver<K: Microkernel>(
    a: ARows<'_>,
    b: Weight<'_>,
    c: &mut [f32],
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    opts: &GemmOpts<'_>,
    glu: Option<Glu>,
) {
    // A fused row op makes its (at most four) rows here; bf16 products round them once.
    let owned: Vec<f32>;
    let bf16 = opts.precision == DType::BF16;
    let pairs = K::gemv_pairs(b);
    let (a, lda) = match a.as_dense() {
        Some(dense) if !bf16 && !pairs => dense,
        _ => {
            let mut r = vec![0f32; m * k];
            a.fill(K::ISA, 0, m, k, &mut r);
            if bf16 {
                round_bf16(&mut r);
            }
            if pairs {
                r.chunks_exact_mut(k).for_each(split_pairs);
            }
            owned = r;
            (&owned[..], k)
        }
    };
    // out[j·m + i] = A[i,:]·B[j,:]; folded into C (with the epilogue) at the end.
    let mut out = vec![0f32; n * m];
    let threads = rayon::current_num_threads().max(1);
    if threads == 1 || n * k <= 4 * super::PAR_MIN_ELEMS {
        // SAFETY: the ISA was checked by `gemm_opts_with`; rows 0..n lie inside B.
        unsafe { K::gemv(a, lda, m, b, k, 0, n, &mut out) };
    } else {
        // Guided self-scheduling: each grab takes a share of what is left, down to a floor, so
        // the pieces shrink towards the end and the threads finish together. With equal
        // pieces (four per thread) one thread waited for the other's last piece, 20-150 µs of
        // a 2.3 ms call: 1×9216×3072 read 24.05 GB/s against 25.05 now (7 of 8 alternating
        // pairs), 4 rows 19.2 against 20.95 (5 of 6). A static half each measured the same
        // median as this, with a wider spread (a neighbour slows one thread, the other idles).
        let min_rows = GEMV_MIN_PIECE_BYTES.div_ceil(k * b.dtype().size());
        let next = std::sync::atomic::AtomicUsize::new(0);
        let out_ptr = SendPtr(out.as_mut_ptr());
        (0..threads).into_par_iter().for_each(|_| loop {
            use std::sync::atomic::Ordering::Relaxed;
            let mut j0 = next.load(Relaxed);
            let rows = loop {
                if j0 >= n {
                    return;
                }
                // Whole groups of the kernels' row blocks (8 and 6 rows) where it can.
                let rows = ((n - j0) / (2 * threads))
                    .max(min_rows)
                    .next_multiple_of(24)
                    .min(n - j0);
                match next.compare_exchange_weak(j0, j0 + rows, Relaxed, Relaxed) {
                    Ok(_) => break rows,
                    Err(now) => j0 = now,
                }
            };
            // SAFETY: each grab owns rows j0..j0 + rows of B and the matching m·rows values
            // of `out` (the counter hands every row out once), which outlives this scope.
            unsafe {
                let dst = std::slice::from_raw_parts_mut(out_ptr.get().add(j0 * m), rows * m);
                K::gemv(a, lda, m, b, k, j0, rows, dst);
            }
        });
    }
    let isa = K::ISA;
    for i in 0..m {
        let row = &mut c[i * ldc..i * ldc + n];
        for (j, v) in row.iter_mut().enumerate() {
            let r = out[j * m + i] + opts.bias.map_or(0.0, |bs| bs[j]);
            *v = if opts.accumulate { *v + r } else { r };
        }
        if !opts.accumulate {
            opts.activation.apply_with(isa, row);
        }
    }
    if let Some(g) = glu {
        // SAFETY: C holds m rows of n, `out` m rows of n/2 (`check_glu`).
        unsafe { g.rows(isa, c.as_ptr(), ldc, 0, m, 0, n / 2, n / 2) };
    }
}

/// The AVX-512 microkernel alone, for tuning: `calls` tiles of `kc` steps over `panels` B
/// micro-panels that stay in cache (L1 for one panel, L2 for up to 16), so the time measures
/// the kernel's issue rate without packing or DRAM. Returns the FLOPs done.
#[doc(hidden)]
#[cfg(target_arch = "x86_64")]
pub fn microkernel_probe(kc: usize, panels: usize, calls: usize) -> f64 {
    use avx512::{Avx512, MR, NR};
    assert!(Isa::Avx512.is_supported() && kc <= KC && panels >= 1);
    let mut ap = vec![0f32; MR * kc + 16];
    let mut bp = vec![0f32; panels * NR * kc + 16];
    let ap = aligned(&mut ap, MR * kc);
    ap.iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = (i % 7) as f32 * 0.01);
    let bp = aligned(&mut bp, panels * NR * kc);
    bp.iter_mut()
        .enumerate()
        .for_each(|(i, v)| *v = (i % 5) as f32 * 0.01);
    let mut c = vec![0f32; MR * NR * panels];
    for t in 0..calls {
        let q = t % panels;
        // SAFETY: AVX-512 checked above; panels sized and aligned as the kernel requires.
        unsafe {
            Avx512::kernel(
                kc,
                ap.as_ptr(),
                bp.as_ptr().add(q * NR * kc),
                c.as_mut_ptr().add(q * NR),
                NR * panels,
                MR,
                NR,
                true,
                None,
            )
        };
    }
    std::hint::black_box(&c);
    (2 * MR * NR * kc * calls) as f64
}
