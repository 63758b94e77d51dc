//! `incept bench`: training and inference throughput of the seed model on random data; on
//! CUDA also the matrix of streams, graphs and precisions, on the emulated GPU a step profile.

use anyhow::{bail, Result};
use incept::backend::select::{CudaArgs, DeviceFlag};
use incept::bench::{bench_cpu, bench_cuda, bench_cuda_matrix, profile_cpu, BenchOpts, MatrixRow};
use incept::schedule::BranchSchedule;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Device to run on: `cpu`, `cuda[:N]` (a build with `--features cudnn`), or `emu`, the
    /// emulated GPU (the CUDA backend run on the CPU with a race and memory checker: a slow
    /// correctness tool). On `emu` the bench also prints one step's profile: its launches and
    /// library calls, bytes, FLOPs, critical path, and a modelled lower bound of its time on
    /// an H100 and an H200.
    #[arg(long, default_value = "cpu")]
    device: DeviceFlag,
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
    cuda: CudaArgs,
}

pub fn run(args: BenchArgs) -> Result<()> {
    args.device.check()?;
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
    super::set_threads(args.threads)?;
    if args.profile {
        if !args.device.is_cpu() {
            bail!("--profile times layers on the CPU only; use --device cpu (on a GPU, use Nsight Systems)");
        }
        print!(
            "{}",
            profile_cpu(&BenchOpts {
                batch,
                warmup: args.warmup,
                steps: args.steps,
                schedule: BranchSchedule::Sequential,
            })?
        );
        return Ok(());
    }
    let opts = BenchOpts { batch, warmup: args.warmup, steps: args.steps, schedule: args.branches };
    if args.matrix {
        if args.device.is_cpu() {
            bail!("--matrix compares CUDA streams and precisions; use --device cuda");
        }
        {
            let batches = args.batch_size.map_or(vec![128, 512], |b| vec![b]);
            let mut first = true;
            let rows = bench_cuda_matrix(&opts, &args.device, &args.cuda, &batches, &mut |row| {
                print_matrix(row, args.json, first);
                first = false;
            });
            let failed = rows.iter().filter(|r| r.result.is_err()).count();
            if failed > 0 {
                bail!("{failed} of {} benchmark configurations failed", rows.len());
            }
        }
        return Ok(());
    }
    let r = if args.device.is_cpu() {
        bench_cpu(&opts)?
    } else {
        bench_cuda(&opts, &args.device, &args.cuda)?
    };
    if args.json {
        println!("{}", r.to_json());
    } else {
        println!(
            "device {}  precision {}  threads {}  batch {}",
            r.device, r.precision, r.threads, r.batch
        );
        println!("train  {:8.2} ms/step  {:8.1} img/s", r.train_ms, r.train_img_s);
        println!("eval   {:8.2} ms/step  {:8.1} img/s", r.eval_ms, r.eval_img_s);
        if let Some(p) = &r.profile {
            print!("\n{}", p.report(r.batch));
        }
    }
    Ok(())
}

/// One row of the benchmark matrix, printed as soon as it is measured so that a run killed by
/// a time limit keeps what it finished. With `json` the table goes to stderr and stdout holds
/// only the JSON lines, one per row, ready for `benches/bench_report.py`.
fn print_matrix(row: &MatrixRow, json: bool, header: bool) {
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
    let mut table: Box<dyn Write> =
        if json { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) };
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
