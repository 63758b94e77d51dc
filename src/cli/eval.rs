//! `incept eval`: a checkpoint's test accuracy and confusion matrix.

use anyhow::{bail, Result};
use incept::backend::select::{AnyBackend, CudaArgs, DeviceFlag};
use incept::backend::Backend;
use incept::checkpoint::TensorFile;
use incept::data::Cifar10;
use incept::model::{net::Net, ModelSpec};
use incept::train::{self, EvalResult};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct EvalArgs {
    /// Checkpoint to evaluate (incept's, or the seed PyTorch model's state_dict in safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Folder holding test_batch.bin.
    #[arg(long, default_value = "data/cifar-10-batches-bin")]
    data_dir: PathBuf,
    /// Images per step.
    #[arg(short = 'b', long, default_value_t = 500)]
    batch_size: usize,
    /// `cpu`, `cuda[:N]` or `emu` (see `incept train --help`).
    #[arg(long, default_value = "cpu")]
    device: DeviceFlag,
    /// CPU threads (default: all cores).
    #[arg(short = 'j', long = "workers", alias = "threads")]
    threads: Option<usize>,
    #[command(flatten)]
    cuda: CudaArgs,
}

pub fn run(args: EvalArgs) -> Result<()> {
    args.device.check()?;
    args.cuda.validate(&args.device)?;
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    super::set_threads(args.threads)?;
    let test = incept::data::Cifar10::open(&args.data_dir, incept::data::Split::Test)?;
    let file = incept::checkpoint::TensorFile::open(&args.checkpoint)?;
    let spec = ModelSpec::inception_net_small();
    let r = match args.device.open(&args.cuda)? {
        AnyBackend::Cpu(cpu) => {
            evaluate_file(Net::new(spec, cpu, 0)?, &file, &test, args.batch_size)?
        }
        AnyBackend::Gpu(gpu) => {
            evaluate_file(Net::new(spec, *gpu, 0)?, &file, &test, args.batch_size)?
        }
    };
    println!("checkpoint {}", args.checkpoint.display());
    println!("test images {}  loss {:.4}  accuracy {:.2}%", r.images, r.loss, r.accuracy * 100.0);
    println!("\nconfusion matrix (rows: true class, columns: predicted)");
    let names = incept::data::CLASSES;
    print!("{:>11}", "");
    for n in names {
        print!("{:>6}", &n[..n.len().min(5)]);
    }
    println!("{:>8}", "acc");
    for (i, row) in r.confusion.iter().enumerate() {
        print!("{:>11}", names[i]);
        for v in row {
            print!("{v:>6}");
        }
        let total: u64 = row.iter().sum();
        let acc = if total > 0 { row[i] as f64 / total as f64 * 100.0 } else { f64::NAN };
        println!("{acc:>7.1}%");
    }
    Ok(())
}

/// Loads `file` into `net` and evaluates it on `test`.
fn evaluate_file<B: Backend<f32>>(
    mut net: Net<f32, B>, file: &TensorFile, test: &Cifar10, batch: usize,
) -> Result<EvalResult> {
    incept::checkpoint::load_model(&mut net, file, "")?;
    train::evaluate(&mut net, test, batch)
}
