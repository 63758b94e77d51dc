//! `incept bench`: training and inference throughput of the seed model on random data.
//!
//! The training figure is a whole step (forward, loss, backward, SGD); the inference figure
//! is an eval-mode forward. Both are medians over timed steps after a warm-up, so one noisy
//! step does not move them.

use crate::backend::cpu::Cpu;
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
    pub batch: usize,
    pub threads: usize,
    pub train_ms: f64,
    pub train_img_s: f64,
    pub eval_ms: f64,
    pub eval_img_s: f64,
}

impl BenchResult {
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "device": self.device,
            "batch": self.batch,
            "threads": self.threads,
            "train_ms": self.train_ms,
            "train_img_s": self.train_img_s,
            "eval_ms": self.eval_ms,
            "eval_img_s": self.eval_img_s,
        })
        .to_string()
    }
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

/// Times the seed model in fp32 on a CUDA device (one stream, branches in order).
#[cfg(feature = "cudnn")]
pub fn bench_cuda(opts: &BenchOpts, device: &str) -> Result<BenchResult> {
    use crate::backend::cuda::{parse_device, Gpu};
    let gpu = Gpu::new(parse_device(device)?)?;
    let mut net: Net<f32, Gpu> = Net::new(ModelSpec::inception_net_small(), gpu, 0)?;
    net.schedule = BranchSchedule::Sequential;
    bench_net(&mut net, opts, device)
}

/// Median step times of `net`. Each timed step ends by reading the loss or the logits back,
/// so queued device work is included.
fn bench_net<B: Backend<f32>>(
    net: &mut Net<f32, B>,
    opts: &BenchOpts,
    device: &str,
) -> Result<BenchResult> {
    let (c, h, w) = net.spec.input;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let n = opts.batch;
    let x: Vec<f32> = (0..n * c * h * w)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect();
    let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..10)).collect();
    let opt = Sgd {
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 5e-4,
        nesterov: true,
    };
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
    Ok(BenchResult {
        device: device.to_string(),
        batch: n,
        threads: rayon::current_num_threads(),
        train_ms: train * 1e3,
        train_img_s: n as f64 / train,
        eval_ms: eval * 1e3,
        eval_img_s: n as f64 / eval,
    })
}
