//! Instruction-set selection: detected once per process, overridable with `PHI_KERNELS_ISA`.

use std::sync::OnceLock;

use crate::{Error, Result};

#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, one lane. Always available.
    Scalar,
    /// AVX2 + FMA, 8 f32 lanes.
    Avx2,
    /// AVX-512F (+BW/VL), 16 f32 lanes.
    Avx512,
}

impl Isa {
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    pub fn parse(s: &str) -> Result<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" => Ok(Isa::Scalar),
            "avx2" => Ok(Isa::Avx2),
            "avx512" => Ok(Isa::Avx512),
            other => Err(Error::UnknownIsa(other.to_string())),
        }
    }

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => {
                is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every path this CPU can run, slowest first (what tests iterate over).
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
    }

    /// The best path this CPU supports.
    pub fn detect() -> Isa {
        if Isa::Avx512.is_supported() {
            Isa::Avx512
        } else if Isa::Avx2.is_supported() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }
}

static ACTIVE: OnceLock<Isa> = OnceLock::new();

/// Reads `PHI_KERNELS_ISA`: `Ok(None)` when unset, an error when unknown or unsupported here.
pub fn from_env() -> Result<Option<Isa>> {
    match std::env::var("PHI_KERNELS_ISA") {
        Ok(s) if !s.trim().is_empty() => {
            let isa = Isa::parse(&s)?;
            if !isa.is_supported() {
                return Err(Error::IsaUnavailable(isa));
            }
            Ok(Some(isa))
        }
        _ => Ok(None),
    }
}

/// The path every dispatched op uses, chosen once: `PHI_KERNELS_ISA` if set and valid, else the
/// best the CPU has. An invalid override is reported by [`init`]; here it falls back to detection.
pub fn active() -> Isa {
    *ACTIVE.get_or_init(|| from_env().ok().flatten().unwrap_or_else(Isa::detect))
}

/// Validates `PHI_KERNELS_ISA` and fixes the active path; binaries call this at start-up so a bad
/// override is an error instead of a silent fallback.
pub fn init() -> Result<Isa> {
    let isa = from_env()?.unwrap_or_else(Isa::detect);
    Ok(*ACTIVE.get_or_init(|| isa))
}

/// The first core's L2 cache in bytes, from Linux's sysfs cache description
/// (`/sys/devices/system/cpu/cpu0/cache/index*/{level,type,size}`); `None` where that is missing
/// or unreadable (the GEMM then keeps its default blocking).
pub fn l2_cache_bytes() -> Option<usize> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    (0..8).find_map(|i| {
        let read = |f: &str| std::fs::read_to_string(dir.join(format!("index{i}/{f}"))).ok();
        let level = read("level")?;
        let kind = read("type")?;
        if level.trim() != "2" || kind.trim() == "Instruction" {
            return None;
        }
        parse_cache_size(&read("size")?)
    })
}

/// `"512K"`, `"1024K"`, `"2M"` or a plain byte count, as sysfs writes cache sizes.
fn parse_cache_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let n: usize = digits.parse().ok()?;
    let scale = match unit.trim() {
        "" => 1,
        "K" | "KB" | "KiB" => 1 << 10,
        "M" | "MB" | "MiB" => 1 << 20,
        _ => return None,
    };
    Some(n * scale)
}

#[cfg(test)]
mod cache_tests {
    use super::parse_cache_size;

    #[test]
    fn sysfs_cache_sizes_parse() {
        assert_eq!(parse_cache_size("512K\n"), Some(512 << 10));
        assert_eq!(parse_cache_size("1024K"), Some(1 << 20));
        assert_eq!(parse_cache_size("2M"), Some(2 << 20));
        assert_eq!(parse_cache_size("65536"), Some(65536));
        assert_eq!(parse_cache_size("12Q"), None);
        assert_eq!(parse_cache_size(""), None);
    }
}
