//! Model files in safetensors with PyTorch's `state_dict()` names and shapes (conv weights
//! OIHW, `num_batches_tracked` int64), so the seed's PyTorch model loads them with
//! `load_state_dict(safetensors.torch.load_file(path))` and weights trained there load here.

use crate::backend::{Backend, Elem};
use crate::model::net::{HostTensor, Net};
use crate::model::{TensorInfo, TensorKind};
use anyhow::{bail, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// A safetensors file mapped into memory.
pub struct TensorFile {
    path: std::path::PathBuf,
    map: memmap2::Mmap,
}

impl TensorFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file =
            std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only and lives as long as `TensorFile`; a file truncated by
        // another process while mapped is outside what this program defends against.
        let map = unsafe { memmap2::Mmap::map(&file) }
            .with_context(|| format!("cannot map {}", path.display()))?;
        let tf = TensorFile { path: path.to_path_buf(), map };
        tf.tensors()?;
        Ok(tf)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed file.
    pub fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a valid safetensors file ({e}); it may be truncated or damaged",
                self.path.display()
            )
        })
    }

    /// The file's `__metadata__` strings.
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.map).map_err(|e| {
            anyhow::anyhow!("{}: bad safetensors header ({e})", self.path.display())
        })?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    /// Tensor `name` as `f64`s with its shape (F16, BF16, F32, F64, I32 and I64 are read).
    pub fn read_f64(&self, name: &str) -> Result<(Vec<f64>, Vec<usize>)> {
        let st = self.tensors()?;
        let view = st
            .tensor(name)
            .map_err(|_| anyhow::anyhow!("{}: no tensor named {name}", self.path.display()))?;
        let values = view_to_f64(&view)
            .with_context(|| format!("{}: tensor {name}", self.path.display()))?;
        Ok((values, view.shape().to_vec()))
    }

    /// Tensor `name` converted to `T`.
    pub fn read<T: Elem>(&self, name: &str) -> Result<(Vec<T>, Vec<usize>)> {
        let (v, shape) = self.read_f64(name)?;
        Ok((v.into_iter().map(T::cast).collect(), shape))
    }
}

fn view_to_f64(view: &TensorView) -> Result<Vec<f64>> {
    let d = view.data();
    let chunks = |size: usize| d.chunks_exact(size);
    Ok(match view.dtype() {
        Dtype::F32 => {
            chunks(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64).collect()
        }
        Dtype::F64 => {
            chunks(8).map(|b| f64::from_le_bytes(b.try_into().expect("8-byte chunk"))).collect()
        }
        Dtype::F16 => chunks(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f64()).collect(),
        Dtype::BF16 => {
            chunks(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f64()).collect()
        }
        Dtype::I64 => chunks(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8-byte chunk")) as f64)
            .collect(),
        Dtype::I32 => {
            chunks(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64).collect()
        }
        other => bail!("unsupported dtype {other:?}"),
    })
}

/// Loads every tensor of the model from `file`, each named `{prefix}{state_dict name}`.
/// Nothing is changed unless every tensor is present with the right shape.
pub fn load_model<T: Elem, B: Backend<T>>(
    net: &mut Net<T, B>, file: &TensorFile, prefix: &str,
) -> Result<()> {
    let st = file.tensors()?;
    let path = file.path().display().to_string();
    let model = net.spec.name.clone();
    net.load_state(|info: &TensorInfo| {
        let name = format!("{prefix}{}", info.name);
        let view = st.tensor(&name).map_err(|_| {
            anyhow::anyhow!("{path}: no tensor {name}; the file is not a checkpoint of {model} (or uses other names)")
        })?;
        if view.shape() != info.shape.as_slice() {
            bail!(
                "{path}: tensor {name} has shape {:?}, {model} expects {:?}; the checkpoint is from another model",
                view.shape(),
                info.shape
            );
        }
        let values = view_to_f64(&view).with_context(|| format!("{path}: tensor {name}"))?;
        Ok(match info.kind {
            TensorKind::Count => HostTensor::Int(values[0] as i64),
            TensorKind::Param | TensorKind::RunningStat => {
                if values.iter().any(|v| !v.is_finite()) {
                    bail!("{path}: tensor {name} holds NaN or infinite values");
                }
                HostTensor::Float(values.into_iter().map(T::cast).collect())
            }
        })
    })
}

/// An owned tensor ready to be written.
pub struct OwnedTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl OwnedTensor {
    pub fn f32(shape: Vec<usize>, values: impl IntoIterator<Item = f32>) -> Self {
        OwnedTensor {
            dtype: Dtype::F32,
            shape,
            bytes: values.into_iter().flat_map(f32::to_le_bytes).collect(),
        }
    }
    pub fn f64(shape: Vec<usize>, values: impl IntoIterator<Item = f64>) -> Self {
        OwnedTensor {
            dtype: Dtype::F64,
            shape,
            bytes: values.into_iter().flat_map(f64::to_le_bytes).collect(),
        }
    }
    pub fn i64(shape: Vec<usize>, values: impl IntoIterator<Item = i64>) -> Self {
        OwnedTensor {
            dtype: Dtype::I64,
            shape,
            bytes: values.into_iter().flat_map(i64::to_le_bytes).collect(),
        }
    }
}

/// The model's `state_dict()` as float32 / int64 tensors under PyTorch's names.
pub fn model_tensors<T: Elem, B: Backend<T>>(net: &mut Net<T, B>) -> Vec<(String, OwnedTensor)> {
    net.state()
        .into_iter()
        .map(|(info, t)| {
            let tensor = match t {
                HostTensor::Float(v) => {
                    OwnedTensor::f32(info.shape.clone(), v.iter().map(|x| x.as_f64() as f32))
                }
                HostTensor::Int(c) => OwnedTensor::i64(info.shape.clone(), [c]),
            };
            (info.name, tensor)
        })
        .collect()
}

/// Writes tensors to `path` atomically: a temporary file in the same folder, fsync, rename.
/// A crash or a full disk leaves either the old file or the new one, never a partial file.
pub fn save(
    path: &Path, tensors: &[(String, OwnedTensor)], metadata: HashMap<String, String>,
) -> Result<()> {
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .map(|(name, t)| Ok((name.as_str(), TensorView::new(t.dtype, t.shape.clone(), &t.bytes)?)))
        .collect::<Result<_, safetensors::SafeTensorError>>()
        .context("building the checkpoint")?;
    let bytes =
        safetensors::serialize(views, Some(metadata)).context("serialising the checkpoint")?;
    let bytes = canonical_header(bytes)?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let file_name =
        path.file_name().with_context(|| format!("{} is not a file path", path.display()))?;
    let tmp = dir.join(format!(".{}.tmp{}", file_name.to_string_lossy(), std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::anyhow!("cannot write {}: {e}", path.display())
    })
}

/// The same safetensors file with its JSON header's keys sorted: the metadata comes from a
/// `HashMap`, whose order changes from run to run, and the same state must give the same bytes
/// (runs are compared byte for byte).
fn canonical_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let bad = || anyhow::anyhow!("safetensors wrote a malformed header");
    let n = u64::from_le_bytes(bytes.get(..8).ok_or_else(bad)?.try_into()?) as usize;
    let header = bytes.get(8..8 + n).ok_or_else(bad)?;
    // serde_json's maps are sorted by key.
    let value: serde_json::Value = serde_json::from_slice(header)?;
    let mut json = serde_json::to_vec(&value)?;
    // The data starts 8-byte aligned, as safetensors pads it (with spaces).
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// Saves the model's `state_dict()` to `path` (atomically).
pub fn save_model<T: Elem, B: Backend<T>>(net: &mut Net<T, B>, path: &Path) -> Result<()> {
    let tensors = model_tensors(net);
    let meta = HashMap::from([
        ("model".to_string(), net.spec.name.clone()),
        ("format".to_string(), "pytorch state_dict".to_string()),
    ]);
    save(path, &tensors, meta)
}
