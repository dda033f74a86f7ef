//! The blocked GEMM with 128-column packed B blocks (machines with an L2 of 1 MiB or more).

mod common;

#[test]
fn gemm_with_128_column_blocks() {
    common::gemm_at_block_width("128");
}
