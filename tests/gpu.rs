//! The CUDA backend against the CPU reference, op by op at the model's real shapes in fp32
//! and in mixed precision (fp16, bf16), then the PyTorch golden fixture, whole training steps,
//! loss scaling, determinism, and training on synthetic data through the binary.
//!
//! One suite, two devices: the real GPU in a `--features cudnn` build, the emulated GPU
//! (`--device emu`: the same backend code, kernels and call sequence, run on the CPU with the
//! race and memory checker) in the default build, so `cargo test` runs the whole CUDA backend
//! everywhere. `INCEPT_GPU_TEST_DEVICE=emu|cuda` overrides the choice.
//!
//! A plain program (no libtest harness), so that without a GPU every test reports itself
//! `skipped` with the reason, and the run ends with an `N passed, N failed, N skipped` line.
//! Without a driver, one test checks the error the binary gives instead. With
//! `INCEPT_EXPECT_GPU=1` (set by `gpu-check.sh`), a missing GPU fails each test instead.

mod common;

use incept::backend::cpu::Cpu;
use incept::backend::cuda::{emu::EmuOptions, DType, Gpu, GpuOptions};
use incept::backend::ops::*;
use incept::backend::{
    Affine, BatchNormCfg, BatchStats, Conv2d, MaxPool2d, Nhwc, RunningStats, Sgd,
};
use incept::model::net::{HostTensor, Net};
use incept::model::{ModelSpec, TensorKind};
use rand::{Rng, SeedableRng};

type Outcome = Result<(), String>;

/// Which device the suite runs on.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Cuda,
    Emu,
}

static TARGET: std::sync::OnceLock<Target> = std::sync::OnceLock::new();

fn target() -> Target {
    *TARGET.get_or_init(|| match std::env::var("INCEPT_GPU_TEST_DEVICE").as_deref() {
        Ok("emu") => Target::Emu,
        Ok("cuda") => Target::Cuda,
        _ if cfg!(feature = "cudnn") => Target::Cuda,
        _ => Target::Emu,
    })
}

/// The `--device` of the binary for the target.
fn device_flag() -> &'static str {
    match target() {
        Target::Cuda => "cuda",
        Target::Emu => "emu",
    }
}

/// Opens the target device with `opts`.
fn open(opts: GpuOptions) -> Result<Gpu, String> {
    let r = match target() {
        Target::Emu => Gpu::emulated(EmuOptions::default(), opts),
        #[cfg(feature = "cudnn")]
        Target::Cuda => Gpu::with_options(0, opts),
        #[cfg(not(feature = "cudnn"))]
        Target::Cuda => Err(anyhow::anyhow!(
            "this build has no CUDA driver support (build with --features cudnn)"
        )),
    };
    r.map_err(|e| format!("{e:#}"))
}

fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

fn uniform(r: &mut impl Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

/// `|got − want| ≤ atol + rtol·|want|` everywhere, else the first values and the worst element.
fn close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> Outcome {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    let mut worst = (0usize, 0f32);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        // Equal values pass even at a zero tolerance (an exact comparison), where the ratio
        // would be 0/0.
        let r = if g == w { 0.0 } else { (g - w).abs() / (atol + rtol * w.abs()) };
        if r.is_nan() || r > worst.1 {
            worst = (i, if r.is_nan() { f32::INFINITY } else { r });
        }
    }
    if worst.1 <= 1.0 {
        return Ok(());
    }
    let n = got.len().min(5);
    Err(format!(
        "{what}: worst at [{}]: gpu {} cpu {} ({:.1}x the tolerance atol {atol:e} + rtol {rtol:e})\n  gpu {:?}\n  cpu {:?}",
        worst.0,
        got[worst.0],
        want[worst.0],
        worst.1,
        &got[..n],
        &want[..n]
    ))
}

/// fp32 on both sides; the GPU sums in another order (cuDNN algorithms, block reductions).
const ATOL: f32 = 1e-4;
const RTOL: f32 = 1e-3;

/// A precision the GPU runs in, and what its comparison with the CPU allows.
#[derive(Clone, Copy)]
struct Prec {
    name: &'static str,
    dtype: DType,
    /// Rounds a host value as the GPU stores it in this precision. Inputs (activations,
    /// incoming gradients, convolution weights) are rounded on both sides, so what is left is
    /// the rounding of the GPU's own results.
    q: fn(f32) -> f32,
    /// Relative tolerance of a 16-bit result (also × the tensor's largest value as an
    /// absolute floor, for elements that are small because terms cancelled): a few units in
    /// the last place of the type (f16: 2^-11 = 4.9e-4; bf16: 2^-8 = 3.9e-3).
    tol: f32,
}

const FP32: Prec = Prec { name: "fp32", dtype: DType::F32, q: |v| v, tol: 0.0 };
const F16: Prec =
    Prec { name: "amp-f16", dtype: DType::F16, q: |v| half::f16::from_f32(v).to_f32(), tol: 5e-3 };
const BF16: Prec = Prec {
    name: "amp-bf16",
    dtype: DType::Bf16,
    q: |v| half::bf16::from_f32(v).to_f32(),
    tol: 4e-2,
};

impl Prec {
    fn gpu(&self) -> Result<Gpu, String> {
        open(GpuOptions { activations: self.dtype, ..GpuOptions::default() })
    }
    fn round(&self, v: Vec<f32>) -> Vec<f32> {
        v.into_iter().map(self.q).collect()
    }
    /// fp32: `atol`/`rtol` as given; 16-bit: [`Prec::tol`] relative and × max|want|.
    fn close(&self, what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> Outcome {
        if self.dtype == DType::F32 {
            return close(what, got, want, atol, rtol);
        }
        let max = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        close(&format!("{what} [{}]", self.name), got, want, self.tol * max.max(1e-6), self.tol)
    }
}

/// Relative L2 distance `|got − want| / |want|`, at most `max`.
fn close_l2(what: &str, got: &[f32], want: &[f32], max: f64) -> Outcome {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    let (mut d, mut w) = (0f64, 0f64);
    for (g, v) in got.iter().zip(want) {
        d += (*g as f64 - *v as f64).powi(2);
        w += (*v as f64).powi(2);
    }
    let rel = (d / w.max(1e-30)).sqrt();
    if rel <= max {
        return Ok(());
    }
    let n = got.len().min(5);
    Err(format!(
        "{what}: relative L2 distance {rel:.3e} > {max:e}\n  gpu {:?}\n  cpu {:?}",
        &got[..n],
        &want[..n]
    ))
}

fn conv_case<B: Backend<f32>>(
    be: &B, xs: Nhwc, conv: &Conv2d, seed: u64, p: &Prec,
) -> Vec<Vec<f32>> {
    let mut r = rng(seed);
    let ys = conv.out_shape(xs);
    let bound = 1.0 / ((conv.cin * conv.k * conv.k) as f32).sqrt();
    let x = be.upload_act(&p.round(uniform(&mut r, xs.len(), -1.0, 1.0)));
    let w = be.upload(&p.round(uniform(&mut r, conv.weight_len(), -bound, bound)));
    let b = be.upload(&uniform(&mut r, conv.cout, -bound, bound));
    let dy = be.upload_act(&p.round(uniform(&mut r, ys.len(), -1.0, 1.0)));
    let mut y = be.act_zeros(ys.len());
    be.conv2d_forward(&mut y, &x, &w, &b, xs, conv);
    let (mut dx, mut dw, mut db) =
        (be.act_zeros(xs.len()), be.zeros(conv.weight_len()), be.zeros(conv.cout));
    be.conv2d_backward(Some(&mut dx), &mut dw, &mut db, &dy, &x, &w, xs, conv);
    [y, dx, dw, db].iter().map(|t| be.download(t)).collect()
}

/// Every convolution of the seed model, at batch 16.
fn test_conv(p: &Prec) -> Outcome {
    let gpu = &p.gpu()?;
    let n = 16;
    let cases = [
        (Nhwc::new(n, 32, 32, 3), Conv2d { cin: 3, cout: 64, k: 7, stride: 2, pad: 1 }),
        (Nhwc::new(n, 14, 14, 64), Conv2d { cin: 64, cout: 128, k: 3, stride: 2, pad: 1 }),
        (Nhwc::new(n, 7, 7, 128), Conv2d { cin: 128, cout: 64, k: 1, stride: 1, pad: 0 }),
        (Nhwc::new(n, 7, 7, 16), Conv2d { cin: 16, cout: 64, k: 3, stride: 1, pad: 1 }),
        (Nhwc::new(n, 7, 7, 16), Conv2d { cin: 16, cout: 64, k: 5, stride: 1, pad: 2 }),
        (Nhwc::new(n, 7, 7, 128), Conv2d { cin: 128, cout: 64, k: 3, stride: 1, pad: 1 }),
        (Nhwc::new(n, 4, 4, 256), Conv2d { cin: 256, cout: 96, k: 1, stride: 1, pad: 0 }),
        (Nhwc::new(n, 4, 4, 32), Conv2d { cin: 32, cout: 96, k: 5, stride: 1, pad: 2 }),
        (Nhwc::new(n, 4, 4, 256), Conv2d { cin: 256, cout: 96, k: 3, stride: 1, pad: 1 }),
    ];
    for (i, (xs, conv)) in cases.iter().enumerate() {
        let g = conv_case(gpu, *xs, conv, i as u64, p);
        gpu.status().map_err(|e| format!("{e:#}"))?;
        let c = conv_case(&Cpu, *xs, conv, i as u64, p);
        for (name, (gv, cv)) in ["y", "dx", "dw", "db"].iter().zip(g.iter().zip(&c)) {
            p.close(&format!("conv {conv:?} on {xs:?}: {name}"), gv, cv, ATOL, RTOL)?;
        }
    }
    Ok(())
}

fn bn_case<B: Backend<f32>>(
    be: &B, xs: Nhwc, seed: u64, p: &Prec,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut r = rng(seed);
    let c = xs.c;
    let x = be.upload_act(&p.round(uniform(&mut r, xs.len(), -2.0, 3.0)));
    let gamma = be.upload(&uniform(&mut r, c, 0.5, 1.5));
    let beta = be.upload(&uniform(&mut r, c, -0.5, 0.5));
    let dy_host = p.round(uniform(&mut r, xs.len(), -1.0, 1.0));
    let dy = be.upload_act(&dy_host);
    let (mut rm, mut rv) =
        (be.upload(&uniform(&mut r, c, -0.1, 0.1)), be.upload(&uniform(&mut r, c, 0.9, 1.1)));
    let (mut mean, mut invstd, mut y) = (be.zeros(c), be.zeros(c), be.act_zeros(xs.len()));
    let cfg = BatchNormCfg::default();
    let affine = Affine { gamma: &gamma, beta: &beta };
    be.batch_norm_forward_train(
        &mut y,
        &x,
        affine,
        RunningStats { mean: &mut rm, var: &mut rv },
        BatchStats { mean: &mut mean, invstd: &mut invstd },
        xs,
        &cfg,
        false,
        None,
    )?;
    let (mut dx, mut dg, mut dbeta) = (be.act_zeros(xs.len()), be.zeros(c), be.zeros(c));
    let batch = BatchStats { mean: &mean, invstd: &invstd };
    let daffine = Affine { gamma: &mut dg, beta: &mut dbeta };
    be.batch_norm_backward(&mut dx, daffine, &dy, None, &x, &gamma, batch, xs, None);
    let mut ye = be.act_zeros(xs.len());
    let running = RunningStats { mean: &rm, var: &rv };
    be.batch_norm_forward_eval(&mut ye, &x, affine, running, xs, &cfg, false);
    // ReLU on the same host values on both sides (each side's own y differs from the other's
    // by the BatchNorm's rounding, and ReLU is compared exactly).
    let yq = be.upload_act(&p.round(uniform(&mut r, xs.len(), -1.0, 1.0)));
    let mut yr = be.act_zeros(xs.len());
    be.relu_forward(&mut yr, &yq);
    let mut g = be.upload_act(&dy_host);
    be.relu_backward(&mut g, &yr);
    // The fused BatchNorm+ReLU the network runs: forward (train, eval) and backward.
    let (mut fy, mut fm, mut fi) = (be.act_zeros(xs.len()), be.zeros(c), be.zeros(c));
    let (mut frm, mut frv) = (be.zeros(c), be.upload(&vec![1.0; c]));
    be.batch_norm_forward_train(
        &mut fy,
        &x,
        affine,
        RunningStats { mean: &mut frm, var: &mut frv },
        BatchStats { mean: &mut fm, invstd: &mut fi },
        xs,
        &cfg,
        true,
        None,
    )?;
    // The backward's mask is the forward's output: rounded copies on both sides, as above.
    let fyq = be.upload_act(&p.round(be.download(&fy)));
    let fdy = be.upload_act(&dy_host);
    let (mut fdx, mut fdg, mut fdb) = (be.act_zeros(xs.len()), be.zeros(c), be.zeros(c));
    let batch = BatchStats { mean: &fm, invstd: &fi };
    let daffine = Affine { gamma: &mut fdg, beta: &mut fdb };
    be.batch_norm_backward(&mut fdx, daffine, &fdy, Some(&fyq), &x, &gamma, batch, xs, None);
    let mut fe = be.act_zeros(xs.len());
    be.batch_norm_forward_eval(&mut fe, &x, affine, running, xs, &cfg, true);
    Ok([y, mean, invstd, rm, rv, dx, dg, dbeta, ye, yr, g, fy, fdx, fdg, fdb, fe]
        .iter()
        .map(|t| be.download(t))
        .collect())
}

/// BatchNorm (train, running statistics, eval, backward) and ReLU at every BN shape.
fn test_batch_norm_relu(p: &Prec) -> Outcome {
    let gpu = &p.gpu()?;
    let n = 16;
    let shapes = [
        Nhwc::new(n, 14, 14, 64),
        Nhwc::new(n, 7, 7, 128),
        Nhwc::new(n, 7, 7, 16),
        Nhwc::new(n, 7, 7, 64),
        Nhwc::new(n, 4, 4, 32),
        Nhwc::new(n, 4, 4, 96),
        Nhwc::new(2, 4, 4, 96),
    ];
    let names = [
        "y",
        "mean",
        "invstd",
        "running_mean",
        "running_var",
        "dx",
        "dgamma",
        "dbeta",
        "eval y",
        "relu y",
        "relu dx",
        "fused bn+relu y",
        "fused bn+relu dx",
        "fused bn+relu dgamma",
        "fused bn+relu dbeta",
        "fused bn+relu eval y",
    ];
    for (i, xs) in shapes.iter().enumerate() {
        let g = bn_case(gpu, *xs, 100 + i as u64, p).map_err(|e| format!("{e:#}"))?;
        gpu.status().map_err(|e| format!("{e:#}"))?;
        let c = bn_case(&Cpu, *xs, 100 + i as u64, p).map_err(|e| format!("{e:#}"))?;
        for (name, (gv, cv)) in names.iter().zip(g.iter().zip(&c)) {
            let what = format!("batch norm {xs:?}: {name}");
            if p.dtype != DType::F32 && *name == "relu y" {
                // ReLU only selects: exact in any precision.
                close(&what, gv, cv, 0.0, 0.0)?;
            } else {
                p.close(&what, gv, cv, ATOL, RTOL)?;
            }
        }
    }
    Ok(())
}

fn pool_case<B: Backend<f32>>(
    be: &B, xs: Nhwc, pool: &MaxPool2d, seed: u64, p: &Prec,
) -> Vec<Vec<f32>> {
    let mut r = rng(seed);
    // Values distinct within each image plane of a channel (a random permutation of
    // 0..H·W, /8: exact even in bf16), so no window has a tie: with ties the gradient's
    // destination is a convention, checked on the CPU by the gradient tests.
    let plane = xs.h * xs.w;
    let mut v = vec![0f32; xs.len()];
    for img in 0..xs.n {
        for ch in 0..xs.c {
            let mut perm: Vec<usize> = (0..plane).collect();
            for i in (1..plane).rev() {
                perm.swap(i, r.random_range(0..=i));
            }
            for (pix, &k) in perm.iter().enumerate() {
                v[(img * plane + pix) * xs.c + ch] = k as f32 / 8.0;
            }
        }
    }
    let ys = pool.out_shape(xs);
    let x = be.upload_act(&v);
    let dy = be.upload_act(&p.round(uniform(&mut r, ys.len(), -1.0, 1.0)));
    let (mut y, mut dx) = (be.act_zeros(ys.len()), be.act_zeros(xs.len()));
    be.max_pool2d_forward(&mut y, &x, xs, pool);
    be.max_pool2d_backward(&mut dx, &dy, &x, &y, xs, pool);
    let a = Nhwc::new(xs.n, 2, 2, xs.c);
    let xa = be.upload_act(&p.round(uniform(&mut r, a.len(), -1.0, 1.0)));
    let dya = be.upload_act(&p.round(uniform(&mut r, a.n * a.c, -1.0, 1.0)));
    let (mut ya, mut dxa) = (be.act_zeros(a.n * a.c), be.act_zeros(a.len()));
    be.avg_pool2d_forward(&mut ya, &xa, a);
    be.avg_pool2d_backward(&mut dxa, &dya, a);
    [y, dx, ya, dxa].iter().map(|t| be.download(t)).collect()
}

/// Max pooling (k3 s1 p1 in the branches, k3 s2 p1 after the blocks) and the 2×2 average.
fn test_pooling(p: &Prec) -> Outcome {
    let gpu = &p.gpu()?;
    let k3s1 = MaxPool2d { k: 3, stride: 1, pad: 1 };
    let k3s2 = MaxPool2d { k: 3, stride: 2, pad: 1 };
    for (i, (xs, pool)) in [
        (Nhwc::new(8, 7, 7, 128), k3s1),
        (Nhwc::new(8, 4, 4, 256), k3s1),
        (Nhwc::new(8, 7, 7, 256), k3s2),
        (Nhwc::new(8, 4, 4, 384), k3s2),
    ]
    .iter()
    .enumerate()
    {
        let g = pool_case(gpu, *xs, pool, 200 + i as u64, p);
        gpu.status().map_err(|e| format!("{e:#}"))?;
        let c = pool_case(&Cpu, *xs, pool, 200 + i as u64, p);
        for (name, (gv, cv)) in ["max y", "max dx", "avg y", "avg dx"].iter().zip(g.iter().zip(&c))
        {
            // Max pooling selects (exact in any type); the average rounds once in 16 bits.
            p.close(&format!("pooling {pool:?} on {xs:?}: {name}"), gv, cv, 1e-6, 1e-6)?;
        }
    }
    Ok(())
}

fn head_case<B: Backend<f32>>(be: &B, seed: u64, p: &Prec) -> Vec<Vec<f32>> {
    let mut r = rng(seed);
    let (n, fin, fout) = (16, 384, 10);
    let x = be.upload_act(&p.round(uniform(&mut r, n * fin, -1.0, 1.0)));
    let w = be.upload(&uniform(&mut r, fout * fin, -0.05, 0.05));
    let b = be.upload(&uniform(&mut r, fout, -0.05, 0.05));
    let mut y = be.zeros(n * fout);
    be.linear_forward(&mut y, &x, &w, &b, n, fin, fout);
    let labels: Vec<u32> = (0..n).map(|i| (i * 7 % 10) as u32).collect();
    let mut probs = be.zeros(n * fout);
    let loss = be.cross_entropy_forward(&mut probs, &y, &labels, fout, 0.1);
    let mut dl = be.zeros(n * fout);
    be.cross_entropy_backward(&mut dl, &probs, &labels, fout, 0.1);
    let (mut dx, mut dw, mut db) = (be.act_zeros(n * fin), be.zeros(fout * fin), be.zeros(fout));
    be.linear_backward(Some(&mut dx), &mut dw, &mut db, &dl, &x, &w, n, fin, fout);
    // The Inception join and its split, and the branch-gradient sum.
    let parts: Vec<_> = [64, 64, 64, 64]
        .iter()
        .map(|&c| be.upload_act(&p.round(uniform(&mut r, 98 * c, -1.0, 1.0))))
        .collect();
    let mut joined = be.act_zeros(98 * 256);
    be.concat_forward(&mut joined, &parts.iter().collect::<Vec<_>>(), &[64; 4]);
    let mut back: Vec<_> = (0..4).map(|_| be.act_zeros(98 * 64)).collect();
    be.concat_backward(&mut back.iter_mut().collect::<Vec<_>>(), &joined, &[64; 4]);
    let mut sum = be.act_zeros(98 * 64);
    be.fork_backward(&mut sum, &back.iter().collect::<Vec<_>>());
    // SGD, Nesterov, over three steps.
    let mut p = be.upload(&uniform(&mut r, 1000, -1.0, 1.0));
    let g = be.upload(&uniform(&mut r, 1000, -1.0, 1.0));
    let mut m = be.zeros(1000);
    let opt = Sgd { lr: 0.1, momentum: 0.9, weight_decay: 5e-4, nesterov: true };
    for step in 0..3 {
        be.sgd_step(&mut p, &g, &mut m, step == 0, &opt);
    }
    let mut out: Vec<Vec<f32>> =
        [y, dl, dx, dw, db, joined, sum, p, m].iter().map(|t| be.download(t)).collect();
    out.push(vec![loss as f32]);
    out.extend(back.iter().map(|t| be.download(t)));
    out
}

/// Linear head, cross-entropy with smoothing, concat/split, branch sum, SGD.
fn test_head_concat_sgd(p: &Prec) -> Outcome {
    let gpu = &p.gpu()?;
    let mut g = head_case(gpu, 300, p);
    gpu.status().map_err(|e| format!("{e:#}"))?;
    // In mixed precision the loss gradient comes out multiplied by the loss scale (a power of
    // two, so dividing it out is exact), and so does everything computed from it.
    let scale = gpu.read_loss_scale().map_err(|e| format!("{e:#}"))?.map_or(1.0, |(s, _)| s);
    for t in &mut g[1..=4] {
        t.iter_mut().for_each(|v| *v /= scale);
    }
    let c = head_case(&Cpu, 300, p);
    let names = [
        "linear y",
        "dlogits",
        "linear dx",
        "linear dw",
        "linear db",
        "concat",
        "fork sum",
        "sgd param",
        "sgd momentum",
        "loss",
        "split 0",
        "split 1",
        "split 2",
        "split 3",
    ];
    for (name, (gv, cv)) in names.iter().zip(g.iter().zip(&c)) {
        // In mixed precision the head still computes in fp32 from the same (rounded) inputs:
        // only its 16-bit outputs (dx, the branch-gradient sum) round once more.
        if p.dtype == DType::F32 || !matches!(*name, "linear dx" | "fork sum") {
            close(name, gv, cv, 1e-5, 1e-4)?;
        } else {
            p.close(name, gv, cv, 0.0, 0.0)?;
        }
    }
    Ok(())
}

fn train_steps<B: Backend<f32>>(
    net: &mut Net<f32, B>, steps: usize,
) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let mut r = rng(400);
    let n = 16;
    let x = uniform(&mut r, n * 32 * 32 * 3, -2.0, 2.0);
    let labels: Vec<u32> = (0..n).map(|_| r.random_range(0..10)).collect();
    let opt = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 5e-4, nesterov: true };
    let mut losses = Vec::new();
    for _ in 0..steps {
        losses.push(net.train_step(&x, &labels, &opt, 0.0)?.0 as f32);
    }
    let state: Vec<f32> = net
        .state()
        .into_iter()
        .flat_map(|(_, t)| match t {
            HostTensor::Float(v) => v,
            HostTensor::Int(c) => vec![c as f32],
        })
        .collect();
    Ok((losses, state))
}

/// The parameters (no running statistics or counters) of a network.
fn params<B: Backend<f32>>(net: &mut Net<f32, B>) -> Vec<f32> {
    net.state()
        .into_iter()
        .filter(|(info, _)| info.kind == TensorKind::Param)
        .flat_map(|(_, t)| match t {
            HostTensor::Float(v) => v,
            HostTensor::Int(_) => Vec::new(),
        })
        .collect()
}

/// A network on a GPU in precision `p`, with loss scale `scale` in mixed precision.
fn gpu_net(
    p: &Prec, seed: u64, scale: f32, deterministic: bool, streams: usize,
) -> Result<Net<f32, Gpu>, String> {
    let mut gpu =
        open(GpuOptions { activations: p.dtype, deterministic, streams, skip_wait: None })?;
    if p.dtype != DType::F32 {
        gpu.set_loss_scale(scale).map_err(|e| format!("{e:#}"))?;
    }
    let mut net =
        Net::new(ModelSpec::inception_net_small(), gpu, seed).map_err(|e| format!("{e:#}"))?;
    net.schedule = incept::schedule::BranchSchedule::Sequential;
    Ok(net)
}

/// Three whole training steps of the network on the GPU and on the CPU from the same weights,
/// with the branches on one stream and on four.
fn test_training_steps(p: &Prec) -> Outcome {
    for streams in [1, 4] {
        training_steps(p, streams).map_err(|e| format!("--streams {streams}: {e}"))?;
    }
    Ok(())
}

fn training_steps(p: &Prec, streams: usize) -> Outcome {
    // A loss scale that cannot overflow here, so no step is skipped and the trajectories are
    // comparable (the dynamic scale itself is checked by loss_scale_overflow_skips_step).
    let mut g = gpu_net(p, 9, 1024.0, false, streams)?;
    let mut c: Net<f32, Cpu> =
        Net::new(ModelSpec::inception_net_small(), Cpu, 9).map_err(|e| format!("{e:#}"))?;
    let (gl, gs) = train_steps(&mut g, 3).map_err(|e| format!("{e:#}"))?;
    let (cl, cs) = train_steps(&mut c, 3).map_err(|e| format!("{e:#}"))?;
    if p.dtype == DType::F32 {
        close("losses of 3 steps", &gl, &cl, 1e-4, 1e-3)?;
        // After 3 steps rounding differences have grown through the network: a looser bound.
        return close("weights, running statistics, counters after 3 steps", &gs, &cs, 1e-3, 1e-2);
    }
    if let Some((_, skipped)) = g.backend().read_loss_scale().map_err(|e| format!("{e:#}"))? {
        if skipped != 0 {
            return Err(format!("{skipped} of 3 steps skipped at loss scale 1024"));
        }
    }
    // 16-bit activations through 14 layers: the loss moves by about the type's precision
    // times the depth; the state after 3 steps is compared as a whole.
    close(&format!("losses of 3 steps [{}]", p.name), &gl, &cl, 0.0, 4.0 * p.tol)?;
    // The state after 3 steps: every BatchNorm β and conv bias gradient is a sum over the
    // batch's pixels of 16-bit dy with heavy cancellation, so one step already moves those
    // parameters 5-9% away from the fp32 CPU's (measured on the emulated GPU, whose
    // convolutions accumulate in fp32 as cuDNN's do); over the whole state that is 1.6e-3
    // (f16) / 4.7e-3 (bf16) after one step and 2.3e-2 / 4.3e-2 after three, momentum carrying
    // the differences on. 8 units of the type's tolerance bounds both with room.
    close_l2(
        &format!("weights, running statistics, counters after 3 steps [{}]", p.name),
        &gs,
        &cs,
        8.0 * p.tol as f64,
    )
}

/// A loss scale so large that the 16-bit gradients overflow: the step must be skipped on the
/// device (no parameter moves), the scale halved, and the skip counted.
fn test_loss_scale_overflow(p: &Prec) -> Outcome {
    // f16 overflows above 65504: a huge loss scale overflows its gradients. bf16 has fp32's
    // range, where no scale is sure to, so its overflow is injected: one NaN in the input
    // batch makes every gradient NaN, which the unscale kernel must flag just the same.
    let scale = 1e30f32;
    let scale = if p.dtype == DType::Bf16 { 1024.0 } else { scale };
    let mut g = gpu_net(p, 9, scale, false, 4)?;
    // Materialise the parameters once, then take one step.
    let before = params(&mut g);
    if p.dtype == DType::Bf16 {
        let mut r = rng(401);
        let mut x = uniform(&mut r, 16 * 32 * 32 * 3, -2.0, 2.0);
        x[0] = f32::NAN;
        let labels: Vec<u32> = (0..16).map(|_| r.random_range(0..10)).collect();
        let opt = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 5e-4, nesterov: true };
        g.train_step(&x, &labels, &opt, 0.0).map_err(|e| format!("{e:#}"))?;
    } else {
        train_steps(&mut g, 1).map_err(|e| format!("{e:#}"))?;
    }
    let after = params(&mut g);
    if before != after {
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        return Err(format!("{moved} parameters changed in a step whose gradients overflowed"));
    }
    match g.backend().read_loss_scale().map_err(|e| format!("{e:#}"))? {
        Some((s, 1)) if s == scale * 0.5 => {}
        other => {
            return Err(format!(
                "after an overflow expected (scale {}, 1 skipped step), got {other:?}",
                scale * 0.5
            ))
        }
    }
    // The next steps at a sane scale move the parameters again.
    g.backend_mut().set_loss_scale(1024.0).map_err(|e| format!("{e:#}"))?;
    train_steps(&mut g, 1).map_err(|e| format!("{e:#}"))?;
    if params(&mut g) == after {
        return Err("the parameters did not move at loss scale 1024".into());
    }
    Ok(())
}

/// `--deterministic`: a run of 3 steps with the branches on one stream and one with them on
/// four concurrent streams give the same bits (the same algorithms, the same per-branch work,
/// the branch gradients summed in the same order).
fn test_deterministic(p: &Prec) -> Outcome {
    let mut a = gpu_net(p, 5, 1024.0, true, 1)?;
    let mut b = gpu_net(p, 5, 1024.0, true, 4)?;
    let (la, sa) = train_steps(&mut a, 3).map_err(|e| format!("{e:#}"))?;
    let (lb, sb) = train_steps(&mut b, 3).map_err(|e| format!("{e:#}"))?;
    if la != lb {
        return Err(format!(
            "losses differ between deterministic runs on 1 and 4 streams: {la:?} vs {lb:?}"
        ));
    }
    if sa != sb {
        let n = sa.iter().zip(&sb).filter(|(x, y)| x.to_bits() != y.to_bits()).count();
        return Err(format!(
            "{n} state values differ between deterministic runs on 1 and 4 streams"
        ));
    }
    Ok(())
}

/// The PyTorch golden fixture (tests/fixtures) through the GPU in fp32, with the CPU's f32
/// tolerances (tests/common/golden.rs says why they are what they are).
fn test_golden_fp32() -> Outcome {
    let paths = std::panic::catch_unwind(common::golden::fixtures)
        .map_err(|_| "cannot list the fixtures: set INCEPT_FIXTURES to their folder".to_string())?;
    for path in paths {
        let r = std::panic::catch_unwind(|| {
            common::golden::run_fixture::<f32, Gpu>(
                &path,
                &common::golden::tols_f32(),
                "golden gpu fp32",
                &|| open(GpuOptions::default()).expect("the GPU opened a moment ago"),
            )
        });
        if let Err(e) = r {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            return Err(format!("{}: {msg}", path.display()));
        }
    }
    Ok(())
}

/// `incept train --device cuda` on a synthetic set, as tests/cli.rs does on the CPU: the same
/// recipe must get well above chance in 2 epochs (the CPU gets > 50% against 10%).
fn test_train_binary(p: &Prec) -> Outcome {
    let dir = scratch("train", p);
    let r = train_binary_on(&dir, "1200", p, &["--epochs", "2"], "x").and_then(|run| {
        let summary =
            std::fs::read_to_string(run.join("summary.csv")).map_err(|e| e.to_string())?;
        let last = summary.lines().last().unwrap_or_default().to_string();
        let acc: f64 = last
            .split(',')
            .nth(5)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no test_acc in summary.csv line {last:?}"))?;
        if acc > 0.5 {
            Ok(())
        } else {
            Err(format!("test accuracy {acc} after 2 epochs [{}]; the CPU gets > 0.5", p.name))
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// The training set on the GPU with batches rendered there (the default) against batches
/// built on the CPU and copied (`--host-batches`): the same images, so with deterministic
/// algorithms one epoch ends in the same checkpoint, byte for byte.
fn test_device_batches_match_host(p: &Prec) -> Outcome {
    let dir = scratch("feed", p);
    let r = (|| {
        // Both op by op: a replayed graph leaves out the partial last batch.
        let device = train_binary(
            &dir,
            p,
            &["--epochs", "1", "--deterministic", "--no-cuda-graph"],
            "device",
        )?;
        let host =
            train_binary(&dir, p, &["--epochs", "1", "--deterministic", "--host-batches"], "host")?;
        let read = |d: &std::path::Path| {
            std::fs::read(d.join("last.safetensors")).map_err(|e| format!("{}: {e}", d.display()))
        };
        if read(&device)? != read(&host)? {
            return Err(format!(
                "[{}] last.safetensors differs between batches built on the GPU and on the host",
                p.name
            ));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// The step captured as a CUDA graph and replayed (the default) against every step issued op
/// by op (`--no-cuda-graph`): 100 steps of one epoch (6000 images, batch 60, no partial
/// batch), with deterministic algorithms, end in the same checkpoint, byte for byte, and the
/// same training loss and accuracy (read back from the device in the graph's case); and a
/// refused capture (`INCEPT_REFUSE_CUDA_GRAPH`) falls back to eager steps, warning once.
fn test_graph_matches_eager(p: &Prec) -> Outcome {
    let dir = scratch("graph", p);
    let r = (|| {
        // 100 steps of 60 on a GPU; 10 steps of 24 on the emulated one.
        let (images, batch) = match target() {
            Target::Cuda => ("6000", "60"),
            Target::Emu => ("240", "24"),
        };
        let args = ["--epochs", "1", "--deterministic", "-b", batch];
        let graph = train_binary_on(&dir, images, p, &args, "graph")?;
        let mut eager_args = args.to_vec();
        eager_args.push("--no-cuda-graph");
        let eager = train_binary_on(&dir, images, p, &eager_args, "eager")?;
        let read = |d: &std::path::Path, f: &str| {
            std::fs::read(d.join(f)).map_err(|e| format!("{}: {e}", d.display()))
        };
        if read(&graph, "last.safetensors")? != read(&eager, "last.safetensors")? {
            return Err(format!(
                "[{}] last.safetensors differs between the replayed graph and eager steps",
                p.name
            ));
        }
        // epoch, lr, train_loss, train_acc, test_loss, test_acc (not the timings).
        let columns = |d: &std::path::Path| -> Result<Vec<String>, String> {
            let text = String::from_utf8_lossy(&read(d, "summary.csv")?).to_string();
            Ok(text.lines().map(|l| l.split(',').take(6).collect::<Vec<_>>().join(",")).collect())
        };
        let (g, e) = (columns(&graph)?, columns(&eager)?);
        if g != e {
            return Err(format!("[{}] summary differs:\n  graph {g:?}\n  eager {e:?}", p.name));
        }
        // A capture that fails is no failure of training: it warns once and goes on op by op,
        // to the same checkpoint.
        std::env::set_var("INCEPT_REFUSE_CUDA_GRAPH", "1");
        let refused = train_binary_on(&dir, images, p, &args, "refused");
        std::env::remove_var("INCEPT_REFUSE_CUDA_GRAPH");
        let refused = refused?;
        let log = std::fs::read_to_string(dir.join("last-stderr.txt")).unwrap_or_default();
        if log.matches("CUDA graph capture failed").count() != 1 {
            return Err(format!(
                "[{}] expected one warning about the failed capture, got:\n{log}",
                p.name
            ));
        }
        if read(&refused, "last.safetensors")? != read(&eager, "last.safetensors")? {
            return Err(format!(
                "[{}] after a refused capture, last.safetensors differs from eager steps",
                p.name
            ));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// A mixed-precision run saves its loss scale with the checkpoint, and `--resume` continues
/// from it (the scale is the same, within the growth/backoff steps of the resumed epoch).
fn test_resume_keeps_loss_scale(p: &Prec) -> Outcome {
    let dir = scratch("resume", p);
    let r = (|| {
        let run = train_binary(&dir, p, &["--epochs", "1"], "r")?;
        let state = run.join("last.state.safetensors");
        let file = incept::checkpoint::TensorFile::open(&state).map_err(|e| format!("{e:#}"))?;
        let (scale, _) = file
            .read_f64("train.loss_scale")
            .map_err(|e| format!("{}: no train.loss_scale: {e:#}", state.display()))?;
        if !(scale[0].is_finite() && scale[0] >= 1.0) {
            return Err(format!("saved loss scale {scale:?}"));
        }
        let last = run.join("last.safetensors");
        let last = last.to_str().ok_or("temp path is not UTF-8")?;
        train_binary(&dir, p, &["--epochs", "2", "--resume", last], "r")?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

fn scratch(what: &str, p: &Prec) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("incept-gpu-{what}-{}-{}", std::process::id(), p.name))
}

/// Trains through the binary on a synthetic set in `dir` (written on first use) with the
/// recipe of tests/cli.rs plus `extra`; returns the run folder.
fn train_binary(
    dir: &std::path::Path, p: &Prec, extra: &[&str], experiment: &str,
) -> Result<std::path::PathBuf, String> {
    // The emulated GPU runs about 50 images a second: a smaller set there.
    let images = match target() {
        Target::Cuda => "1200",
        Target::Emu => "300",
    };
    train_binary_on(dir, images, p, extra, experiment)
}

/// [`train_binary`] on a synthetic set of `train` images.
fn train_binary_on(
    dir: &std::path::Path, train: &str, p: &Prec, extra: &[&str], experiment: &str,
) -> Result<std::path::PathBuf, String> {
    let exe = incept_bin();
    let run = |args: &[&str]| -> Outcome {
        let out =
            std::process::Command::new(&exe).args(args).output().map_err(|e| e.to_string())?;
        // The last command's messages, for tests that look for a warning.
        let _ = std::fs::write(dir.join("last-stderr.txt"), &out.stderr);
        if !out.status.success() {
            return Err(format!(
                "incept {}: {:?}\n{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    };
    let data = dir.join("data");
    let d = data.to_str().ok_or("temp path is not UTF-8")?;
    if !data.join("test_batch.bin").exists() {
        run(&["data", "synth", "--out", d, "--train", train, "--test", "400", "--seed", "5"])?;
    }
    let out = dir.join("runs");
    let o = out.to_str().ok_or("temp path is not UTF-8")?;
    let mut args = vec![
        "train",
        "--data-dir",
        d,
        "--output",
        o,
        "--experiment",
        experiment,
        "--lr",
        "0.05",
        "--sched",
        "step",
        "--decay-epochs",
        "1",
        "--decay-rate",
        "0.5",
        "--seed",
        "3",
    ];
    // The recipe's batch of 64, unless the test sets its own.
    if !extra.contains(&"-b") {
        args.extend(["-b", "64"]);
    }
    args.extend_from_slice(extra);
    // The target device, unless the test names another.
    if !extra.contains(&"--device") {
        args.extend(["--device", device_flag()]);
    }
    let cpu = args.windows(2).any(|w| w == ["--device", "cpu"]);
    match p.dtype {
        _ if cpu => {}
        DType::F32 => args.push("--no-amp"),
        DType::F16 => args.extend(["--amp-dtype", "f16"]),
        DType::Bf16 => args.extend(["--amp-dtype", "bf16"]),
    }
    run(&args)?;
    Ok(out.join(experiment))
}

/// `incept train --device emu --no-amp --epochs 1 -b 16` on 1,200 synthetic images reaches
/// the test accuracy of `--device cpu` within 2 points: the same recipe, the same initial
/// weights and batches, so the two differ only by summation order. Fewer images stop training
/// mid-climb, where a summation order moves the test accuracy by several points (400 images:
/// 62.75% here against 64.00% on the CPU's AVX-512 path and 68.25% on its im2col path); at
/// 1,200 the three initial weights tried agree within a point.
fn test_emu_matches_cpu_accuracy() -> Outcome {
    let dir = scratch("accuracy", &FP32);
    let r = (|| {
        let args = ["--epochs", "1", "-b", "16"];
        let emu = train_binary_on(&dir, "1200", &FP32, &args, "emu")?;
        let mut cpu_args = args.to_vec();
        cpu_args.extend(["--device", "cpu"]);
        let cpu = train_binary_on(&dir, "1200", &FP32, &cpu_args, "cpu")?;
        let acc = |d: &std::path::Path| -> Result<f64, String> {
            let text = std::fs::read_to_string(d.join("summary.csv")).map_err(|e| e.to_string())?;
            let last = text.lines().last().unwrap_or_default().to_string();
            last.split(',')
                .nth(5)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("no test_acc in {last:?}"))
        };
        let (e, c) = (acc(&emu)?, acc(&cpu)?);
        println!("  test accuracy: emulated GPU {e:.4}, CPU {c:.4}");
        if (e - c).abs() > 0.02 {
            return Err(format!("test accuracy {e} on the emulated GPU, {c} on the CPU"));
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    r
}

/// Every kernel of `cuda/*.cu` and every kind of cuDNN/cuBLAS call the backend makes ran at
/// least once in this process's tests on the emulated GPU: a kernel never launched is either
/// untested or dead, and fails this until it is tested or removed.
fn test_coverage() -> Outcome {
    let mut ran = incept::backend::cuda::emu::total_counters();
    // What the training runs of the binary ran (see INCEPT_EMU_COUNTS in main).
    let file = counts_file();
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    for line in text.lines() {
        let mut it = line.split(' ');
        if let (Some(kind), Some(name), Some(Ok(n))) =
            (it.next(), it.next(), it.next().map(str::parse::<u64>))
        {
            let map = if kind == "kernel" { &mut ran.kernels } else { &mut ran.library };
            *map.entry(name.to_string()).or_default() += n;
        }
    }
    let mut missing = Vec::new();
    for k in kernel_emu_names() {
        let n = ran.kernels.get(&k).copied().unwrap_or(0);
        println!("  kernel {k}: {n} launches");
        if n == 0 {
            missing.push(k);
        }
    }
    for call in [
        "cudnnConvolutionForward",
        "cudnnConvolutionBackwardData",
        "cudnnConvolutionBackwardFilter",
        "cudnnAddTensor",
        "cudnnPoolingForward",
        "cudnnPoolingBackward",
        "cublasSgemm",
    ] {
        let n = ran.library.get(call).copied().unwrap_or(0);
        println!("  {call}: {n} calls");
        if n == 0 {
            missing.push(call.to_string());
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("never executed: {}", missing.join(", ")))
    }
}

/// Where the emulated devices of the binary's runs record what they ran.
fn counts_file() -> std::path::PathBuf {
    std::env::temp_dir().join(format!("incept-gpu-emu-counts-{}", std::process::id()))
}

/// The names of every `__global__` kernel of `cuda/*.cu`.
fn kernel_emu_names() -> Vec<String> {
    incept::backend::cuda::emu::kernel_names()
}

/// The binary under test: `INCEPT_BIN` (the GPU bundle's), else the one cargo built.
fn incept_bin() -> String {
    std::env::var("INCEPT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_incept").to_string())
}

/// Without a driver, the binary must say so clearly (and not panic).
#[cfg(feature = "cudnn")]
fn test_no_driver_error() -> Outcome {
    let out = std::process::Command::new(incept_bin())
        .args(["bench", "--device", "cuda", "--steps", "1"])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stderr);
    let clear = text.contains("--device cuda: driver: not found")
        && text.contains("install the NVIDIA driver")
        && text.contains("looked for libcuda.so.1");
    if out.status.success() || !clear || text.contains("panicked") {
        return Err(format!(
            "expected a clear no-driver error, got status {:?}:\n{text}",
            out.status
        ));
    }
    Ok(())
}

/// Counts and prints each result as soon as it is known, so a run cut short (a timeout on the
/// GPU machine) still shows every test that finished.
#[derive(Default)]
struct Tally {
    passed: usize,
    failed: usize,
    skipped: usize,
}

impl Tally {
    fn report(&mut self, name: &str, r: Result<Outcome, String>, secs: f64) {
        match r {
            Ok(Ok(())) => {
                self.passed += 1;
                println!("test {name} ... ok ({secs:.1} s)");
            }
            Ok(Err(e)) => {
                self.failed += 1;
                println!("test {name} ... FAILED ({secs:.1} s)\n{e}");
            }
            Err(why) => {
                self.skipped += 1;
                println!("test {name} ... skipped: {}", why.lines().next().unwrap_or(&why));
            }
        }
        use std::io::Write;
        let _ = std::io::stdout().flush();
    }
}

/// Runs `f`, turning a panic into a failure with its message.
fn guarded(f: &dyn Fn() -> Outcome) -> Outcome {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|e| {
        let msg = e
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        Err(format!("panicked: {msg}"))
    })
}

fn main() {
    // The GPU is checked against the CPU's reference convolutions (im2col + GEMM), the
    // specification, rather than its Winograd fast path, whose rounding (1e-5 – 3e-5 of the
    // largest output) would use up much of the fp32 tolerance near zero. Read once, before
    // any convolution runs.
    std::env::set_var("INCEPT_CPU_CONV", "reference");
    // An optional argument keeps only the tests whose names contain it.
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    println!("device: {:?}", target());
    if target() == Target::Emu {
        // The binary's emulated devices add what they ran to this file (for the coverage test).
        std::env::set_var("INCEPT_EMU_COUNTS", counts_file());
    }
    let device = open(GpuOptions::default()).map(|_| ());
    // On a machine that is meant to have a GPU, a test skipped for want of one would let a
    // broken driver or library setup pass as green: there it fails instead, with the reason.
    let expect_gpu = std::env::var("INCEPT_EXPECT_GPU").is_ok_and(|v| v == "1");
    if expect_gpu {
        if let Err(why) = &device {
            println!("INCEPT_EXPECT_GPU=1 but no GPU opens: every GPU test fails\n  {why}");
        }
    }
    let mut tally = Tally::default();
    let mut run = |name: String, f: &dyn Fn() -> Outcome| {
        if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
            return;
        }
        let t = std::time::Instant::now();
        let r = match &device {
            Err(why) if expect_gpu => Ok(Err(format!("no GPU (INCEPT_EXPECT_GPU=1): {why}"))),
            Err(why) => Err(why.clone()),
            Ok(()) => Ok(guarded(f)),
        };
        tally.report(&name, r, t.elapsed().as_secs_f64());
    };
    // Op by op first (fast), then whole steps, then runs of the binary.
    for p in [FP32, F16, BF16] {
        let tag = p.name.replace('-', "_");
        run(format!("conv2d_gpu_matches_cpu_{tag}"), &|| test_conv(&p));
        run(format!("batch_norm_relu_gpu_matches_cpu_{tag}"), &|| test_batch_norm_relu(&p));
        run(format!("pooling_gpu_matches_cpu_{tag}"), &|| test_pooling(&p));
        run(format!("head_concat_sgd_gpu_matches_cpu_{tag}"), &|| test_head_concat_sgd(&p));
    }
    run("golden_fixture_gpu_fp32".into(), &test_golden_fp32);
    for p in [FP32, F16, BF16] {
        let tag = p.name.replace('-', "_");
        run(format!("training_steps_gpu_match_cpu_{tag}"), &|| test_training_steps(&p));
        run(format!("deterministic_runs_are_bitwise_equal_{tag}"), &|| test_deterministic(&p));
    }
    for p in [F16, BF16] {
        let tag = p.name.replace('-', "_");
        run(format!("loss_scale_overflow_skips_step_{tag}"), &|| test_loss_scale_overflow(&p));
        run(format!("resume_keeps_the_loss_scale_{tag}"), &|| test_resume_keeps_loss_scale(&p));
    }
    for p in [FP32, F16, BF16] {
        let tag = p.name.replace('-', "_");
        if target() == Target::Cuda {
            run(format!("train_binary_learns_{tag}"), &|| test_train_binary(&p));
        }
        run(format!("cuda_graph_replays_match_eager_steps_{tag}"), &|| {
            test_graph_matches_eager(&p)
        });
        run(format!("device_batches_match_host_batches_{tag}"), &|| {
            test_device_batches_match_host(&p)
        });
    }
    if target() == Target::Emu {
        run(
            "emulated_training_reaches_the_cpu_accuracy_fp32".into(),
            &test_emu_matches_cpu_accuracy,
        );
        // Last: it counts what every test before it ran.
        if filter.is_none() {
            run("every_kernel_and_library_call_ran".into(), &test_coverage);
        }
        let _ = std::fs::remove_file(counts_file());
    }
    #[cfg(feature = "cudnn")]
    {
        // Needs no GPU: every kernel of cuda/*.cu is in the embedded PTX.
        let missing = incept::backend::cuda::missing_kernels();
        tally.report(
            "embedded_ptx_defines_every_kernel",
            Ok(if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("kernels missing from the PTX: {}", missing.join(", ")))
            }),
            0.0,
        );
        let no_driver = match &device {
            Err(why) if why.contains("driver: not found") => Ok(test_no_driver_error()),
            _ => Err("a driver is present".to_string()),
        };
        tally.report("no_driver_error_is_clear", no_driver, 0.0);
    }
    println!("\n{} passed, {} failed, {} skipped", tally.passed, tally.failed, tally.skipped);
    if tally.failed > 0 {
        std::process::exit(1);
    }
}
