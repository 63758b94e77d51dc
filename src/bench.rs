//! `incept bench`: training and inference throughput of the seed model on random data.
//!
//! The training figure is a whole step (forward, loss, backward, SGD); the inference figure
//! is an eval-mode forward. On the CPU both are medians over timed steps after a warm-up, so
//! one noisy step does not move them. On CUDA a training step is what `incept train` runs
//! (batches built on the GPU from a resident synthetic set; replayed as a CUDA graph, or op by
//! op): the time of all timed steps with one sync at the end, divided by their number, since
//! a replayed step never waits for the host. On the emulated device the timings say nothing
//! of a GPU; its step profile (`backend::cuda::emu::profile`) models one.

use crate::backend::cpu::Cpu;
use crate::backend::select::{CudaArgs, DeviceFlag};
use crate::backend::{Backend, Sgd};
use crate::model::net::Net;
use crate::model::ModelSpec;
use crate::schedule::BranchSchedule;
use anyhow::Result;
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BenchOpts {
    pub batch: usize,
    pub warmup: usize,
    pub steps: usize,
    pub schedule: BranchSchedule,
}

#[derive(Clone, Debug)]
pub struct BenchResult {
    pub device: String,
    /// `fp32`, `amp-f16` or `amp-bf16`.
    pub precision: String,
    /// CUDA streams of the Inception branches (1: one stream for everything); 0 on the CPU.
    pub streams: usize,
    /// CUDA: training steps replayed as a CUDA graph.
    pub graph: bool,
    pub batch: usize,
    pub threads: usize,
    pub train_ms: f64,
    pub train_img_s: f64,
    pub eval_ms: f64,
    pub eval_img_s: f64,
    /// On the emulated device: one training step's operations and its modelled time on GPUs.
    pub profile: Option<crate::backend::cuda::emu::profile::Profile>,
}

impl BenchResult {
    /// `batch` images per step at the median `train` and `eval` step times (seconds), on one
    /// stream, without a graph or a profile.
    fn timed(device: &str, precision: &str, batch: usize, (train, eval): (f64, f64)) -> Self {
        BenchResult {
            device: device.to_string(),
            precision: precision.to_string(),
            streams: 0,
            graph: false,
            batch,
            threads: rayon::current_num_threads(),
            train_ms: train * 1e3,
            train_img_s: batch as f64 / train,
            eval_ms: eval * 1e3,
            eval_img_s: batch as f64 / eval,
            profile: None,
        }
    }

    pub fn to_json(&self) -> String {
        let mut v = serde_json::json!({
            "device": self.device,
            "precision": self.precision,
            "streams": self.streams,
            "graph": self.graph,
            "batch": self.batch,
            "threads": self.threads,
            "train_ms": self.train_ms,
            "train_img_s": self.train_img_s,
            "eval_ms": self.eval_ms,
            "eval_img_s": self.eval_img_s,
        });
        if let Some(p) = &self.profile {
            v["step_profile"] = p.bounds_json();
        }
        v.to_string()
    }
}

/// The optimizer of the timed training steps (the default recipe's, at a small lr).
const BENCH_SGD: Sgd = Sgd { lr: 0.01, momentum: 0.9, weight_decay: 5e-4, nesterov: true };

/// A fixed random NHWC batch of `n` images and labels for `spec`.
fn random_batch(spec: &ModelSpec, n: usize) -> (Vec<f32>, Vec<u32>) {
    let (c, h, w) = spec.input;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let x = (0..n * c * h * w).map(|_| rng.random_range(-2.0..2.0)).collect();
    let labels = (0..n).map(|_| rng.random_range(0..spec.classes as u32)).collect();
    (x, labels)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Times the seed model on the CPU backend.
pub fn bench_cpu(opts: &BenchOpts) -> Result<BenchResult> {
    let mut net: Net<f32, Cpu> = Net::new(ModelSpec::inception_net_small(), Cpu, 0)?;
    net.schedule = opts.schedule;
    bench_net(&mut net, opts, "cpu")
}

/// Times the seed model on a CUDA device as `cuda` asks (precision, streams, graph or not).
/// The training steps run on a synthetic set of `2·batch` images resident on the GPU, as
/// `incept train` runs them; the eval steps on a random batch from the host.
pub fn bench_cuda(opts: &BenchOpts, device: &DeviceFlag, cuda: &CudaArgs) -> Result<BenchResult> {
    use crate::backend::cuda::Gpu;
    use crate::data::{Augment, Cifar10, Split};
    use crate::stepper::{DeviceFeed, EagerStepper, GraphStepper, Stepper};
    let n = opts.batch;
    let dir = std::env::temp_dir().join(format!("incept-bench-{}-{n}", std::process::id()));
    crate::data::write_synthetic(&dir, 2 * n, 10, 0)?;
    let set = Cifar10::open(&dir, Split::Train);
    let _ = std::fs::remove_dir_all(&dir);
    let set = set?;
    let gpu = device.open_gpu(cuda)?;
    let feed = DeviceFeed::new(&gpu, &set, Augment::TRAIN, 0)?;
    let mut net: Net<f32, Gpu> = Net::new(ModelSpec::inception_net_small(), gpu, 0)?;
    net.schedule = BranchSchedule::Sequential;
    let mut graphed;
    let mut eager;
    let stepper: &mut dyn Stepper<Gpu> = if cuda.no_cuda_graph {
        eager = EagerStepper::new(feed);
        &mut eager
    } else {
        graphed = GraphStepper::new(feed);
        &mut graphed
    };
    let order: Vec<usize> = (0..2 * n).collect();
    let mut run = |net: &mut Net<f32, Gpu>, steps: usize, from: usize| -> Result<()> {
        for s in from..from + steps {
            let first = (s % 2) * n;
            let idx = &order[first..first + n];
            if let Some((loss, _)) = stepper.step(net, idx, 0, (s * n) as u64, &BENCH_SGD, 0.0)? {
                anyhow::ensure!(loss.is_finite(), "the loss became {loss} at step {s}");
            }
        }
        let (loss, _) = stepper.drain(net)?;
        anyhow::ensure!(loss.is_finite(), "the loss became {loss}");
        Ok(())
    };
    // The warm-up includes the graph's eager first step and its capture.
    run(&mut net, opts.warmup.max(3), 0)?;
    net.backend().synchronize()?;
    let t = Instant::now();
    run(&mut net, opts.steps, opts.warmup.max(3))?;
    net.backend().synchronize()?;
    let train = t.elapsed().as_secs_f64() / opts.steps as f64;
    // The emulated device records one more step, in the steady state the timed ones ran in.
    let dev = net.backend().device().clone();
    let profile = match dev.as_emu() {
        Some(emu) => {
            emu.profile_begin();
            run(&mut net, 1, opts.warmup.max(3) + opts.steps)?;
            net.backend().synchronize()?;
            Some(emu.profile_end())
        }
        None => None,
    };
    let (x, _) = random_batch(&net.spec, n);
    let mut times = Vec::with_capacity(opts.steps);
    for i in 0..opts.warmup + opts.steps {
        let t = Instant::now();
        net.forward(&x, n, false)?;
        if i >= opts.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let eval = median(times);
    Ok(BenchResult {
        streams: cuda.streams,
        graph: !cuda.no_cuda_graph,
        profile,
        ..BenchResult::timed(&device.to_string(), cuda.describe(device), n, (train, eval))
    })
}

/// One configuration of the benchmark matrix, with what it measured or why it could not.
#[derive(Clone, Debug)]
pub struct MatrixRow {
    pub precision: String,
    pub streams: usize,
    pub graph: bool,
    pub batch: usize,
    /// The error chain on one line, or a panic's message.
    pub result: std::result::Result<BenchResult, String>,
}

impl MatrixRow {
    /// [`BenchResult::to_json`], or the configuration with an `error` field, so a table made
    /// from the JSON lines shows which configuration failed and why.
    pub fn to_json(&self) -> String {
        match &self.result {
            Ok(r) => r.to_json(),
            Err(e) => serde_json::json!({
                "precision": self.precision,
                "streams": self.streams,
                "graph": self.graph,
                "batch": self.batch,
                "error": e,
            })
            .to_string(),
        }
    }
}

/// [`bench_cuda`] over {streams 1, 4} × {graph off, on} × {fp32, AMP fp16} × `batches`. A
/// configuration that fails (an error or a panic) becomes a row with the error and the others
/// still run: the matrix is where an untested path shows up first, and one broken
/// configuration should not hide the figures of the rest. `on_row` sees each row as soon as it
/// is measured, so a run killed by a time limit keeps the rows it finished.
pub fn bench_cuda_matrix(
    opts: &BenchOpts, device: &DeviceFlag, base: &CudaArgs, batches: &[usize],
    on_row: &mut dyn FnMut(&MatrixRow),
) -> Vec<MatrixRow> {
    let mut out = Vec::new();
    for &batch in batches {
        for no_amp in [true, false] {
            for no_cuda_graph in [true, false] {
                for streams in [1, 4] {
                    let cuda = CudaArgs {
                        no_amp,
                        amp_dtype: None,
                        streams,
                        no_cuda_graph,
                        ..base.clone()
                    };
                    let o = BenchOpts { batch, ..opts.clone() };
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        bench_cuda(&o, device, &cuda)
                    }));
                    let result = match result {
                        Ok(Ok(r)) => Ok(r),
                        Ok(Err(e)) => Err(format!("{e:#}")),
                        Err(p) => Err(format!(
                            "panicked: {}",
                            p.downcast_ref::<String>()
                                .map(String::as_str)
                                .or_else(|| p.downcast_ref::<&str>().copied())
                                .unwrap_or("?")
                        )),
                    };
                    let row = MatrixRow {
                        precision: cuda.describe(device).to_string(),
                        streams,
                        graph: !no_cuda_graph,
                        batch,
                        result,
                    };
                    on_row(&row);
                    out.push(row);
                }
            }
        }
    }
    out
}

/// Median step times of `net`. Each timed step ends by reading the loss or the logits back,
/// so queued device work is included.
fn bench_net<B: Backend<f32>>(
    net: &mut Net<f32, B>, opts: &BenchOpts, device: &str,
) -> Result<BenchResult> {
    let n = opts.batch;
    let (x, labels) = random_batch(&net.spec, n);
    let opt = BENCH_SGD;
    let time = |train: bool, net: &mut Net<f32, B>| -> Result<f64> {
        let mut times = Vec::with_capacity(opts.steps);
        for i in 0..opts.warmup + opts.steps {
            let t = Instant::now();
            if train {
                net.train_step(&x, &labels, &opt, 0.0)?;
            } else {
                net.forward(&x, n, false)?;
            }
            if i >= opts.warmup {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        Ok(median(times))
    };
    let train = time(true, net)?;
    let eval = time(false, net)?;
    Ok(BenchResult::timed(device, "fp32", n, (train, eval)))
}

/// f32 GEMM throughput of this machine through the same GEMM the convolutions use
/// (square `size`³ products, best of `reps`), in GFLOP/s: the ceiling to compare layers with.
pub fn gemm_ceiling(size: usize, reps: usize) -> f64 {
    let a = vec![1.0f32; size * size];
    let b = vec![0.5f32; size * size];
    let mut c = vec![0.0f32; size * size];
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        crate::backend::cpu::matmul(
            &mut c,
            size,
            (&a, size, 1),
            (&b, size, 1),
            size,
            size,
            size,
            false,
        );
        best = best.min(t.elapsed().as_secs_f64());
    }
    2.0 * (size as f64).powi(3) / best / 1e9
}

/// `incept bench --profile`: time per layer, forward and backward, over `opts.steps` training
/// steps (branches in sequence, so each layer's time is its own), with each convolution's
/// GFLOP/s next to the GEMM ceiling. GFLOP/s counts a direct convolution's multiply-adds, so
/// the Winograd layers (fewer multiplies for the same result) can exceed the ceiling.
pub fn profile_cpu(opts: &BenchOpts) -> Result<String> {
    use std::fmt::Write;
    let mut net: Net<f32, Cpu> = Net::new(ModelSpec::inception_net_small(), Cpu, 0)?;
    net.schedule = BranchSchedule::Sequential;
    let n = opts.batch;
    let (x, labels) = random_batch(&net.spec, n);
    let opt = BENCH_SGD;
    for _ in 0..opts.warmup {
        net.train_step(&x, &labels, &opt, 0.0)?;
    }
    net.profile = true;
    net.reset_layer_times();
    let t = Instant::now();
    for _ in 0..opts.steps {
        net.train_step(&x, &labels, &opt, 0.0)?;
    }
    let step_ms = t.elapsed().as_secs_f64() * 1e3 / opts.steps as f64;
    let train_times = net.layer_times();
    // The same layers in evaluation mode (BatchNorm with running statistics, no backward).
    net.reset_layer_times();
    let t = Instant::now();
    for _ in 0..opts.steps {
        net.forward(&x, n, false)?;
    }
    let eval_ms = t.elapsed().as_secs_f64() * 1e3 / opts.steps as f64;
    let eval_times = net.layer_times();
    let ceiling = gemm_ceiling(1024, 5);
    let steps = opts.steps as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "per-layer profile: batch {n}, {} threads, {} steps, branches in sequence; train {step_ms:.1} ms/step, eval {eval_ms:.1} ms/step; f32 GEMM ceiling {ceiling:.0} GFLOP/s (conv GF/s: direct-convolution FLOPs, so Winograd layers can exceed it)",
        rayon::current_num_threads(),
        opts.steps
    );
    let _ = writeln!(
        out,
        "{:<34} {:<15} {:>8} {:>8} {:>8} {:>8} {:>8}  kernels (fwd/dw/dx)",
        "layer", "op", "fwd ms", "bwd ms", "eval ms", "fwd GF/s", "bwd GF/s"
    );
    let (mut tf, mut tb, mut te) = (0.0, 0.0, 0.0);
    for (l, le) in train_times.iter().zip(&eval_times) {
        let (f, b) = (l.forward_s / steps * 1e3, l.backward_s / steps * 1e3);
        let e = le.forward_s / steps * 1e3;
        tf += f;
        tb += b;
        te += e;
        let rate = |flop: f64, ms: f64| {
            if flop > 0.0 && ms > 0.0 {
                format!("{:.0}", flop / ms / 1e6)
            } else {
                String::new()
            }
        };
        // The backward of a layer with an input gradient does two products (dx and dw); the
        // first layer computes no dx.
        let bwd_flop = if l.name == "block1.0" { l.forward_flop } else { 2.0 * l.forward_flop };
        let _ = writeln!(
            out,
            "{:<34} {:<15} {f:>8.2} {b:>8.2} {e:>8.2} {:>8} {:>8}  {}",
            l.name,
            l.op,
            rate(l.forward_flop, f),
            rate(bwd_flop, b),
            l.conv.map_or(String::new(), |c| {
                let [f, w, d] = crate::backend::cpu::conv_kernels(&c).map(|k| k.name());
                let d = if l.name == "block1.0" { "-" } else { d };
                format!("{f}/{w}/{d}")
            })
        );
    }
    let _ = writeln!(
        out,
        "{:<34} {:<15} {tf:>8.2} {tb:>8.2} {te:>8.2}   (train step + loss, SGD, input copy: {:.2} ms)",
        "total",
        "",
        step_ms - tf - tb
    );
    Ok(out)
}
