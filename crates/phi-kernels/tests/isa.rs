//! Instruction-set selection: names parse, unknown names are errors (not panics), and the
//! detected path is among the available ones.

use phi_kernels::{Error, Isa};

#[test]
fn isa_parse_known_names() {
    for isa in Isa::ALL {
        assert_eq!(Isa::parse(isa.name()).unwrap(), isa);
    }
    assert_eq!(Isa::parse(" AVX512 ").unwrap(), Isa::Avx512);
}

#[test]
fn isa_parse_rejects_unknown_names_without_panicking() {
    for bad in ["", "avx", "sse4", "neon", "avx-512", "scalar2", "💥"] {
        match Isa::parse(bad) {
            Err(Error::UnknownIsa(name)) => assert_eq!(name, bad.trim().to_ascii_lowercase()),
            other => panic!("{bad:?} parsed as {other:?}"),
        }
    }
}

#[test]
fn isa_detect_is_available() {
    let available = Isa::available();
    assert!(available.contains(&Isa::Scalar));
    assert!(available.contains(&Isa::detect()));
    assert!(available.iter().all(|i| i.is_supported()));
}
