//! A safetensors checkpoint: one file, or the shards listed by a Hugging Face
//! `model.safetensors.index.json`. Memory-mapped by default (nothing is read or copied until a
//! tensor is used), or read once into memory ([`Residency`]); a [`Tensor`] keeps its shard's
//! bytes alive and hands out a typed [`Weight`] view. Either way the tensors keep the dtype
//! they are stored in.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::{DType, Error, HugeBuf, Result, Weight};

/// Where a checkpoint's bytes live.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum Residency {
    /// Memory-mapped from the files: opening is instant, pages come in as tensors are used
    /// and stay shared with the page cache (what the GPU upload wants).
    #[default]
    Mapped,
    /// Read once into anonymous memory advised for transparent huge pages. On the dev VM the
    /// decode GEMV streamed such memory at 19-22 GB/s against 15.5-18.5 GB/s from a mapping of
    /// the same (cached) file, so CPU decoding, which reads every weight per token, prefers
    /// it; opening then costs a read of the whole checkpoint.
    Resident,
}

/// Bytes of one shard: mapped, read into anonymous memory, or (for tests and misaligned
/// tensors) owned and 8-byte aligned.
enum Storage {
    Mapped(Mmap),
    /// The file's bytes in anonymous memory.
    Resident(HugeBuf<u8>),
    Owned(Vec<u64>),
}

impl Storage {
    fn bytes(&self) -> &[u8] {
        match self {
            Storage::Mapped(m) => m,
            Storage::Resident(m) => m,
            Storage::Owned(v) => bytemuck::cast_slice(v),
        }
    }

    /// The whole of `file` (already open) in the given residency.
    fn load(f: &File, file: &Path, residency: Residency) -> Result<Storage> {
        if residency == Residency::Mapped {
            // SAFETY: the file is mapped read-only; we assume no one truncates it while mapped,
            // as every mmap-based model loader does.
            let mmap = unsafe { Mmap::map(f) }.map_err(io_err(file))?;
            return Ok(Storage::Mapped(mmap));
        }
        let len = f.metadata().map_err(io_err(file))?.len() as usize;
        let mut mem = HugeBuf::<u8>::zeroed(len).map_err(io_err(file))?;
        read_into(f, &mut mem).map_err(io_err(file))?;
        Ok(Storage::Resident(mem))
    }
}

/// Reads the file from its start into `dst` (its whole length). On Unix, positioned reads of
/// 64 MiB chunks on the rayon pool: copying out of the page cache is bound by one core's copy
/// rate, so the cores share it.
fn read_into(f: &File, dst: &mut [u8]) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use rayon::prelude::*;
        use std::os::unix::fs::FileExt;
        const CHUNK: usize = 64 << 20;
        dst.par_chunks_mut(CHUNK)
            .enumerate()
            .try_for_each(|(i, chunk)| f.read_exact_at(chunk, (i * CHUNK) as u64))
    }
    #[cfg(not(unix))]
    {
        use std::io::{Read, Seek};
        let mut f = f;
        f.seek(std::io::SeekFrom::Start(0))?;
        f.read_exact(dst)
    }
}

/// One tensor of a checkpoint (or an owned tensor made in memory).
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    /// Byte offset of the first element within `storage`.
    offset: usize,
    len: usize,
    dtype: DType,
    shape: Vec<usize>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish()
    }
}

impl Tensor {
    /// An owned f32 tensor (tests, synthetic weights).
    pub fn from_f32(values: Vec<f32>, shape: &[usize]) -> Tensor {
        assert_eq!(
            values.len(),
            shape.iter().product::<usize>(),
            "Tensor::from_f32: shape does not match length"
        );
        let len = values.len();
        let mut words = vec![0u64; len.div_ceil(2)];
        bytemuck::cast_slice_mut::<u64, f32>(&mut words)[..len].copy_from_slice(&values);
        Tensor {
            storage: Arc::new(Storage::Owned(words)),
            offset: 0,
            len,
            dtype: DType::F32,
            shape: shape.to_vec(),
        }
    }

    /// The same values rounded to bf16 in an owned tensor (a clone when already bf16): for
    /// f32/f16 checkpoints run with bf16 products, converted once at load.
    pub fn to_bf16(&self) -> Tensor {
        if self.dtype == DType::BF16 {
            return self.clone();
        }
        let view = self.view();
        let mut words = vec![0u64; self.len.div_ceil(4)];
        let dst = &mut bytemuck::cast_slice_mut::<u64, bf16>(&mut words)[..self.len];
        for (i, d) in dst.iter_mut().enumerate() {
            *d = bf16::from_f32(view.get(i));
        }
        Tensor {
            storage: Arc::new(Storage::Owned(words)),
            offset: 0,
            len: self.len,
            dtype: DType::BF16,
            shape: self.shape.clone(),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements in their storage dtype.
    pub fn view(&self) -> Weight<'_> {
        let bytes = &self.storage.bytes()[self.offset..self.offset + self.len * self.dtype.size()];
        // Alignment was checked (or fixed by copying) when the tensor was made.
        match self.dtype {
            DType::F32 => Weight::F32(bytemuck::cast_slice::<u8, f32>(bytes)),
            DType::BF16 => Weight::Bf16(bytemuck::cast_slice::<u8, bf16>(bytes)),
            DType::F16 => Weight::F16(bytemuck::cast_slice::<u8, f16>(bytes)),
        }
    }

    /// The elements widened to an owned f32 vector (small tensors: norms, biases).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.view().to_f32_vec()
    }
}

struct Shard {
    path: PathBuf,
    storage: Arc<Storage>,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
}

struct Entry {
    shard: usize,
    /// `Err(name)` for dtypes no kernel reads (I64 buffers such as `position_ids`): kept so that
    /// opening works, refused when the tensor is asked for.
    dtype: std::result::Result<DType, String>,
    shape: Vec<usize>,
    /// Byte range within the shard's data section.
    begin: usize,
    end: usize,
}

/// The tensors of a model directory (or of one `.safetensors` file), mapped, not loaded.
pub struct Checkpoint {
    shards: Vec<Shard>,
    entries: HashMap<String, Entry>,
    /// Folder or file the checkpoint was opened from, for error messages.
    origin: PathBuf,
    /// The precision of the products of the layers built from this checkpoint (see
    /// [`Checkpoint::with_precision`]).
    precision: DType,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Checkpoint {
    /// Opens `path`: a `.safetensors` file, or a directory holding `model.safetensors.index.json`
    /// (sharded) or `model.safetensors`.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        Self::open_with(path, Residency::Mapped)
    }

    /// [`Checkpoint::open`], with the bytes held as `residency` says.
    pub fn open_with(path: &Path, residency: Residency) -> Result<Checkpoint> {
        if path.is_file() {
            return Self::open_files(path, &[path.to_path_buf()], residency);
        }
        if !path.exists() {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no such file or directory",
                ),
            });
        }
        let index = path.join("model.safetensors.index.json");
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::BadIndex {
                    path: index.clone(),
                    msg: e.to_string(),
                })?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::BadIndex {
                    path: index.clone(),
                    msg: "no `weight_map` object".into(),
                })?;
            let mut files: Vec<PathBuf> = Vec::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| Error::BadIndex {
                    path: index.clone(),
                    msg: format!("`{name}` does not map to a file name"),
                })?;
                let f = path.join(file);
                if !files.contains(&f) {
                    files.push(f);
                }
            }
            files.sort();
            let ckpt = Self::open_files(path, &files, residency)?;
            for name in map.keys() {
                if !ckpt.entries.contains_key(name) {
                    return Err(Error::BadIndex {
                        path: index.clone(),
                        msg: format!("`{name}` is listed but not present in its shard"),
                    });
                }
            }
            return Ok(ckpt);
        }
        let single = path.join("model.safetensors");
        if single.is_file() {
            return Self::open_files(path, &[single], residency);
        }
        Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "neither model.safetensors.index.json nor model.safetensors found",
            ),
        })
    }

    fn open_files(origin: &Path, files: &[PathBuf], residency: Residency) -> Result<Checkpoint> {
        let mut shards = Vec::new();
        let mut entries = HashMap::new();
        for (si, file) in files.iter().enumerate() {
            let f = File::open(file).map_err(io_err(file))?;
            let mut storage = Storage::load(&f, file, residency)?;
            let (n, meta) =
                SafeTensors::read_metadata(storage.bytes()).map_err(|e| Error::BadSafetensors {
                    path: file.clone(),
                    msg: e.to_string(),
                })?;
            let data_start = 8 + n;
            let mut misaligned = false;
            let mut shard_entries = Vec::new();
            for (name, info) in meta.tensors() {
                let dtype = match info.dtype {
                    Dtype::F32 => Ok(DType::F32),
                    Dtype::BF16 => Ok(DType::BF16),
                    Dtype::F16 => Ok(DType::F16),
                    other => Err(format!("{other:?}")),
                };
                let (begin, end) = info.data_offsets;
                if let Ok(dt) = dtype {
                    if (data_start + begin) % dt.size() != 0 {
                        misaligned = true;
                    }
                }
                shard_entries.push((
                    name,
                    Entry {
                        shard: si,
                        dtype,
                        shape: info.shape.clone(),
                        begin,
                        end,
                    },
                ));
            }
            if misaligned {
                // Rare (old writers did not pad the header): copy the shard once into aligned
                // memory rather than reading unaligned values in every kernel.
                let bytes = storage.bytes();
                let mut words = vec![0u64; bytes.len().div_ceil(8)];
                bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()]
                    .copy_from_slice(bytes);
                // Shift so that the data section starts 8-byte aligned.
                let shift = (8 - data_start % 8) % 8;
                if shift != 0 {
                    let mut shifted = vec![0u64; (bytes.len() + shift).div_ceil(8)];
                    bytemuck::cast_slice_mut::<u64, u8>(&mut shifted)[shift..shift + bytes.len()]
                        .copy_from_slice(bytes);
                    words = shifted;
                }
                storage = Storage::Owned(words);
                shards.push(Shard {
                    path: file.clone(),
                    storage: Arc::new(storage),
                    data_start: data_start + shift,
                });
            } else {
                shards.push(Shard {
                    path: file.clone(),
                    storage: Arc::new(storage),
                    data_start,
                });
            }
            for (name, e) in shard_entries {
                entries.insert(name, e);
            }
        }
        Ok(Checkpoint {
            shards,
            entries,
            origin: origin.to_path_buf(),
            precision: DType::F32,
        })
    }

    /// The shard file holding `name`.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.entries
            .get(name)
            .map(|e| self.shards[e.shard].path.as_path())
    }

    /// Sets the precision that [`Linear`](crate::Linear) layers loaded from here multiply in:
    /// `F32` (default; weights of any dtype widen exactly) or `BF16` (activations rounded to bf16
    /// at each GEMM, weights used as stored in bf16 or rounded once at load, f32 accumulation).
    pub fn with_precision(mut self, precision: DType) -> Result<Checkpoint> {
        if precision == DType::F16 {
            return Err(Error::Unsupported(format!(
                "{}: compute precision f16 (use f32 or bf16)",
                self.origin.display()
            )));
        }
        self.precision = precision;
        Ok(self)
    }

    pub fn precision(&self) -> DType {
        self.precision
    }

    /// Where the checkpoint was opened from.
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(|s| s.as_str()).collect();
        v.sort();
        v
    }

    /// The shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The tensor `name`, whatever its shape.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let e = self.entries.get(name).ok_or_else(|| Error::MissingTensor {
            origin: self.origin.clone(),
            name: name.to_string(),
        })?;
        let dtype = e.dtype.clone().map_err(|dtype| Error::UnsupportedDType {
            name: name.to_string(),
            dtype,
        })?;
        let shard = &self.shards[e.shard];
        Ok(Tensor {
            storage: shard.storage.clone(),
            offset: shard.data_start + e.begin,
            len: (e.end - e.begin) / dtype.size(),
            dtype,
            shape: e.shape.clone(),
        })
    }

    /// The tensor `name`, which must have exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensor(name)?;
        if t.shape != shape {
            return Err(Error::ShapeMismatch {
                file: self.file_of(name).unwrap_or(&self.origin).to_path_buf(),
                name: name.to_string(),
                expected: shape.to_vec(),
                got: t.shape.clone(),
            });
        }
        Ok(t)
    }

    /// Small tensors (norm weights, biases) widened to f32 after a shape check.
    pub fn get_f32(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        Ok(self.get(name, shape)?.to_f32_vec())
    }
}
