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

#[test]
fn isa_env_override_rejects_unknown_names() {
    // The only test in this binary that touches the environment, and nothing here calls
    // `isa::active()`, so setting the variable cannot race another reader.
    std::env::set_var("PHI_KERNELS_ISA", "avx1024");
    let got = phi_kernels::isa::from_env();
    std::env::set_var("PHI_KERNELS_ISA", "scalar");
    let scalar = phi_kernels::isa::from_env();
    std::env::remove_var("PHI_KERNELS_ISA");
    assert!(
        matches!(got, Err(Error::UnknownIsa(ref s)) if s == "avx1024"),
        "{got:?}"
    );
    assert_eq!(scalar.unwrap(), Some(Isa::Scalar));
    assert_eq!(phi_kernels::isa::from_env().unwrap(), None);
}
