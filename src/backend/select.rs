//! `--device` and the CUDA flags, turned into a backend in one place: the only code outside
//! the device modules that knows which devices this build has. Train, eval and bench parse
//! the flag into a [`DeviceFlag`], check it before reading any data, and [`DeviceFlag::open`]
//! it into an [`AnyBackend`]; the rest of the program is generic over [`Backend`].
//!
//! [`Backend`]: super::Backend

use super::cpu::Cpu;
use super::cuda::{emu, DType, Gpu, GpuOptions};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A device as `--device` names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum DeviceFlag {
    /// `cpu`: the reference backend.
    Cpu,
    /// `emu`: the CUDA backend on the emulated GPU, in every build.
    Emu,
    /// `cuda` (device 0: `None`, said back as written) or `cuda:N`, in a build with
    /// `--features cudnn`.
    Cuda(Option<usize>),
}

impl FromStr for DeviceFlag {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cpu" => Ok(DeviceFlag::Cpu),
            "emu" => Ok(DeviceFlag::Emu),
            "cuda" => Ok(DeviceFlag::Cuda(None)),
            d => match d.strip_prefix("cuda:").map(str::parse) {
                Some(Ok(n)) => Ok(DeviceFlag::Cuda(Some(n))),
                Some(Err(_)) => bail!("--device {d}: expected cuda:N with N a device number"),
                None => bail!("--device {d}: unknown device; use cpu, cuda[:N] or emu"),
            },
        }
    }
}

impl fmt::Display for DeviceFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceFlag::Cpu => f.write_str("cpu"),
            DeviceFlag::Emu => f.write_str("emu"),
            DeviceFlag::Cuda(None) => f.write_str("cuda"),
            DeviceFlag::Cuda(Some(n)) => write!(f, "cuda:{n}"),
        }
    }
}

impl From<DeviceFlag> for String {
    fn from(d: DeviceFlag) -> String {
        d.to_string()
    }
}

impl TryFrom<String> for DeviceFlag {
    type Error = anyhow::Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

/// A backend chosen at run time (the GPU boxed: it is large, the CPU empty).
pub enum AnyBackend {
    Cpu(Cpu),
    Gpu(Box<Gpu>),
}

impl DeviceFlag {
    pub fn is_cpu(&self) -> bool {
        *self == DeviceFlag::Cpu
    }

    /// Checks that the device can be opened, before any data is downloaded or read, so that a
    /// missing driver, GPU or library is the first thing said.
    pub fn check(&self) -> Result<()> {
        match self {
            DeviceFlag::Cpu | DeviceFlag::Emu => Ok(()),
            DeviceFlag::Cuda(n) => {
                check_cuda(n.unwrap_or(0)).with_context(|| format!("--device {self}"))
            }
        }
    }

    /// Opens the device; a GPU (real or emulated) computes as `cuda` says.
    pub fn open(&self, cuda: &CudaArgs) -> Result<AnyBackend> {
        match self {
            DeviceFlag::Cpu => Ok(AnyBackend::Cpu(Cpu)),
            _ => Ok(AnyBackend::Gpu(Box::new(self.open_gpu(cuda)?))),
        }
    }

    /// Opens the CUDA backend on this device (`cuda[:N]`, or `emu`).
    pub fn open_gpu(&self, cuda: &CudaArgs) -> Result<Gpu> {
        match self {
            DeviceFlag::Cpu => bail!(
                "--device cpu: this needs a GPU; use --device cuda (or emu, the emulated GPU)"
            ),
            DeviceFlag::Emu => Gpu::emulated(emu::EmuOptions::from_env()?, cuda.gpu_options()),
            DeviceFlag::Cuda(n) => open_cuda(n.unwrap_or(0), cuda.gpu_options()),
        }
    }
}

#[cfg(feature = "cudnn")]
fn check_cuda(ordinal: usize) -> Result<()> {
    super::cuda::probe(ordinal)
}

#[cfg(feature = "cudnn")]
fn open_cuda(ordinal: usize, opts: GpuOptions) -> Result<Gpu> {
    Gpu::with_options(ordinal, opts)
}

#[cfg(not(feature = "cudnn"))]
const NO_CUDA: &str = "this binary was built without CUDA; rebuild with `cargo build --release --features cudnn`, or use --device cpu (or emu, the emulated GPU)";

#[cfg(not(feature = "cudnn"))]
fn check_cuda(_: usize) -> Result<()> {
    bail!("{NO_CUDA}")
}

#[cfg(not(feature = "cudnn"))]
fn open_cuda(ordinal: usize, _: GpuOptions) -> Result<Gpu> {
    bail!("--device cuda:{ordinal}: {NO_CUDA}")
}

/// The 16-bit type of mixed precision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AmpDtype {
    F16,
    Bf16,
}

/// How a CUDA device computes (`train`, `eval`, `bench`). The CPU always computes in fp32 and
/// is deterministic, so there `--no-amp`, `--deterministic` and `--streams` change nothing.
#[derive(Clone, Debug, Serialize, Deserialize, clap::Args)]
pub struct CudaArgs {
    /// Mixed precision on CUDA (the default there): fp16 activations and convolutions, fp32
    /// master weights, BatchNorm statistics and loss, dynamic loss scaling.
    #[arg(long, overrides_with = "no_amp")]
    #[serde(skip)]
    pub amp: bool,
    /// fp32 everywhere on CUDA (no TF32): slower, and matches the CPU reference closely.
    #[arg(long)]
    pub no_amp: bool,
    /// The 16-bit type of --amp: f16 (with loss scaling) or bf16 (needs compute capability 8.0+).
    #[arg(long, value_enum)]
    pub amp_dtype: Option<AmpDtype>,
    /// Only deterministic cuDNN algorithms, chosen without timing: the same run gives the same
    /// bits on the same GPU.
    #[arg(long)]
    pub deterministic: bool,
    /// CUDA streams for the Inception branches: 1 runs everything in order on one stream; N
    /// runs the four branches of each block concurrently on N streams of their own.
    #[arg(long, default_value_t = 4)]
    pub streams: usize,
    /// Issue every training step op by op instead of replaying it as a CUDA graph (the graph
    /// needs the training set on the GPU, so --host-batches turns it off too).
    #[arg(long)]
    pub no_cuda_graph: bool,
}

impl Default for CudaArgs {
    fn default() -> Self {
        CudaArgs {
            amp: false,
            no_amp: false,
            amp_dtype: None,
            deterministic: false,
            streams: 4,
            no_cuda_graph: false,
        }
    }
}

impl CudaArgs {
    /// Refuses mixed-precision flags where they cannot apply.
    pub fn validate(&self, device: &DeviceFlag) -> Result<()> {
        if device.is_cpu() {
            if self.amp {
                bail!("--amp applies to --device cuda; the CPU trains in fp32 (drop --amp)");
            }
            if self.amp_dtype.is_some() {
                bail!("--amp-dtype applies to --device cuda; the CPU trains in fp32 (drop --amp-dtype)");
            }
        }
        if !(1..=16).contains(&self.streams) {
            bail!("--streams must be between 1 and 16, got {}", self.streams);
        }
        if self.no_amp && self.amp_dtype.is_some() {
            bail!("--amp-dtype chooses the type of mixed precision, which --no-amp turns off; drop one of them");
        }
        Ok(())
    }

    /// What a CUDA device runs: mixed precision unless --no-amp.
    pub fn gpu_options(&self) -> GpuOptions {
        GpuOptions {
            activations: match (self.no_amp, self.amp_dtype) {
                (true, _) => DType::F32,
                (false, Some(AmpDtype::Bf16)) => DType::Bf16,
                (false, _) => DType::F16,
            },
            deterministic: self.deterministic,
            streams: self.streams,
            skip_wait: None,
        }
    }

    /// `fp32`, `amp-f16` or `amp-bf16` on CUDA; `fp32` on the CPU.
    pub fn describe(&self, device: &DeviceFlag) -> &'static str {
        match (device.is_cpu() || self.no_amp, self.amp_dtype) {
            (true, _) => "fp32",
            (false, Some(AmpDtype::Bf16)) => "amp-bf16",
            (false, _) => "amp-f16",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_flags_parse_and_print_back() {
        for (s, d) in [
            ("cpu", DeviceFlag::Cpu),
            ("emu", DeviceFlag::Emu),
            ("cuda", DeviceFlag::Cuda(None)),
            ("cuda:3", DeviceFlag::Cuda(Some(3))),
        ] {
            assert_eq!(s.parse::<DeviceFlag>().unwrap(), d);
            assert_eq!(d.to_string(), s);
        }
        for (bad, says) in [("tpu", "unknown device"), ("cuda:x", "cuda:N"), ("", "unknown")] {
            let e = bad.parse::<DeviceFlag>().unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
