//! The blocked GEMM with 64-column packed B blocks (machines with an L2 under 1 MiB).

mod common;

#[test]
fn gemm_with_64_column_blocks() {
    common::gemm_at_block_width("64");
}
