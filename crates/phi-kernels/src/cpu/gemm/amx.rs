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
//! [`AmxEmu`] is the plain twin (same packers, `tdpbf16ps` per element in scalar code): it runs
//! on any CPU, so the layout and driver are tested everywhere. The hardware kernel needs the
//! kernel's permission for tile data (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`,
//! Linux 5.16+) and is compared with the twin once per process before use ([`usable`]).
//! Not run on the dev VM (Skylake-SP has no AMX): verified there only through the twin and by
//! compilation.

use half::bf16;

use super::bf16_pairs::{dot_pair, pack_b_pairs};
use super::{Microkernel, KC};
use crate::{Isa, Weight};

const MR: usize = 32;
const NR: usize = super::bf16_pairs::NR;
/// k values per tile step (one A tile row: 64 bytes of bf16).
const KT: usize = 32;
const _: () = assert!(NR == 32 && KC.is_multiple_of(KT));

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

/// The parts both AMX kernels share: layout and packers.
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
            let mut acc = [0f32; MR * NR];
            let out = acc.as_mut_ptr();
            // Tile configuration is per thread; loading it per call keeps this self-contained
            // (a few dozen cycles against the 128 tdpbf16ps of a KC = 1024 slice).
            asm!(
                "ldtilecfg [{cfg}]",
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                cfg = in(reg) &CONFIG as *const TileConfig,
                options(nostack),
            );
            let (a_stride, b_stride) = (64usize, 4 * NR);
            for chunk in 0..kc.div_ceil(KT) {
                let a0 = (ap as *const u32).add(chunk * MR * KT / 2);
                let a1 = a0.add(16 * KT / 2);
                let b0 = (bp as *const u32).add(chunk * (KT / 2) * NR);
                let b1 = b0.add(16);
                asm!(
                    "tileloadd tmm4, [{a0} + {sa}*1]",
                    "tileloadd tmm5, [{a1} + {sa}*1]",
                    "tileloadd tmm6, [{b0} + {sb}*1]",
                    "tileloadd tmm7, [{b1} + {sb}*1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0,
                    a1 = in(reg) a1,
                    b0 = in(reg) b0,
                    b1 = in(reg) b1,
                    sa = in(reg) a_stride,
                    sb = in(reg) b_stride,
                    options(nostack, readonly),
                );
            }
            // C tiles into the 32×32 block (row stride 128 bytes): (rows, columns) halves
            // (0,0), (0,16), (16,0), (16,16).
            asm!(
                "tilestored [{o00} + {s}*1], tmm0",
                "tilestored [{o01} + {s}*1], tmm1",
                "tilestored [{o10} + {s}*1], tmm2",
                "tilestored [{o11} + {s}*1], tmm3",
                "tilerelease",
                o00 = in(reg) out,
                o01 = in(reg) out.add(16),
                o10 = in(reg) out.add(16 * NR),
                o11 = in(reg) out.add(16 * NR + 16),
                s = in(reg) 4 * NR,
                options(nostack),
            );
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
            super::super::avx512::Avx512::gemv(a, lda, m, b, k, j0, nj, out)
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
        asm!(
            "ldtilecfg [{cfg}]",
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
            "tilerelease",
            cfg = in(reg) &CONFIG as *const TileConfig,
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
