//! The training loop: epochs of shuffled, augmented batches, SGD with a learning-rate schedule,
//! evaluation on the test set after every epoch, metrics, and checkpoints that resume exactly.
//!
//! Every random choice is a pure function of the seed and a position (the epoch's shuffle of
//! `(seed, epoch)`, an image's crop and flip of `(seed, epoch, position)`), so the state to
//! resume is just the weights, running statistics, momentum buffers and the step counter: on
//! the CPU a resumed run is bitwise the same as one that never stopped.

use crate::backend::cuda::Gpu;
pub use crate::backend::select::{AmpDtype, CudaArgs};
use crate::backend::select::{AnyBackend, DeviceFlag};
use crate::backend::{Backend, Elem, Sgd};
use crate::checkpoint::{load_model, model_tensors, save, OwnedTensor, TensorFile};
use crate::data::{self, Augment, Cifar10, Split};
use crate::dist;
use crate::model::net::Net;
use crate::model::ModelSpec;
use crate::schedule::BranchSchedule;
use crate::stepper::{
    DataParallelStepper, DeviceFeed, EagerStepper, GraphStepper, HostFeed, Stepper,
};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tracing::{info, warn};

mod checkpointing;
mod eval;
pub mod lr;
mod progress;
mod run;

use checkpointing::{resume_from, save_checkpoint};
pub use checkpointing::{state_path, Progress};
pub use eval::{evaluate, evaluate_shared, EvalResult};
use lr::{LrSchedule, Sched};
use progress::{append, timestamp, EpochRow, Reporter, Running, CSV_HEADER};
use run::train_loop;

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
    /// Images per training step, per rank in a data-parallel run (whose global batch is this
    /// times the number of ranks).
    #[arg(short = 'b', long, default_value_t = 128)]
    pub batch_size: usize,
    /// Peak learning rate, used as given whatever the number of ranks (with a larger global
    /// batch, users usually scale it linearly or by the square root, with a warm-up).
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
    pub device: DeviceFlag,
    /// CPU threads (default: all cores).
    #[arg(short = 'j', long = "workers", alias = "threads")]
    pub threads: Option<usize>,
    /// Turn off the random crop (4-pixel zero padding).
    #[arg(long)]
    pub no_crop: bool,
    /// Turn off the random horizontal flip.
    #[arg(long)]
    pub no_flip: bool,
    /// Data parallelism: BatchNorm normalises over the global batch (every rank's images), as
    /// PyTorch's SyncBatchNorm, instead of over each rank's own (DDP's default). Costs two
    /// small all-reduces per BatchNorm per step and runs the branches one at a time. Without
    /// effect in a single process.
    #[arg(long)]
    #[serde(default)]
    pub sync_bn: bool,
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

impl TrainConfig {
    pub fn nesterov(&self) -> bool {
        !self.no_nesterov
    }

    fn augment(&self) -> Augment {
        Augment { crop: !self.no_crop, flip: !self.no_flip }
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
            bail!("--warmup-epochs must be between 0 and --epochs ({})", self.epochs);
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
        self.device.check()?;
        if let Some(r) = &self.profile_steps {
            if self.device.is_cpu() {
                bail!("--profile-steps applies to --device cuda (on the CPU, use `incept bench --profile`)");
            }
            parse_steps(r)?;
        }
        if self.host_batches && self.device.is_cpu() {
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
    let (a, b): (u64, u64) =
        (a.trim().parse().map_err(|_| bad())?, b.trim().parse().map_err(|_| bad())?);
    if a >= b {
        return Err(bad());
    }
    Ok(a..b)
}

/// How a run ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// Stopped by Ctrl-C after saving a checkpoint.
    Interrupted,
}

/// Runs `incept train`. Returns the run folder and how the run ended.
pub fn train(cfg: &TrainConfig) -> Result<(PathBuf, Outcome)> {
    cfg.validate()?;
    if cfg.download || data::is_empty_location(&cfg.data_dir) {
        if !cfg.download {
            info!("{} is empty: downloading CIFAR-10", cfg.data_dir.display());
        }
        if cfg.download && !data::is_empty_location(&cfg.data_dir) {
            info!("{} already holds CIFAR-10 files; not downloading", cfg.data_dir.display());
        } else {
            data::download(&cfg.data_dir, &data::Source::official())?;
        }
    }
    let train_set = Cifar10::open(&cfg.data_dir, Split::Train)?;
    let test_set = Cifar10::open(&cfg.data_dir, Split::Test)?;

    let spec = ModelSpec::inception_net_small();
    let place = dist::place::from_env(|k| std::env::var(k).ok())?;
    let Some(place) = place else {
        return match cfg.device.open(&cfg.cuda)? {
            AnyBackend::Cpu(cpu) => {
                let mut net = Net::new(spec, cpu, cfg.seed)?;
                net.schedule = cfg.branches;
                let feed = HostFeed::new(&train_set, cfg.augment(), cfg.seed);
                train_loop(cfg, net, &mut EagerStepper::new(feed), &train_set, &test_set)
            }
            AnyBackend::Gpu(gpu) => {
                train_on_gpu(cfg, Net::new(spec, *gpu, cfg.seed)?, &train_set, &test_set)
            }
        };
    };
    // One GPU per rank: `cuda` without a number is the rank's local one.
    let device = match &cfg.device {
        DeviceFlag::Cuda(None) => DeviceFlag::Cuda(Some(place.local_rank)),
        d => d.clone(),
    };
    #[cfg(feature = "cudnn")]
    if let DeviceFlag::Cuda(_) = device {
        // Checked by every rank before they meet, so that all of them say it.
        crate::backend::cuda::comm::nccl_available()
            .context("CUDA ranks average their gradients with NCCL")?;
    }
    let sets = (&train_set, &test_set);
    match device.open(&cfg.cuda)? {
        AnyBackend::Cpu(cpu) => {
            let mut net = Net::new(spec, cpu, cfg.seed)?;
            net.schedule = cfg.branches;
            let feed = HostFeed::new(&train_set, cfg.augment(), cfg.seed);
            train_rank(cfg, &place, net, feed, sets, |_, _| Ok(()))
        }
        AnyBackend::Gpu(gpu) => {
            let net = Net::new(spec, *gpu, cfg.seed)?;
            info!(device = %net.backend().describe(), precision = cfg.cuda.describe(&device), "CUDA");
            let comm = |net: &mut Net<f32, Gpu>, group: &dist::SharedGroup| {
                let comm = crate::backend::cuda::comm::for_device(net.backend(), group)?;
                info!("gradients averaged {}", comm.describe());
                net.backend_mut().set_comm(comm);
                Ok(())
            };
            if cfg.host_batches {
                let feed = HostFeed::new(&train_set, cfg.augment(), cfg.seed);
                return train_rank(cfg, &place, net, feed, sets, comm);
            }
            let feed = DeviceFeed::new(net.backend(), &train_set, cfg.augment(), cfg.seed)?;
            train_rank(cfg, &place, net, feed, sets, comm)
        }
    }
}

/// Training as rank `place.rank` of a data-parallel job: the ranks meet, check their settings,
/// `connect` gives the backend its own collective where it has one (NCCL), and they train
/// with [`DataParallelStepper`], each step op by op.
fn train_rank<B: Backend<f32>, F: crate::stepper::Feed<B>>(
    cfg: &TrainConfig, place: &dist::Place, mut net: Net<f32, B>, feed: F,
    (train_set, test_set): (&Cifar10, &Cifar10),
    connect: impl FnOnce(&mut Net<f32, B>, &dist::SharedGroup) -> Result<()>,
) -> Result<(PathBuf, Outcome)> {
    let config = shared_settings(cfg, &net.spec.name, (train_set, test_set));
    info!(rank = place.rank, world = place.world, launcher = %place.launcher, master = %format!("{}:{}", place.master.0, place.meeting_port()?), "data-parallel: meeting the other ranks");
    let tcp = dist::TcpGroup::join(place, &config, dist::timeout()?)?;
    let group = dist::SharedGroup::new(Box::new(tcp));
    if cfg.sync_bn {
        net.sync_bn = Some(Arc::new(dist::ddp::GroupBatchNormSync::new(group.clone())));
    }
    connect(&mut net, &group)?;
    let mut stepper = DataParallelStepper::new(feed, Box::new(group), &STOP);
    train_loop(cfg, net, &mut stepper, train_set, test_set)
}

/// The settings every rank of a data-parallel run must share, checked when the ranks meet.
fn shared_settings(
    cfg: &TrainConfig, model: &str, (train, test): (&Cifar10, &Cifar10),
) -> dist::Config {
    let resume = cfg.resume.as_ref().map_or("none".to_string(), |p| p.display().to_string());
    [
        ("model", model.to_string()),
        ("--batch-size", cfg.batch_size.to_string()),
        ("--epochs", cfg.epochs.to_string()),
        ("--lr", cfg.lr.to_string()),
        ("--sched", format!("{:?}", cfg.sched)),
        ("--warmup-epochs", cfg.warmup_epochs.to_string()),
        ("--decay-epochs", cfg.decay_epochs.to_string()),
        ("--decay-rate", cfg.decay_rate.to_string()),
        ("--momentum", cfg.momentum.to_string()),
        ("--weight-decay", cfg.weight_decay.to_string()),
        ("--nesterov", cfg.nesterov().to_string()),
        ("--smoothing", cfg.smoothing.to_string()),
        ("--seed", cfg.seed.to_string()),
        ("--no-crop", cfg.no_crop.to_string()),
        ("--no-flip", cfg.no_flip.to_string()),
        ("--sync-bn", cfg.sync_bn.to_string()),
        // The backend and its precision (a CUDA rank's device number is its own).
        (
            "--device",
            if cfg.device.is_cpu() {
                "cpu"
            } else if cfg.device == DeviceFlag::Emu {
                "emu"
            } else {
                "cuda"
            }
            .to_string(),
        ),
        ("precision", cfg.cuda.describe(&cfg.device).to_string()),
        ("--resume", resume),
        ("training images", train.len().to_string()),
        ("test images", test.len().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The training loop on the CUDA backend: batches rendered on the GPU from the resident
/// training set and each step replayed as a CUDA graph, unless the flags say otherwise.
fn train_on_gpu(
    cfg: &TrainConfig, mut net: Net<f32, Gpu>, train_set: &Cifar10, test_set: &Cifar10,
) -> Result<(PathBuf, Outcome)> {
    info!(
        device = %net.backend().describe(),
        precision = cfg.cuda.describe(&cfg.device),
        deterministic = cfg.cuda.deterministic,
        "CUDA"
    );
    // The branches are issued in order from one thread; with several streams they run
    // concurrently on the device.
    net.schedule = BranchSchedule::Sequential;
    if cfg.host_batches {
        let feed = HostFeed::new(train_set, cfg.augment(), cfg.seed);
        return train_loop(cfg, net, &mut EagerStepper::new(feed), train_set, test_set);
    }
    let feed = DeviceFeed::new(net.backend(), train_set, cfg.augment(), cfg.seed)?;
    if cfg.cuda.no_cuda_graph {
        train_loop(cfg, net, &mut EagerStepper::new(feed), train_set, test_set)
    } else {
        train_loop(cfg, net, &mut GraphStepper::new(feed), train_set, test_set)
    }
}
