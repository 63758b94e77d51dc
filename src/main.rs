//! The `incept` command line: parses flags, sets up logging, calls the library.

use anyhow::{bail, Result};
use clap::{Parser, Subcommand, ValueEnum};
use incept::bench::{bench_cpu, BenchOpts};
use incept::schedule::BranchSchedule;
use incept::train::{self, Outcome, TrainConfig};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

#[derive(Parser)]
#[command(
    name = "incept",
    version,
    about = "Train Inception-style CNNs on CIFAR-10",
    after_help = "With no subcommand, `incept` runs `incept train` with the default recipe."
)]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG, e.g. RUST_LOG=debug).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Train on CIFAR-10 (the default command).
    Train(Box<TrainConfig>),
    /// Test accuracy and confusion matrix of a checkpoint.
    Eval(EvalArgs),
    /// Draw a run's loss and accuracy curves to RUN/curves.svg.
    Report {
        /// The run folder (holds summary.csv).
        run: PathBuf,
    },
    /// Dataset tools.
    #[command(subcommand)]
    Data(DataCommand),
    /// Measure training and inference images/s of the seed model on random data.
    Bench(BenchArgs),
    /// CUDA driver, devices, cuDNN, and whether the kernels load.
    Info,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write a small synthetic dataset with learnable classes, in the CIFAR-10 binary format.
    Synth {
        /// Folder to write data_batch_1..5.bin and test_batch.bin into.
        #[arg(long)]
        out: PathBuf,
        /// Training images (spread over the five batch files).
        #[arg(long, default_value_t = 5000)]
        train: usize,
        /// Test images.
        #[arg(long, default_value_t = 1000)]
        test: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Print the images per class of a CIFAR-10 folder and any problem found.
    Check {
        #[arg(default_value = "data/cifar-10-batches-bin")]
        dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct EvalArgs {
    /// Checkpoint to evaluate (incept's, or the seed PyTorch model's state_dict in safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Folder holding test_batch.bin.
    #[arg(long, default_value = "data/cifar-10-batches-bin")]
    data_dir: PathBuf,
    /// Images per step.
    #[arg(short = 'b', long, default_value_t = 500)]
    batch_size: usize,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// CPU threads (default: all cores).
    #[arg(short = 'j', long = "workers", alias = "threads")]
    threads: Option<usize>,
    #[command(flatten)]
    cuda: train::CudaArgs,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Device to run on: `cpu`, `cuda[:N]` (a build with `--features cudnn`), or `emu`, the
    /// emulated GPU (the CUDA backend run on the CPU with a race and memory checker: a slow
    /// correctness tool). On `emu` the bench also prints one step's profile: its launches and
    /// library calls, bytes, FLOPs, critical path, and a modelled lower bound of its time on
    /// an H100 and an H200.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Images per step (default 128; with --matrix, both 128 and 512).
    #[arg(short = 'b', long = "batch-size")]
    batch_size: Option<usize>,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// CPU threads (default: all cores).
    #[arg(short = 'j', long = "workers", alias = "threads")]
    threads: Option<usize>,
    /// How the branches of each Inception block run.
    #[arg(long, value_enum, default_value = "concurrent")]
    branches: BranchSchedule,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Time every layer (CPU): forward and backward ms and each convolution's GFLOP/s.
    #[arg(long)]
    profile: bool,
    /// CUDA: the whole matrix {--streams 1, 4} × {CUDA graph off, on} × {fp32, AMP fp16} ×
    /// batch {128, 512} (or the --batch-size given), as a table and, with --json, one JSON
    /// object per line.
    #[arg(long)]
    matrix: bool,
    #[command(flatten)]
    cuda: train::CudaArgs,
}

/// Flags of `incept train`, for running it when no subcommand is given.
#[derive(Parser)]
struct TrainDefaults {
    #[command(flatten)]
    cfg: TrainConfig,
}

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

fn bench(args: BenchArgs) -> Result<()> {
    train::check_device(&args.device)?;
    args.cuda.validate(&args.device)?;
    let batch = args.batch_size.unwrap_or(128);
    if batch < 2 {
        bail!(
            "--batch-size must be at least 2 (BatchNorm needs two values per channel in training)"
        );
    }
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    set_threads(args.threads)?;
    if args.profile {
        if args.device != "cpu" {
            bail!("--profile times layers on the CPU only; use --device cpu (on a GPU, use Nsight Systems)");
        }
        print!(
            "{}",
            incept::bench::profile_cpu(&BenchOpts {
                batch,
                warmup: args.warmup,
                steps: args.steps,
                schedule: BranchSchedule::Sequential,
            })?
        );
        return Ok(());
    }
    let opts = BenchOpts {
        batch,
        warmup: args.warmup,
        steps: args.steps,
        schedule: args.branches,
    };
    if args.matrix {
        if args.device == "cpu" {
            bail!("--matrix compares CUDA streams and precisions; use --device cuda");
        }
        {
            let batches = args.batch_size.map_or(vec![128, 512], |b| vec![b]);
            let mut first = true;
            let rows = incept::bench::bench_cuda_matrix(
                &opts,
                &args.device,
                &args.cuda,
                &batches,
                &mut |row| {
                    print_matrix(row, args.json, first);
                    first = false;
                },
            );
            let failed = rows.iter().filter(|r| r.result.is_err()).count();
            if failed > 0 {
                bail!("{failed} of {} benchmark configurations failed", rows.len());
            }
        }
        return Ok(());
    }
    let r = if args.device == "cpu" {
        bench_cpu(&opts)?
    } else {
        incept::bench::bench_cuda(&opts, &args.device, &args.cuda)?
    };
    if args.json {
        println!("{}", r.to_json());
    } else {
        println!(
            "device {}  precision {}  threads {}  batch {}",
            r.device, r.precision, r.threads, r.batch
        );
        println!(
            "train  {:8.2} ms/step  {:8.1} img/s",
            r.train_ms, r.train_img_s
        );
        println!(
            "eval   {:8.2} ms/step  {:8.1} img/s",
            r.eval_ms, r.eval_img_s
        );
        if let Some(p) = &r.profile {
            print!("\n{}", p.report(r.batch));
        }
    }
    Ok(())
}

/// One row of the benchmark matrix, printed as soon as it is measured so that a run killed by
/// a time limit keeps what it finished. With `json` the table goes to stderr and stdout holds
/// only the JSON lines, one per row, ready for `benches/bench_report.py`.
fn print_matrix(row: &incept::bench::MatrixRow, json: bool, header: bool) {
    use std::io::Write;
    let mut line = format!(
        "{:<10} {:>7} {:>6} {:>6}",
        row.precision,
        row.streams,
        if row.graph { "on" } else { "off" },
        row.batch
    );
    match &row.result {
        Ok(r) => {
            line += &format!(
                " {:>10.2} {:>12.1} {:>10.2} {:>12.1}",
                r.train_ms, r.train_img_s, r.eval_ms, r.eval_img_s
            )
        }
        Err(e) => line += &format!("  error: {}", e.replace('\n', " / ")),
    }
    let mut table: Box<dyn Write> = if json {
        Box::new(std::io::stderr())
    } else {
        Box::new(std::io::stdout())
    };
    if header {
        let _ = writeln!(
            table,
            "{:<10} {:>7} {:>6} {:>6} {:>10} {:>12} {:>10} {:>12}",
            "precision",
            "streams",
            "graph",
            "batch",
            "train ms",
            "train img/s",
            "eval ms",
            "eval img/s"
        );
    }
    let _ = writeln!(table, "{line}");
    let _ = table.flush();
    if json {
        println!("{}", row.to_json());
        let _ = std::io::stdout().flush();
    }
}

fn eval(args: EvalArgs) -> Result<()> {
    use incept::backend::cpu::Cpu;
    use incept::model::{net::Net, ModelSpec};
    train::check_device(&args.device)?;
    args.cuda.validate(&args.device)?;
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    set_threads(args.threads)?;
    let test = incept::data::Cifar10::open(&args.data_dir, incept::data::Split::Test)?;
    let file = incept::checkpoint::TensorFile::open(&args.checkpoint)?;
    let spec = ModelSpec::inception_net_small();
    let r = if args.device != "cpu" {
        let gpu = train::open_gpu(&args.device, &args.cuda)?;
        let mut net: Net<f32, incept::backend::cuda::Gpu> = Net::new(spec, gpu, 0)?;
        incept::checkpoint::load_model(&mut net, &file, "")?;
        train::evaluate(&mut net, &test, args.batch_size)?
    } else {
        let mut net: Net<f32, Cpu> = Net::new(spec, Cpu, 0)?;
        incept::checkpoint::load_model(&mut net, &file, "")?;
        train::evaluate(&mut net, &test, args.batch_size)?
    };
    println!("checkpoint {}", args.checkpoint.display());
    println!(
        "test images {}  loss {:.4}  accuracy {:.2}%",
        r.images,
        r.loss,
        r.accuracy * 100.0
    );
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
        let acc = if total > 0 {
            row[i] as f64 / total as f64 * 100.0
        } else {
            f64::NAN
        };
        println!("{acc:>7.1}%");
    }
    Ok(())
}

/// Prints the build, the CPU and, in the CUDA build, every NVIDIA library and device. Exits
/// with status 1 when the CUDA build finds no usable GPU, so scripts can test for one.
fn info() -> ExitCode {
    println!("incept {}", env!("CARGO_PKG_VERSION"));
    println!("cpu: {} threads", rayon::current_num_threads());
    #[cfg(feature = "cudnn")]
    {
        let (text, usable) = incept::backend::cuda::info();
        print!("{text}");
        if !usable {
            return ExitCode::FAILURE;
        }
    }
    #[cfg(not(feature = "cudnn"))]
    println!("cuda: not in this build (rebuild with `cargo build --release --features cudnn`)");
    ExitCode::SUCCESS
}

fn run(cli: Cli) -> Result<ExitCode> {
    let command = cli
        .command
        .unwrap_or_else(|| Command::Train(Box::new(TrainDefaults::parse_from(["incept"]).cfg)));
    match command {
        Command::Train(cfg) => {
            set_threads(cfg.threads)?;
            let (run_dir, outcome) = train::train(&cfg)?;
            if outcome == Outcome::Interrupted {
                eprintln!(
                    "interrupted; continue with: incept train --resume {}",
                    run_dir.join("last.safetensors").display()
                );
                return Ok(ExitCode::from(130));
            }
            println!("run folder: {}", run_dir.display());
        }
        Command::Eval(args) => eval(args)?,
        Command::Report { run } => println!("{}", incept::report::report(&run)?.display()),
        Command::Data(DataCommand::Synth {
            out,
            train,
            test,
            seed,
        }) => {
            incept::data::write_synthetic(&out, train, test, seed)?;
            println!(
                "wrote {train} training and {test} test images to {}",
                out.display()
            );
        }
        Command::Data(DataCommand::Check { dir }) => print!("{}", incept::data::check(&dir)?),
        Command::Bench(args) => bench(args)?,
        Command::Info => return Ok(info()),
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    incept::keep_freed_memory();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    // First Ctrl-C: finish the step, save, exit 130. Second: exit at once (checkpoints are
    // written atomically, so none is left half-written).
    let _ = ctrlc::set_handler(|| {
        if train::STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!(
            "\nCtrl-C: finishing the current step and saving a checkpoint (again to quit now)"
        );
    });
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
