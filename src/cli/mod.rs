//! The `incept` command line: the flags of every subcommand, one file each, and the dispatch.
//! The device flag is parsed here and opened by `incept::backend::select`.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use incept::train::TrainConfig;
use std::process::ExitCode;

mod bench;
mod data;
mod eval;
mod info;
mod report;
mod train;

#[derive(Parser)]
#[command(
    name = "incept",
    version,
    about = "Train Inception-style CNNs on CIFAR-10",
    after_help = "With no subcommand, `incept` runs `incept train` with the default recipe."
)]
pub struct Cli {
    /// Log format on stderr (filter with RUST_LOG, e.g. RUST_LOG=debug).
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Train on CIFAR-10 (the default command).
    Train(Box<TrainConfig>),
    /// Test accuracy and confusion matrix of a checkpoint.
    Eval(eval::EvalArgs),
    /// Draw a run's loss and accuracy curves to RUN/curves.svg.
    Report(report::ReportArgs),
    /// Dataset tools.
    #[command(subcommand)]
    Data(data::DataCommand),
    /// Measure training and inference images/s of the seed model on random data.
    Bench(bench::BenchArgs),
    /// CUDA driver, devices, cuDNN, and whether the kernels load.
    Info,
}

/// Flags of `incept train`, for running it when no subcommand is given.
#[derive(Parser)]
struct TrainDefaults {
    #[command(flatten)]
    cfg: TrainConfig,
}

/// Sizes rayon's global pool: `--workers`, or all cores.
fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        if t == 0 {
            bail!("--workers must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot start {t} threads: {e}"))?;
    }
    Ok(())
}

/// Runs the subcommand (`train` with the default recipe when none is given).
pub fn run(cli: Cli) -> Result<ExitCode> {
    let command = cli
        .command
        .unwrap_or_else(|| Command::Train(Box::new(TrainDefaults::parse_from(["incept"]).cfg)));
    match command {
        Command::Train(cfg) => return train::run(&cfg),
        Command::Eval(args) => eval::run(args)?,
        Command::Report(args) => report::run(args)?,
        Command::Data(command) => data::run(command)?,
        Command::Bench(args) => bench::run(args)?,
        Command::Info => return Ok(info::run()),
    }
    Ok(ExitCode::SUCCESS)
}
