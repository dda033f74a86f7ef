//! AMX GEMM (`tdpbf16ps`, Sapphire Rapids and later): bf16 products on the tile unit, f32
//! accumulation. One microkernel call computes a 32×32 block of C in four accumulator tiles
//! (tmm0..3) from two A tiles (tmm4, tmm5: 16 rows × 32 bf16) and two B tiles (tmm6, tmm7:
//! 16 k-pairs × 16 columns), 32 k values per step.
//!
//! Packed A: per 32-row panel, `[ceil(k/32)][32 rows][16 words]`: each 32-wide k chunk holds
//! the rows one after another, 64 bytes each, so one A tile is 16 consecutive rows (stride 64).
//! Packed B: the bf16 pair panels of `vdpbf16ps` ([`super::bf16_pairs`]), `[kw][32]` words with
//! `kw` padded to a multiple of 16 rows: a B tile is 16 pair rows of one 16-column half
//! (stride 128 bytes). Padding is zero in both, so it adds nothing.
//!
//! [`AmxEmu`] is the plain twin (scalar packers, `tdpbf16ps` per element in scalar code): it
//! runs on any CPU, so the layout and driver are tested everywhere; the AVX-512 packers of the
//! hardware kernel are tested word for word against the scalar ones wherever AVX-512 runs. The
//! hardware kernel needs the kernel's permission for tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM,
//! XFEATURE_XTILEDATA)`, Linux 5.16+) and is compared with the twin once per process before use
//! ([`usable`]).
//!
//! The dev VM (Skylake-SP) has no AMX. The kernel ran, passed the GEMM tests and was tuned on
//! the GPU machine's host CPU (a Sapphire Rapids-class Xeon with AMX, through the device
//! bundle), where `cargo xtask bench` measures it against the `amx_Nt` probe and torch's
//! oneDNN. What moved it from 4-11% of that probe to 14-28% (2 threads: 0.54-0.83x torch's time
//! on four of five model shapes in the same run): AVX-512 packers instead of scalar ones, C and
//! bias loaded straight into the accumulator tiles, the tile configuration loaded once per
//! thread, loads interleaved with the products, and B prefetched a step ahead. Where the rest of
//! the time goes was not measured (that machine has no profiler): the likely parts are the B
//! packing, which every call repeats, and tile loads that miss L1.

use half::bf16;

use super::bf16_pairs::{dot_pair, pack_b_pairs};
use super::{Microkernel, KC};
use crate::{Isa, Weight};

const MR: usize = 32;
const NR: usize = super::bf16_pairs::NR;
/// k values per tile step (one A tile row: 64 bytes of bf16).
const KT: usize = 32;
const _: () = assert!(NR == 32 && KC.is_multiple_of(KT) && super::NC.is_multiple_of(NR));
/// Depth of one k slice unless `PHI_KERNELS_AMX_KC` says otherwise. On a Sapphire Rapids
/// host (CLIP and prefill shapes, 1 and 2 threads, a noisy shared machine) 1024 was faster
/// than 512 and 256 in most rows of two sweeps, 128 slowest everywhere, and 2048 not clearly
/// better: each slice is one more pass over C, and A panels short enough to stay in L1 (256)
/// did not pay for it.
const DEFAULT_KC: usize = 1024;
/// The deepest slice whose packed B block fits the `NC·KC`-float scratch (two k per word).
const MAX_KC: usize = 2 * KC;

/// The k slice depth: `PHI_KERNELS_AMX_KC` (a multiple of 32 up to [`MAX_KC`], for tuning
/// with `cargo xtask bench`), else [`DEFAULT_KC`]. Read once per process.
fn slice_depth() -> usize {
    use std::sync::OnceLock;
    static DEPTH: OnceLock<usize> = OnceLock::new();
    *DEPTH.get_or_init(|| {
        let Ok(v) = std::env::var("PHI_KERNELS_AMX_KC") else {
            return DEFAULT_KC;
        };
        match v.trim().parse::<usize>() {
            Ok(d) if (KT..=MAX_KC).contains(&d) && d.is_multiple_of(KT) => d,
            _ => {
                eprintln!(
                    "phi-kernels: PHI_KERNELS_AMX_KC={v:?} is not a multiple of {KT} in \
                     {KT}..={MAX_KC}; using {DEFAULT_KC}"
                );
                DEFAULT_KC
            }
        }
    })
}

/// Packs rows `i0..i0+rows` of A (rounded to bf16) into one AMX panel
/// `[ceil(k/32)][32][16 words]`, zero-padded in rows and k.
fn pack_a_tiles(a: &[f32], lda: usize, i0: usize, rows: usize, k: usize, dst: &mut [f32]) {
    let words: &mut [u32] = bytemuck::cast_slice_mut(dst);
    for (chunk, block) in words.chunks_exact_mut(MR * KT / 2).enumerate() {
        for (i, row_words) in block.chunks_exact_mut(KT / 2).enumerate() {
            let row: &[f32] = if i < rows {
                let lo = ((i0 + i) * lda + chunk * KT).min((i0 + i) * lda + k);
                &a[lo..(i0 + i) * lda + k]
            } else {
                &[]
            };
            for (p2, w) in row_words.iter_mut().enumerate() {
                let lo = row
                    .get(2 * p2)
                    .map_or(0, |&v| bf16::from_f32(v).to_bits() as u32);
                let hi = row
                    .get(2 * p2 + 1)
                    .map_or(0, |&v| bf16::from_f32(v).to_bits() as u32);
                *w = lo | hi << 16;
            }
        }
    }
}

/// The layout both AMX kernels share (the twin packs in scalar code, the hardware kernel with
/// AVX-512, into the same panels).
macro_rules! amx_layout {
    () => {
        const MR: usize = MR;
        const NR: usize = NR;
        const K_PER_WORD: usize = 2;

        fn a_panel_words(k: usize) -> usize {
            MR * k.next_multiple_of(KT) / 2
        }

        fn a_offset(p0: usize) -> usize {
            // p0 is a multiple of KC, hence of KT: whole chunks of MR·KT/2 words.
            p0 / KT * (MR * KT / 2)
        }

        fn b_panel_words(kc: usize) -> usize {
            NR * kc.next_multiple_of(KT) / 2
        }

        fn kc() -> usize {
            slice_depth()
        }
    };
}

/// Adds a finished 32×32 f32 block (`acc`, rows 32 apart) into C: `mr` rows of `nr`, plus
/// bias, plus the old C when `load_c`.
///
/// # Safety
/// As [`Microkernel::kernel`]'s C, bias.
unsafe fn store_block(
    acc: &[f32; MR * NR],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    load_c: bool,
    bias: Option<&[f32]>,
) {
    for i in 0..mr {
        let dst = std::slice::from_raw_parts_mut(c.add(i * ldc), nr);
        for (j, d) in dst.iter_mut().enumerate() {
            let mut v = acc[i * NR + j] + bias.map_or(0.0, |bs| bs[j]);
            if load_c {
                v += *d;
            }
            *d = v;
        }
    }
}

/// The scalar twin of [`Amx`]: element `(i, j)` accumulates `dot_pair` over the k pairs.
pub(super) struct AmxEmu;

impl Microkernel for AmxEmu {
    const ISA: Isa = Isa::Scalar;
    amx_layout!();

    fn pack_a(a: &[f32], lda: usize, i0: usize, rows: usize, k: usize, _: bool, d: &mut [f32]) {
        pack_a_tiles(a, lda, i0, rows, k, d)
    }

    unsafe fn pack_b(
        b: Weight<'_>,
        _n: usize,
        k: usize,
        j0: usize,
        nc: usize,
        p0: usize,
        kc: usize,
        out: &mut [f32],
    ) {
        pack_b_pairs(b, k, j0, nc, p0, kc, kc.next_multiple_of(KT) / 2, out)
    }

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
    ) {
        let (ap, bp) = (ap as *const u32, bp as *const u32);
        let mut acc = [0f32; MR * NR];
        for chunk in 0..kc.div_ceil(KT) {
            let (a, b) = (ap.add(chunk * MR * KT / 2), bp.add(chunk * (KT / 2) * NR));
            for i in 0..MR {
                for j in 0..NR {
                    let v = &mut acc[i * NR + j];
                    for p2 in 0..KT / 2 {
                        *v = dot_pair(*v, *a.add(i * KT / 2 + p2), *b.add(p2 * NR + j));
                    }
                }
            }
        }
        store_block(&acc, c, ldc, mr, nr, load_c, bias)
    }

    unsafe fn gemv(
        a: &[f32],
        lda: usize,
        m: usize,
        b: Weight<'_>,
        k: usize,
        j0: usize,
        nj: usize,
        out: &mut [f32],
    ) {
        super::scalar::Scalar::gemv(a, lda, m, b, k, j0, nj, out)
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) use hw::{peak_loop, usable, Amx};

#[cfg(target_arch = "x86_64")]
mod hw {
    use std::arch::asm;
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

    use super::super::avx512_bf16::{pack_b_pairs_t, pairs16};
    use super::*;

    /// The tile configuration (palette 1): tmm0..3 are 16×16 f32 accumulators, tmm4/5 A tiles
    /// and tmm6/7 B tiles, all 16 rows of 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    static CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    /// Loads [`CONFIG`] into this thread's tile configuration, once per thread. The
    /// configuration is part of the thread's saved state and only this module sets it, so it
    /// stays loaded; nothing here releases it (`tilerelease` would clear it). Loading it per
    /// 32×32 block put a serialising instruction in front of every block.
    fn configure_tiles() {
        use std::cell::Cell;
        thread_local! {
            static CONFIGURED: Cell<bool> = const { Cell::new(false) };
        }
        CONFIGURED.with(|done| {
            if !done.get() {
                // SAFETY: callers run only after `usable` (AMX present, tile data granted), and
                // CONFIG is a valid palette-1 configuration.
                unsafe {
                    asm!(
                        "ldtilecfg [{cfg}]",
                        cfg = in(reg) &CONFIG as *const TileConfig,
                        options(nostack, readonly),
                    )
                };
                done.set(true);
            }
        })
    }

    /// How many k steps ahead the kernel prefetches A and B into L1 (0: not at all). Default:
    /// B one step (2 KiB) ahead, A not. On a Sapphire Rapids host, in two sweeps at KC = 1024,
    /// that was faster than no prefetch in 9 of 10 rows (2 threads: CLIP qkv/out 1.69 -> 0.96
    /// ms, fc1 4.95 -> 3.53, fc2 6.36 -> 4.30, prefill qkv 45.4 -> 30.7 in one sweep; the
    /// exception, prefill qkv 33.5 -> 41.0, in the other). Two steps ahead, or A as well, did
    /// no better overall. `PHI_KERNELS_AMX_PF` = `0`, `b1`, `ab2`, ... (B, or A and B, that
    /// many steps ahead) overrides it for tuning. Read once per process.
    fn prefetch() -> (usize, usize) {
        use std::sync::OnceLock;
        static PF: OnceLock<(usize, usize)> = OnceLock::new();
        *PF.get_or_init(|| {
            let v = std::env::var("PHI_KERNELS_AMX_PF").unwrap_or_else(|_| "b1".into());
            let d = v
                .trim_start_matches(['a', 'b'])
                .parse::<usize>()
                .unwrap_or(0);
            let a = if v.starts_with('a') { d } else { 0 };
            let b = if v.contains('b') { d } else { 0 };
            (a, b)
        })
    }

    pub(in crate::cpu::gemm) struct Amx;

    impl Microkernel for Amx {
        const ISA: Isa = Isa::Avx512;
        amx_layout!();

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
        ) {
            // A whole 32×32 block goes straight between C and the accumulator tiles: they start
            // from C (when adding to it) or from the bias (one row loaded with stride 0, so every
            // row is the bias), and are stored into C at the end. Edge blocks, and a bias added
            // to an old C, go through a buffer and `store_block`.
            let direct = mr == MR && nr == NR && !(load_c && bias.is_some());
            let c_stride = 4 * ldc;
            configure_tiles();
            match bias {
                _ if direct && load_c => asm!(
                    "tileloadd tmm0, [{c00} + {s}*1]",
                    "tileloadd tmm1, [{c01} + {s}*1]",
                    "tileloadd tmm2, [{c10} + {s}*1]",
                    "tileloadd tmm3, [{c11} + {s}*1]",
                    c00 = in(reg) c,
                    c01 = in(reg) c.add(16),
                    c10 = in(reg) c.add(16 * ldc),
                    c11 = in(reg) c.add(16 * ldc + 16),
                    s = in(reg) c_stride,
                    options(nostack, readonly),
                ),
                Some(bs) if direct => asm!(
                    "tileloadd tmm0, [{b0} + {z}*1]",
                    "tileloadd tmm1, [{b1} + {z}*1]",
                    "tileloadd tmm2, [{b0} + {z}*1]",
                    "tileloadd tmm3, [{b1} + {z}*1]",
                    b0 = in(reg) bs.as_ptr(),
                    b1 = in(reg) bs.as_ptr().add(16),
                    z = in(reg) 0usize,
                    options(nostack, readonly),
                ),
                _ => asm!(
                    "tilezero tmm0",
                    "tilezero tmm1",
                    "tilezero tmm2",
                    "tilezero tmm3",
                    options(nostack, nomem),
                ),
            }
            // One 32-value k step: A rows 0..16 and 16..32 (tile rows 64 bytes apart, the second
            // tile 1 KiB on), B columns 0..16 and 16..32 (rows 128 bytes apart, the second 64
            // bytes on); 2 KiB of each per step. Loads and products alternate so that each
            // product starts as soon as its two tiles are in and the next load overlaps it.
            const STEP: usize = MR * KT / 2 * 4;
            let (a_stride, b_stride) = (64usize, 4 * NR);
            let (pf_a, pf_b) = prefetch();
            let (mut a, mut b) = (ap as *const u8, bp as *const u8);
            for _ in 0..kc.div_ceil(KT) {
                if pf_b > 0 {
                    for line in 0..STEP / 64 {
                        let p = b.wrapping_add(pf_b * STEP + 64 * line);
                        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                    }
                }
                if pf_a > 0 {
                    for line in 0..STEP / 64 {
                        let p = a.wrapping_add(pf_a * STEP + 64 * line);
                        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
                    }
                }
                asm!(
                    "tileloadd tmm4, [{a} + {sa}*1]",
                    "tileloadd tmm6, [{b} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tileloadd tmm7, [{b} + {sb}*1 + 64]",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tileloadd tmm5, [{a} + {sa}*1 + 1024]",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a = in(reg) a,
                    b = in(reg) b,
                    sa = in(reg) a_stride,
                    sb = in(reg) b_stride,
                    options(nostack, readonly),
                );
                a = a.add(STEP);
                b = b.add(STEP);
            }
            // C tiles (rows, columns) halves (0,0), (0,16), (16,0), (16,16): into C itself, or
            // into the 32×32 buffer (row stride 128 bytes).
            let mut buf = std::mem::MaybeUninit::<[f32; MR * NR]>::uninit();
            let (out, stride, row16) = if direct {
                (c, c_stride, 16 * ldc)
            } else {
                (buf.as_mut_ptr() as *mut f32, 4 * NR, 16 * NR)
            };
            asm!(
                "tilestored [{o00} + {s}*1], tmm0",
                "tilestored [{o01} + {s}*1], tmm1",
                "tilestored [{o10} + {s}*1], tmm2",
                "tilestored [{o11} + {s}*1], tmm3",
                o00 = in(reg) out,
                o01 = in(reg) out.add(16),
                o10 = in(reg) out.add(row16),
                o11 = in(reg) out.add(row16 + 16),
                s = in(reg) stride,
                options(nostack),
            );
            if !direct {
                // SAFETY: the four tile stores wrote all 32×32 values of the buffer.
                store_block(buf.assume_init_ref(), c, ldc, mr, nr, load_c, bias)
            }
        }

        fn pack_a(a: &[f32], lda: usize, i0: usize, rows: usize, k: usize, _: bool, d: &mut [f32]) {
            debug_assert!(rows <= MR && d.len() >= Self::a_panel_words(k));
            debug_assert!(rows == 0 || a.len() >= (i0 + rows - 1) * lda + k);
            // SAFETY: this kernel runs only after `usable` (AMX, hence AVX-512 F/BW); the rows
            // lie inside `a` and `d` holds the panel (asserted above).
            unsafe { pack_a_tiles_t(a.as_ptr().wrapping_add(i0 * lda), lda, rows, k, d) }
        }

        unsafe fn pack_b(
            b: Weight<'_>,
            _n: usize,
            k: usize,
            j0: usize,
            nc: usize,
            p0: usize,
            kc: usize,
            out: &mut [f32],
        ) {
            pack_b_pairs_t(b, k, j0, nc, p0, kc, kc.next_multiple_of(KT) / 2, out)
        }

        unsafe fn gemv(
            a: &[f32],
            lda: usize,
            m: usize,
            b: Weight<'_>,
            k: usize,
            j0: usize,
            nj: usize,
            out: &mut [f32],
        ) {
            super::super::avx512::Avx512::gemv(a, lda, m, b, k, j0, nj, out)
        }
    }

    /// [`pack_a_tiles`] with AVX-512 (same panel, word for word): each row's 32 k values of a
    /// chunk are rounded and packed into one 64-byte tile row; rows past `rows` are zero.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW; `src` holds `rows` rows (`lda` apart) of `k` values, `dst` the
    /// panel.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub(super) unsafe fn pack_a_tiles_t(
        src: *const f32,
        lda: usize,
        rows: usize,
        k: usize,
        dst: &mut [f32],
    ) {
        use std::arch::x86_64::{__m512i, _mm512_setzero_si512, _mm512_storeu_si512};
        let out = dst.as_mut_ptr() as *mut __m512i;
        for chunk in 0..k.div_ceil(KT) {
            for i in 0..MR {
                let v = if i < rows {
                    pairs16(src.add(i * lda + chunk * KT), k - chunk * KT)
                } else {
                    _mm512_setzero_si512()
                };
                _mm512_storeu_si512(out.add(chunk * MR + i), v);
            }
        }
    }

    /// `iters` rounds of four `tdpbf16ps` on tiles that stay in the tile registers (zeros: the
    /// tile unit's rate does not depend on the values), as the AMX peak probe; returns the
    /// FLOPs done (16×16 outputs × 32 k values × 2 per instruction).
    ///
    /// # Safety
    /// [`usable`] returned true: the CPU has AMX-BF16 and Linux granted tile data.
    pub(in crate::cpu::gemm) unsafe fn peak_loop(iters: u64) -> f64 {
        let iters = iters.max(1);
        configure_tiles();
        asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "tilezero tmm4",
            "tilezero tmm5",
            "tilezero tmm6",
            "tilezero tmm7",
            "2:",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) iters => _,
            options(nostack),
        );
        (iters * 4 * 16 * 16 * 32 * 2) as f64
    }

    /// CPUID.(EAX=7, ECX=0): EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
    fn cpu_has_amx_bf16() -> bool {
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        leaf7.edx & (1 << 22) != 0 && leaf7.edx & (1 << 24) != 0
    }

    /// Asks Linux for permission to use tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`); false where the kernel refuses or predates it.
    fn request_tile_permission() -> bool {
        const SYS_ARCH_PRCTL: usize = 158;
        const ARCH_REQ_XCOMP_PERM: usize = 0x1023;
        const XFEATURE_XTILEDATA: usize = 18;
        let ret: isize;
        // SAFETY: a plain syscall with integer arguments; it touches no memory of ours.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL as isize => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        ret == 0
    }

    /// Whether AMX bf16 runs here, with the kernel's permission, *and* the hardware kernel
    /// agrees with [`AmxEmu`] on a small GEMM with awkward edges (checked once per process; a
    /// mismatch disables the path with a warning). `PHI_KERNELS_AMX=0` turns it off.
    pub(in crate::cpu::gemm) fn usable() -> bool {
        use std::sync::OnceLock;
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            if std::env::var("PHI_KERNELS_AMX").as_deref() == Ok("0")
                || !cfg!(target_os = "linux")
                || !Isa::Avx512.is_supported()
                || !cpu_has_amx_bf16()
                || !request_tile_permission()
            {
                return false;
            }
            let ok = super::super::bf16_pairs::agrees_with_twin::<Amx, AmxEmu>();
            if !ok {
                eprintln!(
                    "phi-kernels: the AMX GEMM kernel disagrees with its scalar twin on this \
                     CPU; bf16 products fall back to the next kernel"
                );
            }
            ok
        })
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::aligned;
    use super::super::avx512_bf16::tests::{awkward, bits, poisoned};
    use super::*;

    #[test]
    fn vector_tile_packer_matches_the_scalar_one() {
        if !Isa::Avx512.is_supported() {
            eprintln!("SKIPPED: no AVX-512 here");
            return;
        }
        let cases: [(usize, usize, usize); 5] = [
            (32, 1024, 1024),
            (17, 77, 80),
            (1, 1, 1),
            (31, 33, 40),
            (0, 64, 64),
        ];
        for (rows, k, lda) in cases {
            let a = awkward(rows.max(1) * lda, 5);
            let len = <AmxEmu as Microkernel>::a_panel_words(k);
            let (mut want, mut got) = (poisoned(len), poisoned(len));
            let (want, got) = (aligned(&mut want, len), aligned(&mut got, len));
            pack_a_tiles(&a, lda, 0, rows, k, want);
            // SAFETY: AVX-512 checked above; `a` holds the rows, the buffer the panel.
            unsafe { hw::pack_a_tiles_t(a.as_ptr(), lda, rows, k, got) };
            assert_eq!(bits(got), bits(want), "rows {rows} k {k}");
        }
    }
}
