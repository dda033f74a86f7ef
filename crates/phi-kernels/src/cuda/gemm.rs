//! GEMM and decode GEMV with bias / activation / residual epilogues (`kernels/gemm.cu`,
//! `kernels/gemv.cu`): `C = act(A·Bᵀ + bias) + residual`, A `[m, k]` (rows `lda` apart), B a
//! weight `[n, k]` as `nn.Linear` stores it, C `[m, n]` (rows `ldc` apart). One dispatch
//! point: `m <= GEMV_MAX_M` streams B once (decode), larger `m` tiles on tensor cores.

use super::{check_len, int, require, require_aligned, Arg, Device, DevicePtr, Family};
use crate::cpu::Activation;
use crate::Result;
use half::bf16;

/// Up to this many rows of A the GEMV kernel runs (as on the CPU).
pub const GEMV_MAX_M: usize = 4;

// From the launch lines in kernels/gemm.cu and kernels/gemv.cu.
const GEMM_BLOCK: u32 = 256;
const GEMM_BM: usize = 128;
const GEMM_BN: usize = 128;
const GEMM_SMEM: u32 = 3 * (128 + 128) * 32 * 2;
const GEMV_BLOCK: u32 = 256;
const GEMV_COLS_PER_BLOCK: usize = 16;
const GEMV_SMEM: u32 = 0;

/// The epilogue of one product.
#[derive(Copy, Clone)]
pub struct Epilogue<'a, R> {
    /// f32 bias, `n` values.
    pub bias: Option<&'a dyn DevicePtr<f32>>,
    pub activation: Activation,
    /// Added last: `C = act(A·Bᵀ + bias) + residual` (for a residual that is C itself, use
    /// [`gemm_bf16`]'s `accumulate`).
    pub residual: Option<&'a dyn DevicePtr<R>>,
}

impl<R> Default for Epilogue<'_, R> {
    fn default() -> Self {
        Epilogue {
            bias: None,
            activation: Activation::Identity,
            residual: None,
        }
    }
}

fn act_code(a: Activation) -> i32 {
    match a {
        Activation::Identity => 0,
        Activation::QuickGelu => 1,
        Activation::GeluErf => 2,
    }
}

#[allow(clippy::too_many_arguments)]
fn launch<R>(
    dev: &Device,
    names: (&'static str, &'static str),
    a: &impl DevicePtr<bf16>,
    lda: usize,
    b: &impl DevicePtr<bf16>,
    c_ptr: u64,
    c_len: usize,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    ep: &Epilogue<'_, R>,
    c_is_residual: bool,
) -> Result<()> {
    let gemv = m <= GEMV_MAX_M;
    let name = if gemv { names.1 } else { names.0 };
    require(
        name,
        k.is_multiple_of(8) && lda.is_multiple_of(8) && lda >= k && ldc >= n,
        || format!("k {k} and lda {lda} must be multiples of 8, lda >= k, ldc {ldc} >= n {n}"),
    )?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    check_len(name, "A", a, (m - 1) * lda + k)?;
    check_len(name, "B", b, n * k)?;
    let need_c = (m - 1) * ldc + n;
    if c_len < need_c {
        return Err(crate::Error::CudaArgs {
            kernel: name,
            msg: format!("C holds {c_len} values, needs {need_c}"),
        });
    }
    if let Some(bias) = ep.bias {
        check_len(name, "bias", bias, n)?;
    }
    if let Some(r) = ep.residual {
        check_len(name, "residual", r, need_c)?;
    }
    let (pa, pb) = (dev.ptr(a), dev.ptr(b));
    require_aligned(name, &[("A", pa), ("B", pb)])?;
    let residual = if c_is_residual {
        c_ptr
    } else {
        ep.residual.map_or(0, |x| dev.ptr(x))
    };
    let args = [
        Arg::Ptr(pa),
        Arg::Ptr(pb),
        Arg::Ptr(ep.bias.map_or(0, |x| dev.ptr(x))),
        Arg::Ptr(residual),
        Arg::Ptr(c_ptr),
        Arg::I32(int(name, "m", m)?),
        Arg::I32(int(name, "n", n)?),
        Arg::I32(int(name, "k", k)?),
        Arg::I32(int(name, "lda", lda)?),
        Arg::I32(int(name, "ldc", ldc)?),
        Arg::I32(act_code(ep.activation)),
    ];
    if gemv {
        let grid = (n.div_ceil(GEMV_COLS_PER_BLOCK) as u32, 1, 1);
        dev.launch(Family::Gemv, name, grid, GEMV_BLOCK, GEMV_SMEM, &args)
    } else {
        let grid = (n.div_ceil(GEMM_BN) as u32, m.div_ceil(GEMM_BM) as u32, 1);
        dev.launch(Family::Gemm, name, grid, GEMM_BLOCK, GEMM_SMEM, &args)
    }
}

/// bf16 output; `accumulate` adds C's previous contents (a residual add in place), in
/// which case `ep.residual` must be `None`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
    dev: &Device,
    a: &impl DevicePtr<bf16>,
    lda: usize,
    b: &impl DevicePtr<bf16>,
    c: &mut impl DevicePtr<bf16>,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    accumulate: bool,
    ep: &Epilogue<'_, bf16>,
) -> Result<()> {
    require("gemm_bf16", !(accumulate && ep.residual.is_some()), || {
        "accumulate and a separate residual cannot be combined".into()
    })?;
    let c_ptr = dev.ptr(c);
    // C += A·Bᵀ: the kernels read each residual element before writing the same element.
    launch(
        dev,
        ("gemm_bf16", "gemv_bf16"),
        a,
        lda,
        b,
        c_ptr,
        c.len(),
        ldc,
        m,
        n,
        k,
        ep,
        accumulate,
    )
}

/// f32 output (the logits).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_f32(
    dev: &Device,
    a: &impl DevicePtr<bf16>,
    lda: usize,
    b: &impl DevicePtr<bf16>,
    c: &mut impl DevicePtr<f32>,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    ep: &Epilogue<'_, f32>,
) -> Result<()> {
    let c_ptr = dev.ptr(c);
    launch(
        dev,
        ("gemm_bf16_f32", "gemv_bf16_f32"),
        a,
        lda,
        b,
        c_ptr,
        c.len(),
        ldc,
        m,
        n,
        k,
        ep,
        false,
    )
}
