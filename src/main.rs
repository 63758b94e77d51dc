//! The `incept` command line: parses flags, sets up logging, calls the library.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use incept::bench::{bench_cpu, BenchOpts};
use incept::schedule::BranchSchedule;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "incept",
    version,
    about = "Train Inception-style CNNs on CIFAR-10"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Measure training and inference images/s of the seed model on random data.
    Bench(BenchArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Schedule {
    /// Branches of a block one after another.
    Sequential,
    /// Branches of a block concurrently.
    Concurrent,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Device to run on (`cpu`; `cuda` needs a build with `--features cudnn`).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Images per step.
    #[arg(short = 'b', long = "batch-size", default_value_t = 128)]
    batch_size: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// CPU threads (default: all cores).
    #[arg(long, short = 'j', alias = "workers")]
    threads: Option<usize>,
    /// How the branches of each Inception block run.
    #[arg(long, value_enum, default_value = "concurrent")]
    schedule: Schedule,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        if t == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .map_err(|e| anyhow::anyhow!("cannot start {t} threads: {e}"))?;
    }
    Ok(())
}

fn bench(args: BenchArgs) -> Result<()> {
    if args.device != "cpu" {
        bail!(
            "--device {}: this build has only the CPU backend; use --device cpu",
            args.device
        );
    }
    if args.batch_size < 2 {
        bail!(
            "--batch-size must be at least 2 (BatchNorm needs two values per channel in training)"
        );
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    set_threads(args.threads)?;
    let schedule = match args.schedule {
        Schedule::Sequential => BranchSchedule::Sequential,
        Schedule::Concurrent => BranchSchedule::Concurrent,
    };
    let r = bench_cpu(&BenchOpts {
        batch: args.batch_size,
        warmup: args.warmup,
        steps: args.steps,
        schedule,
    })?;
    if args.json {
        println!("{}", r.to_json());
    } else {
        println!("device cpu  threads {}  batch {}", r.threads, r.batch);
        println!(
            "train  {:8.2} ms/step  {:8.1} img/s",
            r.train_ms, r.train_img_s
        );
        println!(
            "eval   {:8.2} ms/step  {:8.1} img/s",
            r.eval_ms, r.eval_img_s
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Bench(args)) => bench(args),
        None => {
            use clap::CommandFactory;
            let _ = Cli::command().print_help();
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
