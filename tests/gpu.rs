//! The CUDA backend against the CPU reference, op by op at the model's real shapes, then a
//! whole training step, then training on synthetic data. Built only with `--features cudnn`.
//!
//! A plain program (no libtest harness), so that without a GPU every test reports itself
//! `skipped` with the reason, and the run ends with an `N passed, N failed, N skipped` line.
//! Without a driver, one test checks the error the binary gives instead.

use incept::backend::cpu::Cpu;
use incept::backend::cuda::Gpu;
use incept::backend::{Backend, BatchNormCfg, Conv2d, MaxPool2d, Nhwc, Sgd};
use incept::model::net::{HostTensor, Net};
use incept::model::ModelSpec;
use rand::{Rng, SeedableRng};

type Outcome = Result<(), String>;

fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}

fn uniform(r: &mut impl Rng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

/// `|got − want| ≤ atol + rtol·|want|` everywhere, else the first values and the worst element.
fn close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) -> Outcome {
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} values, expected {}",
            got.len(),
            want.len()
        ));
    }
    let mut worst = (0usize, 0f32);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let r = (g - w).abs() / (atol + rtol * w.abs());
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

fn conv_case<B: Backend<f32>>(be: &B, xs: Nhwc, conv: &Conv2d, seed: u64) -> Vec<Vec<f32>> {
    let mut r = rng(seed);
    let ys = conv.out_shape(xs);
    let bound = 1.0 / ((conv.cin * conv.k * conv.k) as f32).sqrt();
    let x = be.upload(&uniform(&mut r, xs.len(), -1.0, 1.0));
    let w = be.upload(&uniform(&mut r, conv.weight_len(), -bound, bound));
    let b = be.upload(&uniform(&mut r, conv.cout, -bound, bound));
    let dy = be.upload(&uniform(&mut r, ys.len(), -1.0, 1.0));
    let mut y = be.zeros(ys.len());
    be.conv2d_forward(&mut y, &x, &w, &b, xs, conv);
    let (mut dx, mut dw, mut db) = (
        be.zeros(xs.len()),
        be.zeros(conv.weight_len()),
        be.zeros(conv.cout),
    );
    be.conv2d_backward(Some(&mut dx), &mut dw, &mut db, &dy, &x, &w, xs, conv);
    [y, dx, dw, db].iter().map(|t| be.download(t)).collect()
}

/// Every convolution of the seed model, at batch 16.
fn test_conv(gpu: &Gpu) -> Outcome {
    let n = 16;
    let cases = [
        (
            Nhwc::new(n, 32, 32, 3),
            Conv2d {
                cin: 3,
                cout: 64,
                k: 7,
                stride: 2,
                pad: 1,
            },
        ),
        (
            Nhwc::new(n, 14, 14, 64),
            Conv2d {
                cin: 64,
                cout: 128,
                k: 3,
                stride: 2,
                pad: 1,
            },
        ),
        (
            Nhwc::new(n, 7, 7, 128),
            Conv2d {
                cin: 128,
                cout: 64,
                k: 1,
                stride: 1,
                pad: 0,
            },
        ),
        (
            Nhwc::new(n, 7, 7, 16),
            Conv2d {
                cin: 16,
                cout: 64,
                k: 3,
                stride: 1,
                pad: 1,
            },
        ),
        (
            Nhwc::new(n, 7, 7, 16),
            Conv2d {
                cin: 16,
                cout: 64,
                k: 5,
                stride: 1,
                pad: 2,
            },
        ),
        (
            Nhwc::new(n, 7, 7, 128),
            Conv2d {
                cin: 128,
                cout: 64,
                k: 3,
                stride: 1,
                pad: 1,
            },
        ),
        (
            Nhwc::new(n, 4, 4, 256),
            Conv2d {
                cin: 256,
                cout: 96,
                k: 1,
                stride: 1,
                pad: 0,
            },
        ),
        (
            Nhwc::new(n, 4, 4, 32),
            Conv2d {
                cin: 32,
                cout: 96,
                k: 5,
                stride: 1,
                pad: 2,
            },
        ),
        (
            Nhwc::new(n, 4, 4, 256),
            Conv2d {
                cin: 256,
                cout: 96,
                k: 3,
                stride: 1,
                pad: 1,
            },
        ),
    ];
    for (i, (xs, conv)) in cases.iter().enumerate() {
        let g = conv_case(gpu, *xs, conv, i as u64);
        gpu.status().map_err(|e| format!("{e:#}"))?;
        let c = conv_case(&Cpu, *xs, conv, i as u64);
        for (name, (gv, cv)) in ["y", "dx", "dw", "db"].iter().zip(g.iter().zip(&c)) {
            close(
                &format!("conv {conv:?} on {xs:?}: {name}"),
                gv,
                cv,
                ATOL,
                RTOL,
            )?;
        }
    }
    Ok(())
}

fn bn_case<B: Backend<f32>>(be: &B, xs: Nhwc, seed: u64) -> anyhow::Result<Vec<Vec<f32>>> {
    let mut r = rng(seed);
    let c = xs.c;
    let x = be.upload(&uniform(&mut r, xs.len(), -2.0, 3.0));
    let gamma = be.upload(&uniform(&mut r, c, 0.5, 1.5));
    let beta = be.upload(&uniform(&mut r, c, -0.5, 0.5));
    let dy = be.upload(&uniform(&mut r, xs.len(), -1.0, 1.0));
    let (mut rm, mut rv) = (
        be.upload(&uniform(&mut r, c, -0.1, 0.1)),
        be.upload(&uniform(&mut r, c, 0.9, 1.1)),
    );
    let (mut mean, mut invstd, mut y) = (be.zeros(c), be.zeros(c), be.zeros(xs.len()));
    let cfg = BatchNormCfg::default();
    be.batch_norm_forward_train(
        &mut y,
        &mut mean,
        &mut invstd,
        &mut rm,
        &mut rv,
        &x,
        &gamma,
        &beta,
        xs,
        &cfg,
    )?;
    let (mut dx, mut dg, mut dbeta) = (be.zeros(xs.len()), be.zeros(c), be.zeros(c));
    be.batch_norm_backward(
        &mut dx, &mut dg, &mut dbeta, &dy, &x, &gamma, &mean, &invstd, xs,
    );
    let mut ye = be.zeros(xs.len());
    be.batch_norm_forward_eval(&mut ye, &x, &gamma, &beta, &rm, &rv, xs, &cfg);
    let mut yr = be.zeros(xs.len());
    be.relu_forward(&mut yr, &y);
    let mut g = be.upload(&be.download(&dy));
    be.relu_backward(&mut g, &yr);
    Ok([y, mean, invstd, rm, rv, dx, dg, dbeta, ye, yr, g]
        .iter()
        .map(|t| be.download(t))
        .collect())
}

/// BatchNorm (train, running statistics, eval, backward) and ReLU at every BN shape.
fn test_batch_norm_relu(gpu: &Gpu) -> Outcome {
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
    ];
    for (i, xs) in shapes.iter().enumerate() {
        let g = bn_case(gpu, *xs, 100 + i as u64).map_err(|e| format!("{e:#}"))?;
        gpu.status().map_err(|e| format!("{e:#}"))?;
        let c = bn_case(&Cpu, *xs, 100 + i as u64).map_err(|e| format!("{e:#}"))?;
        for (name, (gv, cv)) in names.iter().zip(g.iter().zip(&c)) {
            close(&format!("batch norm {xs:?}: {name}"), gv, cv, ATOL, RTOL)?;
        }
    }
    Ok(())
}

fn pool_case<B: Backend<f32>>(be: &B, xs: Nhwc, pool: &MaxPool2d, seed: u64) -> Vec<Vec<f32>> {
    let mut r = rng(seed);
    // Distinct values: ties would make the gradient's destination a convention, checked on
    // the CPU by the gradient tests.
    let mut v: Vec<f32> = (0..xs.len()).map(|i| i as f32 * 1e-3).collect();
    for i in (1..v.len()).rev() {
        v.swap(i, r.random_range(0..=i));
    }
    let ys = pool.out_shape(xs);
    let x = be.upload(&v);
    let dy = be.upload(&uniform(&mut r, ys.len(), -1.0, 1.0));
    let (mut y, mut dx) = (be.zeros(ys.len()), be.zeros(xs.len()));
    be.max_pool2d_forward(&mut y, &x, xs, pool);
    be.max_pool2d_backward(&mut dx, &dy, &x, &y, xs, pool);
    let a = Nhwc::new(xs.n, 2, 2, xs.c);
    let xa = be.upload(&uniform(&mut r, a.len(), -1.0, 1.0));
    let dya = be.upload(&uniform(&mut r, a.n * a.c, -1.0, 1.0));
    let (mut ya, mut dxa) = (be.zeros(a.n * a.c), be.zeros(a.len()));
    be.avg_pool2d_forward(&mut ya, &xa, a);
    be.avg_pool2d_backward(&mut dxa, &dya, a);
    [y, dx, ya, dxa].iter().map(|t| be.download(t)).collect()
}

/// Max pooling (k3 s1 p1 in the branches, k3 s2 p1 after the blocks) and the 2×2 average.
fn test_pooling(gpu: &Gpu) -> Outcome {
    let k3s1 = MaxPool2d {
        k: 3,
        stride: 1,
        pad: 1,
    };
    let k3s2 = MaxPool2d {
        k: 3,
        stride: 2,
        pad: 1,
    };
    for (i, (xs, pool)) in [
        (Nhwc::new(8, 7, 7, 128), k3s1),
        (Nhwc::new(8, 4, 4, 256), k3s1),
        (Nhwc::new(8, 7, 7, 256), k3s2),
        (Nhwc::new(8, 4, 4, 384), k3s2),
    ]
    .iter()
    .enumerate()
    {
        let g = pool_case(gpu, *xs, pool, 200 + i as u64);
        gpu.status().map_err(|e| format!("{e:#}"))?;
        let c = pool_case(&Cpu, *xs, pool, 200 + i as u64);
        for (name, (gv, cv)) in ["max y", "max dx", "avg y", "avg dx"]
            .iter()
            .zip(g.iter().zip(&c))
        {
            close(
                &format!("pooling {pool:?} on {xs:?}: {name}"),
                gv,
                cv,
                1e-6,
                1e-6,
            )?;
        }
    }
    Ok(())
}

fn head_case<B: Backend<f32>>(be: &B, seed: u64) -> Vec<Vec<f32>> {
    let mut r = rng(seed);
    let (n, fin, fout) = (16, 384, 10);
    let x = be.upload(&uniform(&mut r, n * fin, -1.0, 1.0));
    let w = be.upload(&uniform(&mut r, fout * fin, -0.05, 0.05));
    let b = be.upload(&uniform(&mut r, fout, -0.05, 0.05));
    let mut y = be.zeros(n * fout);
    be.linear_forward(&mut y, &x, &w, &b, n, fin, fout);
    let labels: Vec<u32> = (0..n).map(|i| (i * 7 % 10) as u32).collect();
    let mut probs = be.zeros(n * fout);
    let loss = be.cross_entropy_forward(&mut probs, &y, &labels, fout, 0.1);
    let mut dl = be.zeros(n * fout);
    be.cross_entropy_backward(&mut dl, &probs, &labels, fout, 0.1);
    let (mut dx, mut dw, mut db) = (be.zeros(n * fin), be.zeros(fout * fin), be.zeros(fout));
    be.linear_backward(Some(&mut dx), &mut dw, &mut db, &dl, &x, &w, n, fin, fout);
    // The Inception join and its split, and the branch-gradient sum.
    let parts: Vec<_> = [64, 64, 64, 64]
        .iter()
        .map(|&c| be.upload(&uniform(&mut r, 98 * c, -1.0, 1.0)))
        .collect();
    let mut joined = be.zeros(98 * 256);
    be.concat_forward(&mut joined, &parts.iter().collect::<Vec<_>>(), &[64; 4]);
    let mut back: Vec<_> = (0..4).map(|_| be.zeros(98 * 64)).collect();
    be.concat_backward(&mut back.iter_mut().collect::<Vec<_>>(), &joined, &[64; 4]);
    let mut sum = be.zeros(98 * 64);
    be.fork_backward(&mut sum, &back.iter().collect::<Vec<_>>());
    // SGD, Nesterov, over three steps.
    let mut p = be.upload(&uniform(&mut r, 1000, -1.0, 1.0));
    let g = be.upload(&uniform(&mut r, 1000, -1.0, 1.0));
    let mut m = be.zeros(1000);
    let opt = Sgd {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 5e-4,
        nesterov: true,
    };
    for step in 0..3 {
        be.sgd_step(&mut p, &g, &mut m, step == 0, &opt);
    }
    let mut out: Vec<Vec<f32>> = [y, dl, dx, dw, db, joined, sum, p, m]
        .iter()
        .map(|t| be.download(t))
        .collect();
    out.push(vec![loss as f32]);
    out.extend(back.iter().map(|t| be.download(t)));
    out
}

/// Linear head, cross-entropy with smoothing, concat/split, branch sum, SGD.
fn test_head_concat_sgd(gpu: &Gpu) -> Outcome {
    let g = head_case(gpu, 300);
    gpu.status().map_err(|e| format!("{e:#}"))?;
    let c = head_case(&Cpu, 300);
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
        close(name, gv, cv, 1e-5, 1e-4)?;
    }
    Ok(())
}

fn train_steps<B: Backend<f32>>(
    net: &mut Net<f32, B>,
    steps: usize,
) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
    let mut r = rng(400);
    let n = 16;
    let x = uniform(&mut r, n * 32 * 32 * 3, -2.0, 2.0);
    let labels: Vec<u32> = (0..n).map(|_| r.random_range(0..10)).collect();
    let opt = Sgd {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 5e-4,
        nesterov: true,
    };
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

/// Three whole training steps of the network on the GPU and on the CPU from the same weights.
fn test_training_steps(gpu: Gpu) -> Outcome {
    let spec = ModelSpec::inception_net_small();
    let mut g: Net<f32, Gpu> = Net::new(spec.clone(), gpu, 9).map_err(|e| format!("{e:#}"))?;
    g.schedule = incept::schedule::BranchSchedule::Sequential;
    let mut c: Net<f32, Cpu> = Net::new(spec, Cpu, 9).map_err(|e| format!("{e:#}"))?;
    let (gl, gs) = train_steps(&mut g, 3).map_err(|e| format!("{e:#}"))?;
    let (cl, cs) = train_steps(&mut c, 3).map_err(|e| format!("{e:#}"))?;
    close("losses of 3 steps", &gl, &cl, 1e-4, 1e-3)?;
    // After 3 steps rounding differences have grown through the network: a looser bound.
    close(
        "weights, running statistics, counters after 3 steps",
        &gs,
        &cs,
        1e-3,
        1e-2,
    )
}

/// Without a driver, the binary must say so clearly (and not panic).
fn test_no_driver_error() -> Outcome {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_incept"))
        .args(["bench", "--device", "cuda", "--steps", "1"])
        .output()
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || !text.contains("no NVIDIA driver found") || text.contains("panicked")
    {
        return Err(format!(
            "expected a clear no-driver error, got status {:?}:\n{text}",
            out.status
        ));
    }
    Ok(())
}

fn main() {
    let device = Gpu::new(0).map(|_| ()).map_err(|e| format!("{e:#}"));
    let mut results: Vec<(&str, Result<Outcome, String>)> = Vec::new();
    let mut run = |name: &'static str, f: &dyn Fn(&Gpu) -> Outcome| {
        let r = match &device {
            Err(why) => Err(why.clone()),
            Ok(()) => Ok(Gpu::new(0)
                .map_err(|e| format!("{e:#}"))
                .and_then(|g| f(&g))),
        };
        results.push((name, r));
    };
    run("conv2d_gpu_matches_cpu", &test_conv);
    run("batch_norm_relu_gpu_matches_cpu", &test_batch_norm_relu);
    run("pooling_gpu_matches_cpu", &test_pooling);
    run("head_concat_sgd_gpu_matches_cpu", &test_head_concat_sgd);
    run("training_steps_gpu_match_cpu", &|_| {
        Gpu::new(0)
            .map_err(|e| format!("{e:#}"))
            .and_then(test_training_steps)
    });
    let no_driver = match &device {
        Err(why) if why.contains("no NVIDIA driver") => Ok(test_no_driver_error()),
        _ => Err("a driver is present".to_string()),
    };
    results.push(("no_driver_error_is_clear", no_driver));
    let (mut passed, mut failed, mut skipped) = (0, 0, 0);
    for (name, r) in &results {
        match r {
            Ok(Ok(())) => {
                passed += 1;
                println!("test {name} ... ok");
            }
            Ok(Err(e)) => {
                failed += 1;
                println!("test {name} ... FAILED\n{e}");
            }
            Err(why) => {
                skipped += 1;
                println!(
                    "test {name} ... skipped: {}",
                    why.lines().next().unwrap_or(why)
                );
            }
        }
    }
    println!("\n{passed} passed, {failed} failed, {skipped} skipped");
    if failed > 0 {
        std::process::exit(1);
    }
}
