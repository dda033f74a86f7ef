//! The CUDA backend: our own kernels from `kernels/*.cu`, loaded through the driver API.
//!
//! `cargo xtask kernels` compiles each source to PTX (compute_80) and to cubins for sm_80, sm_86,
//! sm_89 and sm_90a; the generated files are committed and embedded here, so building needs no
//! CUDA toolkit. At run time [`Device::new`] first checks that the driver library can be opened
//! (cudarc panics otherwise), then loads each kernel family lazily, once per device: the cubin
//! for the device's architecture when there is one, else the PTX, which the driver JIT-compiles.
//!
//! Storage is bf16 with f32 accumulation (f32 where stated). Every launcher checks its buffer
//! sizes and the kernel's requirements and returns [`Error::CudaArgs`] instead of launching out
//! of bounds; every driver call and launch is checked ([`Error::Cuda`]).
//!
//! One stream per device, with cudarc's multi-stream event tracking turned off: the engine is
//! single-stream, and the launch order on that stream is the only ordering needed.

mod activation;
mod attention;
mod cast;
mod embedding;
mod gemm;
mod kv_cache;
mod merge;
mod nn;
mod norm;
mod rope;
mod sampling;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaStream, DeviceRepr, DeviceSlice, LaunchConfig,
    PushKernelArg, ValidAsZeroBits,
};
/// Device buffers and views of them: every launcher takes any of these (`&impl DevicePtr<T>`
/// for inputs, `&mut impl DevicePtr<T>` for outputs), so a row or column range of a larger
/// buffer is passed as `buf.slice(range)` / `buf.slice_mut(range)`.
pub use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr};
use cudarc::nvrtc::Ptx;
pub use half::bf16;

pub use activation::{add_bf16, gelu_bf16, quick_gelu_bf16, silu_mul_bf16};
pub use attention::{flash_attn_bf16, flash_decode_bf16, AttnShape};
pub use cast::{cast_bf16_f32, cast_f32_bf16};
pub use embedding::{embedding_bf16, scatter_rows_bf16};
pub use gemm::{gemm_bf16, gemm_bf16_f32, Epilogue, GEMV_MAX_M};
pub use kv_cache::kv_cache_write_bf16;
pub use merge::merge_2x2_bf16;
pub use nn::{upload_f32_as_bf16, upload_weight, DeviceLayerNorm, DeviceLinear, DeviceRmsNorm};
pub use norm::{layer_norm_bf16, rms_norm_bf16};
pub use rope::rope_bf16;
pub use sampling::{argmax_f32, sample_f32};

use crate::{Error, Result};

/// The kernel families, one per `kernels/<name>.cu` and one loaded module each.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Family {
    Activation,
    Attention,
    Cast,
    Embedding,
    Gemm,
    Gemv,
    KvCache,
    Merge,
    Norm,
    Rope,
    Sampling,
}

/// The generated images of one family: PTX text and a cubin per architecture.
struct Images {
    ptx: &'static str,
    cubins: [(&'static str, &'static [u8]); 4],
}

macro_rules! images {
    ($name:literal) => {
        Images {
            ptx: include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../kernels/ptx/",
                $name,
                ".ptx"
            )),
            cubins: [
                (
                    "sm_80",
                    include_bytes!(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/../../kernels/cubin/sm_80/",
                        $name,
                        ".cubin"
                    )),
                ),
                (
                    "sm_86",
                    include_bytes!(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/../../kernels/cubin/sm_86/",
                        $name,
                        ".cubin"
                    )),
                ),
                (
                    "sm_89",
                    include_bytes!(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/../../kernels/cubin/sm_89/",
                        $name,
                        ".cubin"
                    )),
                ),
                (
                    "sm_90a",
                    include_bytes!(concat!(
                        env!("CARGO_MANIFEST_DIR"),
                        "/../../kernels/cubin/sm_90a/",
                        $name,
                        ".cubin"
                    )),
                ),
            ],
        }
    };
}

impl Family {
    fn images(self) -> Images {
        match self {
            Family::Activation => images!("activation"),
            Family::Attention => images!("attention"),
            Family::Cast => images!("cast"),
            Family::Embedding => images!("embedding"),
            Family::Gemm => images!("gemm"),
            Family::Gemv => images!("gemv"),
            Family::KvCache => images!("kv_cache"),
            Family::Merge => images!("merge"),
            Family::Norm => images!("norm"),
            Family::Rope => images!("rope"),
            Family::Sampling => images!("sampling"),
        }
    }
}

/// The cubin target for a compute capability: exact architecture matches only (sm_90a for
/// Hopper, whose wgmma code runs nowhere else); anything else takes the PTX.
fn cubin_arch(cc: (i32, i32)) -> Option<&'static str> {
    match cc {
        (8, 0) => Some("sm_80"),
        (8, 6) => Some("sm_86"),
        (8, 9) => Some("sm_89"),
        (9, 0) => Some("sm_90a"),
        _ => None,
    }
}

fn cuda_err(what: impl Into<String>) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    let what = what.into();
    move |e| Error::Cuda {
        what,
        msg: e.to_string(),
    }
}

/// One GPU, its stream and its lazily loaded kernel modules.
pub struct Device {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    cc: (i32, i32),
    modules: Mutex<HashMap<Family, Arc<CudaModule>>>,
    functions: Mutex<HashMap<&'static str, CudaFunction>>,
}

impl Device {
    /// Opens GPU `ordinal`. [`Error::NoGpu`] when the driver library is missing (checked before
    /// any driver call, which would panic) or there is no such device.
    pub fn new(ordinal: usize) -> Result<Device> {
        // SAFETY: only tries to open the library by name.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoGpu(
                "the CUDA driver library (libcuda) was not found".into(),
            ));
        }
        let count = CudaContext::device_count().map_err(|e| Error::NoGpu(e.to_string()))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoGpu(format!(
                "device {ordinal} asked for, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(cuda_err("cuCtxCreate"))?;
        // SAFETY: this engine uses one stream per device, so the per-buffer events that order
        // several streams are never needed.
        unsafe { ctx.disable_event_tracking() };
        let cc = ctx
            .compute_capability()
            .map_err(cuda_err("compute capability"))?;
        let stream = ctx.default_stream();
        Ok(Device {
            ctx,
            stream,
            cc,
            modules: Mutex::default(),
            functions: Mutex::default(),
        })
    }

    /// The device's name and compute capability, e.g. "NVIDIA H100 80GB HBM3 (sm_90)".
    pub fn describe(&self) -> String {
        let name = self.ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        format!("{name} (sm_{}{})", self.cc.0, self.cc.1)
    }

    pub fn compute_capability(&self) -> (i32, i32) {
        self.cc
    }

    /// Which image a family loads from on this device: "sm_90a cubin" or "PTX".
    pub fn image_kind(&self) -> String {
        cubin_arch(self.cc).map_or("PTX (JIT)".into(), |a| format!("{a} cubin"))
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.stream
            .clone_htod(host)
            .map_err(cuda_err(format!("upload of {} values", host.len())))
    }

    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream
            .clone_dtoh(dev)
            .map_err(cuda_err(format!("download of {} values", dev.len())))
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(len)
            .map_err(cuda_err(format!("allocation of {len} values")))
    }

    /// Waits for every launch so far; surfaces asynchronous kernel faults.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(cuda_err("synchronize"))
    }

    /// Device-to-device copy of `src` into the front of `dst` (the bandwidth ceiling benches
    /// compare against).
    pub fn copy<T>(&self, src: &CudaSlice<T>, dst: &mut CudaSlice<T>) -> Result<()> {
        if dst.len() < src.len() {
            return Err(Error::CudaArgs {
                kernel: "memcpy_dtod",
                msg: format!("destination {} < source {}", dst.len(), src.len()),
            });
        }
        self.stream
            .memcpy_dtod(src, dst)
            .map_err(cuda_err("memcpy_dtod"))
    }

    /// Seconds per call of `f` on the device, timed with events around `iters` calls after one
    /// warm-up call.
    pub fn time(&self, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        use cudarc::driver::sys::CUevent_flags;
        f()?;
        let start = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("event"))?;
        for _ in 0..iters.max(1) {
            f()?;
        }
        let end = self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(cuda_err("event"))?;
        end.synchronize().map_err(cuda_err("event synchronize"))?;
        let ms = start.elapsed_ms(&end).map_err(cuda_err("event elapsed"))?;
        Ok(ms as f64 / 1e3 / iters.max(1) as f64)
    }

    /// The raw device address of a buffer or view (kernel arguments).
    pub(crate) fn ptr<T>(&self, s: &(impl DevicePtr<T> + ?Sized)) -> u64 {
        s.device_ptr(&self.stream).0
    }

    /// The module of `family`, loaded on first use.
    fn module(&self, family: Family) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(&family) {
            return Ok(m.clone());
        }
        let images = family.images();
        let image = match cubin_arch(self.cc)
            .and_then(|arch| images.cubins.iter().find(|(a, _)| *a == arch))
        {
            Some((_, bytes)) => Ptx::from_binary(bytes.to_vec()),
            None => Ptx::from_src(images.ptx),
        };
        let m = self
            .ctx
            .load_module(image)
            .map_err(cuda_err(format!("loading the {family:?} kernels")))?;
        modules.insert(family, m.clone());
        Ok(m)
    }

    /// The entry point `name` of `family`; `dynamic_smem` above 48 KiB raises the function's
    /// limit once.
    fn function(
        &self,
        family: Family,
        name: &'static str,
        dynamic_smem: u32,
    ) -> Result<CudaFunction> {
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
        {
            return Ok(f.clone());
        }
        let f = self
            .module(family)?
            .load_function(name)
            .map_err(cuda_err(format!("kernel {name}")))?;
        if dynamic_smem > 48 * 1024 {
            use cudarc::driver::sys::CUfunction_attribute_enum as A;
            f.set_attribute(
                A::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic_smem as i32,
            )
            .map_err(cuda_err(format!(
                "{name}: dynamic shared memory {dynamic_smem} B"
            )))?;
        }
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, f.clone());
        Ok(f)
    }

    /// Launches `name` with `args` in order (see [`Arg`]).
    pub(crate) fn launch(
        &self,
        family: Family,
        name: &'static str,
        grid: (u32, u32, u32),
        block: u32,
        dynamic_smem: u32,
        args: &[Arg],
    ) -> Result<()> {
        if grid.0 == 0 || grid.1 == 0 || grid.2 == 0 {
            return Ok(()); // nothing to do (an empty launch is an error to the driver)
        }
        let f = self.function(family, name, dynamic_smem)?;
        let mut b = self.stream.launch_builder(&f);
        for a in args {
            match a {
                Arg::Ptr(p) => b.arg(p),
                Arg::I32(v) => b.arg(v),
                Arg::I64(v) => b.arg(v),
                Arg::F32(v) => b.arg(v),
            };
        }
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: dynamic_smem,
        };
        // SAFETY: each launcher checked that every buffer holds what the kernel touches for
        // these sizes, and passes the arguments in the order of the kernel's signature.
        unsafe { b.launch(cfg) }.map_err(cuda_err(format!("launch of {name}")))?;
        Ok(())
    }
}

/// One kernel argument: a device pointer (0 for a null optional), or a scalar.
#[derive(Copy, Clone, Debug)]
pub(crate) enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
}

/// Fails unless `buf` holds at least `need` values.
pub(crate) fn check_len<T>(
    kernel: &'static str,
    what: &str,
    buf: &(impl DeviceSlice<T> + ?Sized),
    need: usize,
) -> Result<()> {
    if buf.len() < need {
        return Err(Error::CudaArgs {
            kernel,
            msg: format!("{what} holds {} values, needs {need}", buf.len()),
        });
    }
    Ok(())
}

/// Fails unless `cond`, with `msg` naming the requirement.
pub(crate) fn require(
    kernel: &'static str,
    cond: bool,
    msg: impl FnOnce() -> String,
) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::CudaArgs { kernel, msg: msg() })
    }
}

/// Fails unless every device address in `ptrs` is 16-byte aligned (the kernels' vector loads and
/// `cp.async`): allocations are, a view at an element offset may not be.
pub(crate) fn require_aligned(kernel: &'static str, ptrs: &[(&str, u64)]) -> Result<()> {
    for (what, p) in ptrs {
        require(kernel, p % 16 == 0, || {
            format!("{what} starts at a device address that is not 16-byte aligned (a view at an odd offset?)")
        })?;
    }
    Ok(())
}

/// `i32` from a size, or an error naming it (the kernels index with 32-bit ints).
pub(crate) fn int(kernel: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::CudaArgs {
        kernel,
        msg: format!("{what} = {v} does not fit the kernel's 32-bit index"),
    })
}
