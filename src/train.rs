//! The training loop: epochs of shuffled, augmented batches, SGD with a learning-rate schedule,
//! evaluation on the test set after every epoch, metrics, and checkpoints that resume exactly.
//!
//! Every random choice is a pure function of the seed and a position (the epoch's shuffle of
//! `(seed, epoch)`, an image's crop and flip of `(seed, epoch, position)`), so the state to
//! resume is just the weights, running statistics, momentum buffers and the step counter: on
//! the CPU a resumed run is bitwise the same as one that never stopped.

use crate::backend::cpu::Cpu;
use crate::backend::{Backend, Elem, Sgd};
use crate::checkpoint::{load_model, model_tensors, save, OwnedTensor, TensorFile};
use crate::data::{self, Augment, Cifar10, Split};
use crate::model::net::Net;
use crate::model::ModelSpec;
use crate::sched::{LrSchedule, Sched};
use crate::schedule::BranchSchedule;
use crate::stepper::{EagerStepper, HostFeed, Stepper};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use tracing::{info, warn};

/// Set by Ctrl-C: the loop finishes the current step, saves a checkpoint and stops.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// `incept train` flags, named as in timm's train.py.
#[derive(Clone, Debug, Serialize, Deserialize, clap::Args)]
pub struct TrainConfig {
    /// Folder holding data_batch_1..5.bin and test_batch.bin (CIFAR-10 binary version).
    #[arg(long, default_value = "data/cifar-10-batches-bin")]
    pub data_dir: PathBuf,
    /// Download CIFAR-10 into --data-dir first (done automatically when that folder is empty).
    #[arg(long)]
    pub download: bool,
    /// Epochs to train (with --resume: the total, counting the epochs already done).
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Images per training step.
    #[arg(short = 'b', long, default_value_t = 128)]
    pub batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 0.1)]
    pub lr: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Weight decay (added to every gradient, as torch.optim.SGD does).
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Nesterov momentum (the default).
    #[arg(long, overrides_with = "no_nesterov")]
    #[serde(skip)]
    pub nesterov: bool,
    /// Plain (heavy-ball) momentum instead of Nesterov.
    #[arg(long)]
    pub no_nesterov: bool,
    /// Learning-rate schedule.
    #[arg(long, value_enum, default_value = "onecycle")]
    pub sched: Sched,
    /// Warm-up epochs (one-cycle: the rising part; default 30% of the run).
    #[arg(long, default_value_t = 0.0)]
    pub warmup_epochs: f64,
    /// Step schedule: epochs between decays.
    #[arg(long, default_value_t = 30.0)]
    pub decay_epochs: f64,
    /// Step schedule: factor at each decay.
    #[arg(long, default_value_t = 0.1)]
    pub decay_rate: f64,
    /// Label smoothing of the cross-entropy.
    #[arg(long, default_value_t = 0.0)]
    pub smoothing: f64,
    /// Seed of the initial weights, the shuffles and the augmentation.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Folder that receives the run folder.
    #[arg(long, default_value = "runs")]
    pub output: PathBuf,
    /// Name of the run folder (default: the date and time).
    #[arg(long)]
    pub experiment: Option<String>,
    /// Continue the run of this checkpoint (its last.safetensors); the run folder is its folder.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Start a new run from these weights (a checkpoint of incept or the seed's PyTorch model).
    #[arg(long)]
    pub initial_checkpoint: Option<PathBuf>,
    /// Log a line every this many steps (when not on a terminal).
    #[arg(long, default_value_t = 50)]
    pub log_interval: usize,
    /// `cpu`, `cuda[:N]` in a build with `--features cudnn`, or `emu`: the emulated GPU, which
    /// runs the CUDA backend on the CPU with a race and memory checker (a slow correctness
    /// tool; `INCEPT_EMU_SEED` sets its scheduling seed).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// CPU threads (default: all cores).
    #[arg(short = 'j', long = "workers", alias = "threads")]
    pub threads: Option<usize>,
    /// Turn off the random crop (4-pixel zero padding).
    #[arg(long)]
    pub no_crop: bool,
    /// Turn off the random horizontal flip.
    #[arg(long)]
    pub no_flip: bool,
    /// How the branches of each Inception block run.
    #[arg(long, value_enum, default_value = "concurrent")]
    pub branches: BranchSchedule,
    /// Images per evaluation step.
    #[arg(long, default_value_t = 500)]
    pub eval_batch_size: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub cuda: CudaArgs,
    /// CUDA: profile only training steps A to B−1 (counted from 0 over the whole run):
    /// cuProfilerStart before step A, cuProfilerStop after step B−1, for
    /// `nsys profile --capture-range=cudaProfilerApi` and `ncu --profile-from-start off`.
    #[arg(long, value_name = "A..B")]
    pub profile_steps: Option<String>,
    /// CUDA: build the training batches on the CPU and copy each one over, instead of keeping
    /// the training set on the GPU and cropping/flipping there (same images, same bits).
    #[arg(long)]
    pub host_batches: bool,
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
    pub fn validate(&self, device: &str) -> Result<()> {
        if device == "cpu" {
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
    pub fn gpu_options(&self) -> crate::backend::cuda::GpuOptions {
        use crate::backend::cuda::{DType, GpuOptions};
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
    pub fn describe(&self, device: &str) -> &'static str {
        match (device == "cpu" || self.no_amp, self.amp_dtype) {
            (true, _) => "fp32",
            (false, Some(AmpDtype::Bf16)) => "amp-bf16",
            (false, _) => "amp-f16",
        }
    }
}

/// Opens the CUDA device `device` (`cuda`, `cuda:N`, or `emu` for the emulated GPU) as
/// `precision` says.
pub fn open_gpu(device: &str, precision: &CudaArgs) -> Result<crate::backend::cuda::Gpu> {
    use crate::backend::cuda::{emu, Gpu};
    if device == "emu" {
        return Gpu::emulated(emu::EmuOptions::from_env()?, precision.gpu_options());
    }
    #[cfg(feature = "cudnn")]
    {
        let ordinal = crate::backend::cuda::parse_device(device)?;
        Gpu::with_options(ordinal, precision.gpu_options())
    }
    #[cfg(not(feature = "cudnn"))]
    bail!("--device {device}: this binary was built without CUDA; rebuild with `cargo build --release --features cudnn`, or use --device cpu (or emu, the emulated GPU)")
}

impl TrainConfig {
    pub fn nesterov(&self) -> bool {
        !self.no_nesterov
    }

    fn augment(&self) -> Augment {
        Augment {
            crop: !self.no_crop,
            flip: !self.no_flip,
        }
    }

    /// Checks the flags before anything is read or written.
    pub fn validate(&self) -> Result<()> {
        if self.batch_size < 2 {
            bail!("--batch-size must be at least 2: BatchNorm needs two values per channel in training");
        }
        if self.epochs == 0 {
            bail!("--epochs must be at least 1");
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            bail!("--lr must be a positive number, got {}", self.lr);
        }
        if !(0.0..1.0).contains(&self.momentum) {
            bail!("--momentum must be in [0, 1), got {}", self.momentum);
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            bail!("--weight-decay must be >= 0, got {}", self.weight_decay);
        }
        if !(0.0..1.0).contains(&self.smoothing) {
            bail!("--smoothing must be in [0, 1), got {}", self.smoothing);
        }
        if self.warmup_epochs < 0.0 || self.warmup_epochs > self.epochs as f64 {
            bail!(
                "--warmup-epochs must be between 0 and --epochs ({})",
                self.epochs
            );
        }
        if self.eval_batch_size == 0 {
            bail!("--eval-batch-size must be at least 1");
        }
        if self.log_interval == 0 {
            bail!("--log-interval must be at least 1");
        }
        if self.resume.is_some() && self.initial_checkpoint.is_some() {
            bail!("--resume and --initial-checkpoint exclude each other: resume continues a run, the other starts a new one");
        }
        check_device(&self.device)?;
        if let Some(r) = &self.profile_steps {
            if self.device == "cpu" {
                bail!("--profile-steps applies to --device cuda (on the CPU, use `incept bench --profile`)");
            }
            parse_steps(r)?;
        }
        if self.host_batches && self.device == "cpu" {
            bail!("--host-batches applies to --device cuda; the CPU always builds batches on the host (drop --host-batches)");
        }
        self.cuda.validate(&self.device)
    }
}

/// Parses `--profile-steps A..B` into the steps `A..B` (B > A).
pub fn parse_steps(s: &str) -> Result<std::ops::Range<u64>> {
    let bad = || {
        anyhow::anyhow!("--profile-steps {s}: expected A..B with whole numbers A < B, e.g. 20..30")
    };
    let (a, b) = s.split_once("..").ok_or_else(bad)?;
    let (a, b): (u64, u64) = (
        a.trim().parse().map_err(|_| bad())?,
        b.trim().parse().map_err(|_| bad())?,
    );
    if a >= b {
        return Err(bad());
    }
    Ok(a..b)
}

/// Accepts `cpu` and `emu`, and `cuda[:N]` only where that device can be opened: checked
/// before any data is downloaded or read, so a missing driver, GPU or library is the first
/// thing said.
pub fn check_device(device: &str) -> Result<()> {
    match device {
        "cpu" | "emu" => Ok(()),
        d if d == "cuda" || d.starts_with("cuda:") => {
            #[cfg(feature = "cudnn")]
            {
                let ordinal = crate::backend::cuda::parse_device(d)?;
                crate::backend::cuda::probe(ordinal).with_context(|| format!("--device {d}"))
            }
            #[cfg(not(feature = "cudnn"))]
            bail!("--device {d}: this binary was built without CUDA; rebuild with `cargo build --release --features cudnn`, or use --device cpu")
        }
        d => bail!("--device {d}: unknown device; use cpu, cuda[:N] or emu"),
    }
}

/// Loss, accuracy and confusion matrix over a dataset.
#[derive(Clone, Debug)]
pub struct EvalResult {
    pub loss: f64,
    pub accuracy: f64,
    pub images: usize,
    /// `confusion[true][predicted]`.
    pub confusion: [[u64; 10]; 10],
}

fn argmax<T: Elem>(row: &[T]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

/// Eval-mode pass over the whole dataset (no augmentation).
pub fn evaluate<B: Backend<f32>>(
    net: &mut Net<f32, B>,
    ds: &Cifar10,
    batch: usize,
) -> Result<EvalResult> {
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut confusion = [[0u64; 10]; 10];
    let (mut loss_sum, mut correct) = (0.0, 0usize);
    let k = net.spec.classes;
    for start in (0..ds.len()).step_by(batch) {
        let idx: Vec<usize> = (start..(start + batch).min(ds.len())).collect();
        data::make_batch(ds, &idx, Augment::NONE, 0, 0, start as u64, &mut x, &mut y);
        let logits = net.forward(&x, idx.len(), false)?;
        loss_sum += net.loss(&y, 0.0)? * idx.len() as f64;
        for (row, &label) in logits.chunks(k).zip(&y) {
            let p = argmax(row);
            correct += (p == label as usize) as usize;
            confusion[label as usize][p] += 1;
        }
    }
    let n = ds.len();
    Ok(EvalResult {
        loss: loss_sum / n as f64,
        accuracy: correct as f64 / n as f64,
        images: n,
        confusion,
    })
}

/// Where a run stands: what a checkpoint needs besides the model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Progress {
    /// Epoch being trained (0-based).
    pub epoch: u64,
    /// Steps of that epoch already done.
    pub step_in_epoch: u64,
    /// Optimizer steps done in the whole run.
    pub global_step: u64,
    pub best_acc: f64,
    /// Running sums of the epoch so far (summed loss, correct and seen images), so an epoch
    /// interrupted and resumed still reports its whole training loss and accuracy.
    pub epoch_loss_sum: f64,
    pub epoch_correct: u64,
    pub epoch_seen: u64,
}

/// Paths of a checkpoint: the model (PyTorch-loadable) and its training state beside it.
pub fn state_path(model: &Path) -> PathBuf {
    let name = model
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let stem = name.strip_suffix(".safetensors").unwrap_or(&name);
    model.with_file_name(format!("{stem}.state.safetensors"))
}

/// Writes `<name>.safetensors` (the model's state_dict, loadable by PyTorch with strict=True)
/// and `<name>.state.safetensors` (momentum buffers, step counters, seed, batch size).
fn save_checkpoint<B: Backend<f32>>(
    net: &mut Net<f32, B>,
    dir: &Path,
    name: &str,
    p: &Progress,
    cfg: &TrainConfig,
) -> Result<PathBuf> {
    let model_path = dir.join(format!("{name}.safetensors"));
    let meta = HashMap::from([
        ("model".to_string(), net.spec.name.clone()),
        ("format".to_string(), "pytorch state_dict".to_string()),
        ("global_step".to_string(), p.global_step.to_string()),
        ("epoch".to_string(), p.epoch.to_string()),
    ]);
    let mut state: Vec<(String, OwnedTensor)> = net
        .momentum()
        .into_iter()
        .map(|(n, v)| {
            (
                format!("optimizer.momentum.{n}"),
                OwnedTensor::f32(vec![v.len()], v),
            )
        })
        .collect();
    let scalar = |v: u64| OwnedTensor::i64(vec![], [v as i64]);
    state.push(("train.epoch".into(), scalar(p.epoch)));
    state.push(("train.step_in_epoch".into(), scalar(p.step_in_epoch)));
    state.push(("train.global_step".into(), scalar(p.global_step)));
    state.push(("train.sgd_steps".into(), scalar(net.sgd_steps)));
    // All randomness derives from the seed and the position, so the seed is the RNG state.
    state.push(("train.rng_seed".into(), scalar(cfg.seed)));
    state.push(("train.batch_size".into(), scalar(cfg.batch_size as u64)));
    state.push((
        "train.best_acc".into(),
        OwnedTensor::f64(vec![], [p.best_acc]),
    ));
    state.push((
        "train.epoch_loss_sum".into(),
        OwnedTensor::f64(vec![], [p.epoch_loss_sum]),
    ));
    state.push(("train.epoch_correct".into(), scalar(p.epoch_correct)));
    // Mixed precision: the dynamic loss scale, so a resumed run does not restart at 2^16 and
    // skip steps finding its way back.
    if let Some((scale, _)) = net.backend().loss_scale()? {
        state.push(("train.loss_scale".into(), OwnedTensor::f64(vec![], [scale])));
    }
    state.push(("train.epoch_seen".into(), scalar(p.epoch_seen)));
    // The state goes first: if the model write fails, the step counters of the pair disagree
    // and a resume refuses the pair instead of mixing two steps.
    save(&state_path(&model_path), &state, meta.clone())?;
    save(&model_path, &model_tensors(net), meta)?;
    Ok(model_path)
}

fn scalar(file: &TensorFile, name: &str) -> Result<f64> {
    let (v, _) = file.read_f64(name)?;
    v.first()
        .copied()
        .with_context(|| format!("{}: {name} is empty", file.path().display()))
}

/// Loads a checkpoint pair written by [`save_checkpoint`] and returns where the run stood.
fn resume_from<B: Backend<f32>>(
    net: &mut Net<f32, B>,
    path: &Path,
    cfg: &TrainConfig,
) -> Result<Progress> {
    let model = TensorFile::open(path)?;
    let sp = state_path(path);
    if !sp.exists() {
        bail!(
            "{} has no training state beside it (expected {}); to start a new run from these weights use --initial-checkpoint",
            path.display(),
            sp.display()
        );
    }
    let state = TensorFile::open(&sp)?;
    let p = Progress {
        epoch: scalar(&state, "train.epoch")? as u64,
        step_in_epoch: scalar(&state, "train.step_in_epoch")? as u64,
        global_step: scalar(&state, "train.global_step")? as u64,
        best_acc: scalar(&state, "train.best_acc")?,
        epoch_loss_sum: scalar(&state, "train.epoch_loss_sum")?,
        epoch_correct: scalar(&state, "train.epoch_correct")? as u64,
        epoch_seen: scalar(&state, "train.epoch_seen")? as u64,
    };
    let model_step = model
        .metadata()?
        .get("global_step")
        .cloned()
        .unwrap_or_default();
    if model_step != p.global_step.to_string() {
        bail!(
            "{} (step {model_step}) and {} (step {}) are from different steps; the last save was interrupted — resume from another checkpoint",
            path.display(),
            sp.display(),
            p.global_step
        );
    }
    let batch = scalar(&state, "train.batch_size")? as usize;
    if batch != cfg.batch_size {
        bail!(
            "{} was trained with --batch-size {batch}; resume with the same batch size",
            path.display()
        );
    }
    let seed = scalar(&state, "train.rng_seed")? as u64;
    if seed != cfg.seed {
        bail!(
            "{} was trained with --seed {seed}; resume with the same seed",
            path.display()
        );
    }
    load_model(net, &model, "")?;
    net.set_momentum(|name, _| Ok(state.read::<f32>(&format!("optimizer.momentum.{name}"))?.0))?;
    net.sgd_steps = scalar(&state, "train.sgd_steps")? as u64;
    // Present when the run was in mixed precision; a run resumed in fp32 has no use for it.
    if state.tensors()?.names().contains(&"train.loss_scale") {
        let scale = scalar(&state, "train.loss_scale")?;
        if !(scale.is_finite() && scale > 0.0) {
            bail!(
                "{}: train.loss_scale is {scale}, not a positive number",
                sp.display()
            );
        }
        net.backend_mut().restore_loss_scale(scale)?;
    }
    Ok(p)
}

/// `YYYYmmdd-HHMMSS` in UTC, for run folder names.
fn timestamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// Stopped by Ctrl-C after saving a checkpoint.
    Interrupted,
}

/// One row of summary.csv / metrics.jsonl.
#[derive(Serialize)]
struct EpochRow {
    epoch: u64,
    lr: f64,
    train_loss: f64,
    train_acc: f64,
    test_loss: f64,
    test_acc: f64,
    img_per_s: f64,
    seconds: f64,
}

fn append(path: &Path, line: &str) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("cannot write {}", path.display()))
}

const CSV_HEADER: &str = "epoch,lr,train_loss,train_acc,test_loss,test_acc,img_per_s,seconds";

/// Running figures of the epoch so far.
struct Running {
    loss: f64,
    acc: f64,
    img_s: f64,
    lr: f64,
}

/// Live progress: a bar on a terminal, periodic log lines elsewhere.
struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    interval: u64,
    epoch: u64,
    steps: u64,
}

impl Reporter {
    fn new(epoch: u64, epochs: usize, steps: u64, done: u64, interval: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(steps);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix} [{bar:30.cyan/blue}] {pos}/{len} {msg} ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b.set_prefix(format!("epoch {}/{epochs}", epoch + 1));
            b.set_position(done);
            b
        });
        Reporter {
            bar,
            interval: interval as u64,
            epoch,
            steps,
        }
    }

    /// Called after step `step` (0-based) of the epoch.
    fn step(&self, step: u64, r: &Running) {
        let done = step + 1;
        match &self.bar {
            Some(b) => {
                b.set_position(done);
                b.set_message(format!(
                    "loss {:.4} acc {:.2}% {:.0} img/s lr {:.4}",
                    r.loss,
                    r.acc * 100.0,
                    r.img_s,
                    r.lr
                ));
            }
            None if done.is_multiple_of(self.interval) || done == self.steps => {
                info!(
                    epoch = self.epoch + 1,
                    step = done,
                    steps = self.steps,
                    loss = r.loss,
                    acc = r.acc,
                    img_s = r.img_s,
                    lr = r.lr,
                    "train"
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Runs `incept train`. Returns the run folder and how the run ended.
pub fn train(cfg: &TrainConfig) -> Result<(PathBuf, Outcome)> {
    cfg.validate()?;
    if cfg.download || data::is_empty_location(&cfg.data_dir) {
        if !cfg.download {
            info!("{} is empty: downloading CIFAR-10", cfg.data_dir.display());
        }
        if cfg.download && !data::is_empty_location(&cfg.data_dir) {
            info!(
                "{} already holds CIFAR-10 files; not downloading",
                cfg.data_dir.display()
            );
        } else {
            data::download(&cfg.data_dir, &data::Source::official())?;
        }
    }
    let train_set = Cifar10::open(&cfg.data_dir, Split::Train)?;
    let test_set = Cifar10::open(&cfg.data_dir, Split::Test)?;

    let spec = ModelSpec::inception_net_small();
    if cfg.device != "cpu" {
        let gpu = open_gpu(&cfg.device, &cfg.cuda)?;
        info!(
            device = %gpu.describe(),
            precision = cfg.cuda.describe(&cfg.device),
            deterministic = cfg.cuda.deterministic,
            "CUDA"
        );
        use crate::stepper::{DeviceFeed, GraphStepper};
        let feed = if cfg.host_batches {
            None
        } else {
            Some(DeviceFeed::new(&gpu, &train_set, cfg.augment(), cfg.seed)?)
        };
        let mut net: Net<f32, crate::backend::cuda::Gpu> = Net::new(spec, gpu, cfg.seed)?;
        // The branches are issued in order from one thread; with several streams they run
        // concurrently on the device.
        net.schedule = BranchSchedule::Sequential;
        return match feed {
            Some(feed) if !cfg.cuda.no_cuda_graph => {
                let mut stepper = GraphStepper::new(feed);
                train_loop(cfg, net, &mut stepper, &train_set, &test_set)
            }
            Some(feed) => {
                let mut stepper = EagerStepper::new(feed);
                train_loop(cfg, net, &mut stepper, &train_set, &test_set)
            }
            None => {
                let mut stepper =
                    EagerStepper::new(HostFeed::new(&train_set, cfg.augment(), cfg.seed));
                train_loop(cfg, net, &mut stepper, &train_set, &test_set)
            }
        };
    }
    let mut net: Net<f32, Cpu> = Net::new(spec, Cpu, cfg.seed)?;
    net.schedule = cfg.branches;
    let mut stepper = EagerStepper::new(HostFeed::new(&train_set, cfg.augment(), cfg.seed));
    train_loop(cfg, net, &mut stepper, &train_set, &test_set)
}

/// Where the last good checkpoint is, for a message about stopping without saving.
fn last_good(run_dir: &Path) -> String {
    let last = run_dir.join("last.safetensors");
    if last.exists() {
        format!("the last good checkpoint is {}", last.display())
    } else {
        "no checkpoint was saved yet".to_string()
    }
}

/// The epochs of [`train`] on an already built network.
fn train_loop<B: Backend<f32>>(
    cfg: &TrainConfig,
    mut net: Net<f32, B>,
    stepper: &mut dyn Stepper<B>,
    train_set: &Cifar10,
    test_set: &Cifar10,
) -> Result<(PathBuf, Outcome)> {
    let (run_dir, mut progress) = match &cfg.resume {
        Some(path) => {
            let p = resume_from(&mut net, path, cfg)?;
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."))
                .to_path_buf();
            info!(checkpoint = %path.display(), epoch = p.epoch + 1, step = p.step_in_epoch, "resuming");
            (dir, p)
        }
        None => {
            if let Some(init) = &cfg.initial_checkpoint {
                load_model(&mut net, &TensorFile::open(init)?, "")?;
                info!(checkpoint = %init.display(), "initial weights loaded");
            }
            let name = cfg.experiment.clone().unwrap_or_else(timestamp);
            let dir = cfg.output.join(name);
            if dir.join("summary.csv").exists() {
                bail!(
                    "{} already holds a run; choose another --experiment or continue it with --resume {}",
                    dir.display(),
                    dir.join("last.safetensors").display()
                );
            }
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create the run folder {}", dir.display()))?;
            append(&dir.join("summary.csv"), CSV_HEADER)?;
            let p = Progress {
                epoch: 0,
                step_in_epoch: 0,
                global_step: 0,
                best_acc: f64::NEG_INFINITY,
                epoch_loss_sum: 0.0,
                epoch_correct: 0,
                epoch_seen: 0,
            };
            (dir, p)
        }
    };
    let mut args = serde_json::to_value(cfg)?;
    args["nesterov"] = cfg.nesterov().into();
    std::fs::write(
        run_dir.join("args.json"),
        serde_json::to_string_pretty(&args)? + "\n",
    )
    .with_context(|| format!("cannot write {}", run_dir.join("args.json").display()))?;

    let n = train_set.len();
    let b = cfg.batch_size;
    // The last partial batch is kept (as PyTorch's DataLoader does) unless it has one image,
    // which BatchNorm cannot normalise in training, or the steps replay a CUDA graph of one
    // batch size.
    let steps_per_epoch = (if n % b == 1 || stepper.drop_last() {
        n / b
    } else {
        n.div_ceil(b)
    }) as u64;
    if steps_per_epoch == 0 {
        bail!(
            "{} has {n} training images, fewer than one batch of 2",
            cfg.data_dir.display()
        );
    }
    let schedule = LrSchedule {
        sched: cfg.sched,
        lr: cfg.lr,
        total_steps: steps_per_epoch * cfg.epochs as u64,
        steps_per_epoch,
        warmup_epochs: cfg.warmup_epochs,
        decay_epochs: cfg.decay_epochs,
        decay_rate: cfg.decay_rate,
    };
    let mut opt = Sgd {
        lr: cfg.lr,
        momentum: cfg.momentum,
        weight_decay: cfg.weight_decay,
        nesterov: cfg.nesterov(),
    };
    info!(
        run = %run_dir.display(), train = n, test = test_set.len(), epochs = cfg.epochs, batch = b,
        steps_per_epoch, threads = rayon::current_num_threads(), "training {}", net.spec.name
    );
    // Validated with the flags; an empty range (no capture) without the flag.
    let profile = match &cfg.profile_steps {
        Some(r) => parse_steps(r)?,
        None => u64::MAX..u64::MAX,
    };
    while (progress.epoch as usize) < cfg.epochs {
        let epoch = progress.epoch;
        let order = data::epoch_order(n, cfg.seed, epoch);
        let reporter = Reporter::new(
            epoch,
            cfg.epochs,
            steps_per_epoch,
            progress.step_in_epoch,
            cfg.log_interval,
        );
        let started = Instant::now();
        // Images trained by this process in this epoch, for images/s.
        let mut seen_now = 0usize;
        let mut lr = schedule.lr(progress.global_step);
        let mut pending: Vec<u64> = Vec::new();
        for step in progress.step_in_epoch..steps_per_epoch {
            let start = step as usize * b;
            let idx = &order[start..(start + b).min(n)];
            if profile.start == progress.global_step {
                net.backend().profiler(true)?;
                info!(step = progress.global_step, "profiler capture started");
            }
            lr = schedule.lr(progress.global_step);
            opt.lr = lr;
            net.backend()
                .range_push(&format!("step {}", progress.global_step));
            let out = stepper.step(&mut net, idx, epoch, start as u64, &opt, cfg.smoothing);
            net.backend().range_pop();
            let out = out?;
            match out {
                Some((loss, _)) if !loss.is_finite() => {
                    reporter.finish();
                    bail!(
                        "the loss became {loss} at epoch {} step {} (global step {}); stopping without saving ({}). Lower --lr, or check the data",
                        epoch + 1,
                        step + 1,
                        progress.global_step + 1,
                        last_good(&run_dir),
                    );
                }
                Some((loss, correct)) => {
                    progress.epoch_loss_sum += loss * idx.len() as f64;
                    progress.epoch_correct += correct;
                    progress.epoch_seen += idx.len() as u64;
                }
                None => pending.push(idx.len() as u64),
            }
            progress.global_step += 1;
            if profile.end == progress.global_step {
                net.backend().profiler(false)?;
                info!(step = progress.global_step - 1, "profiler capture stopped");
            }
            progress.step_in_epoch = step + 1;
            seen_now += idx.len();
            // Steps whose loss stayed on the device: read back every --log-interval steps, at
            // the end of the epoch and before stopping.
            let last = step + 1 == steps_per_epoch;
            if !pending.is_empty()
                && (pending.len() >= cfg.log_interval || last || STOP.load(Ordering::SeqCst))
            {
                let (loss_sum, correct) = stepper.drain(&net)?;
                let images: u64 = pending.iter().sum();
                if !loss_sum.is_finite() {
                    reporter.finish();
                    bail!(
                        "the loss became {loss_sum} within global steps {}..{} (epoch {}); stopping without saving ({}). Lower --lr, or check the data",
                        progress.global_step + 1 - pending.len() as u64,
                        progress.global_step,
                        epoch + 1,
                        last_good(&run_dir),
                    );
                }
                progress.epoch_loss_sum += loss_sum;
                progress.epoch_correct += correct;
                progress.epoch_seen += images;
                pending.clear();
            }
            let seen = progress.epoch_seen.max(1) as f64;
            reporter.step(
                step,
                &Running {
                    loss: progress.epoch_loss_sum / seen,
                    acc: progress.epoch_correct as f64 / seen,
                    img_s: seen_now as f64 / started.elapsed().as_secs_f64(),
                    lr,
                },
            );
            if STOP.load(Ordering::SeqCst) {
                reporter.finish();
                let path = save_checkpoint(&mut net, &run_dir, "last", &progress, cfg)?;
                warn!(checkpoint = %path.display(), epoch = epoch + 1, step = step + 1, "interrupted: checkpoint saved; continue with --resume");
                return Ok((run_dir, Outcome::Interrupted));
            }
        }
        reporter.finish();
        stepper.end_epoch();
        let train_secs = started.elapsed().as_secs_f64();
        let ev = evaluate(&mut net, test_set, cfg.eval_batch_size)?;
        let row = EpochRow {
            epoch: epoch + 1,
            lr,
            train_loss: if progress.epoch_seen > 0 {
                progress.epoch_loss_sum / progress.epoch_seen as f64
            } else {
                f64::NAN
            },
            train_acc: if progress.epoch_seen > 0 {
                progress.epoch_correct as f64 / progress.epoch_seen as f64
            } else {
                f64::NAN
            },
            test_loss: ev.loss,
            test_acc: ev.accuracy,
            img_per_s: seen_now as f64 / train_secs,
            seconds: started.elapsed().as_secs_f64(),
        };
        info!(
            epoch = row.epoch,
            train_loss = row.train_loss,
            train_acc = row.train_acc,
            test_loss = row.test_loss,
            test_acc = row.test_acc,
            img_s = row.img_per_s,
            seconds = row.seconds,
            "epoch done"
        );
        if let Some((scale, skipped)) = net.backend().loss_scale()? {
            info!(
                loss_scale = scale,
                skipped_steps = skipped,
                "mixed precision"
            );
        }
        append(
            &run_dir.join("summary.csv"),
            &format!(
                "{},{:.6e},{:.6},{:.6},{:.6},{:.6},{:.1},{:.2}",
                row.epoch,
                row.lr,
                row.train_loss,
                row.train_acc,
                row.test_loss,
                row.test_acc,
                row.img_per_s,
                row.seconds
            ),
        )?;
        append(
            &run_dir.join("metrics.jsonl"),
            &serde_json::to_string(&row)?,
        )?;
        progress.epoch += 1;
        progress.step_in_epoch = 0;
        progress.epoch_loss_sum = 0.0;
        progress.epoch_correct = 0;
        progress.epoch_seen = 0;
        let improved = ev.accuracy > progress.best_acc;
        if improved {
            progress.best_acc = ev.accuracy;
        }
        save_checkpoint(&mut net, &run_dir, "last", &progress, cfg)?;
        if improved {
            crate::checkpoint::save_model(&mut net, &run_dir.join("best.safetensors"))?;
        }
        if STOP.load(Ordering::SeqCst) {
            return Ok((run_dir, Outcome::Interrupted));
        }
    }
    info!(run = %run_dir.display(), best_acc = progress.best_acc, "training finished");
    Ok((run_dir, Outcome::Finished))
}
