//! Every backward op of the CPU backend against central finite differences, in `f64`.
//!
//! Method: for an op `y = f(θ, …)` draw an upstream gradient `g` of y's shape and let
//! `L = Σ g·y`. The backward's `∂L/∂θ` must match `(L(θ+h) − L(θ−h)) / 2h` for every element
//! (shapes are small; a tensor over [`MAX_FD`] elements is checked on a random subset). The
//! difference is evaluated as `Σ g·(y(θ+h) − y(θ−h))`, the same number without the
//! cancellation of two large sums: the outputs that θ does not reach cancel exactly.
//!
//! Parameter gradients are pre-filled with random values (the backward must *add* to them) and
//! input gradients with NaN (the backward must *overwrite* them), as the `Backend` trait says.
//! Forwards are also checked against naive loops here, so the finite differences are taken of
//! the right function.

mod common;

use common::{Report, Tol};
use incept::backend::cpu::Cpu;
use incept::backend::ops::*;
use incept::backend::{
    Affine, BatchNormCfg, BatchStats, Conv2d, MaxPool2d, Nhwc, RunningStats, Sgd,
};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Finite-difference step. In f64 the rounding error of a central difference is about
/// `1e-16·|y|/h ≈ 1e-10·|y|` per output reached, the truncation error `h²·|f'''|/6 ≈ 1e-13`.
const H: f64 = 1e-6;

/// Gradient from the backward vs central differences.
const FD_TOL: Tol = Tol::new(
    1e-7,
    1e-6,
    "central difference in f64 with h=1e-6: rounding ~1e-10 per output reached, summed over a few hundred",
);
/// A forward against a naive loop computing the same formula.
const FWD_TOL: Tol = Tol::new(
    1e-12,
    1e-12,
    "same formula in f64, different summation order (GEMM blocking): ~1e-15 per term",
);
/// Copies, scatters of one value, sums in a prescribed order: nothing is rounded differently.
const EXACT: Tol = Tol::new(0.0, 0.0, "a copy or a sum in a fixed order: must be bitwise equal");

/// Tensors larger than this are checked on a random subset of this many elements.
const MAX_FD: usize = 4096;

fn cpu() -> impl Backend<f64, Buf = Vec<f64>> {
    Cpu
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in `[lo, hi)`.
fn uniform(r: &mut ChaCha8Rng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n).map(|_| r.random_range(lo..hi)).collect()
}

/// `n` values of magnitude in `[lo, hi)` with random sign (kept away from zero).
fn signed(r: &mut ChaCha8Rng, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            let v = r.random_range(lo..hi);
            if r.random_range(0..2) == 0 {
                v
            } else {
                -v
            }
        })
        .collect()
}

/// Indices to check: all of them, or a random subset of [`MAX_FD`] for a big tensor.
fn indices(r: &mut ChaCha8Rng, len: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..len).collect();
    if len > MAX_FD {
        idx.shuffle(r);
        idx.truncate(MAX_FD);
        idx.sort_unstable();
    }
    idx
}

/// `∂(Σ g·f(θ))/∂θ_i` by central differences at the given indices.
fn finite_diff(
    theta: &[f64], idx: &[usize], g: &[f64], mut f: impl FnMut(&Vec<f64>) -> Vec<f64>,
) -> Vec<f64> {
    let mut t = theta.to_vec();
    idx.iter()
        .map(|&i| {
            let orig = t[i];
            let (up, down) = (orig + H, orig - H);
            t[i] = up;
            let yp = f(&t);
            t[i] = down;
            let ym = f(&t);
            t[i] = orig;
            assert_eq!(yp.len(), g.len(), "finite_diff: output length");
            let d: f64 = g.iter().zip(yp.iter().zip(&ym)).map(|(g, (p, m))| g * (p - m)).sum();
            // The step actually taken, after rounding θ ± h.
            d / (up - down)
        })
        .collect()
}

/// Checks an analytic gradient `got` (of θ) against finite differences of `Σ g·f(θ)`.
/// Fails as well when the reference is identically zero, which would make the check vacuous.
fn check_fd(
    rep: &mut Report, r: &mut ChaCha8Rng, name: &str, got: &[f64], theta: &[f64], g: &[f64],
    f: impl FnMut(&Vec<f64>) -> Vec<f64>,
) {
    assert_eq!(got.len(), theta.len(), "{name}: gradient length");
    let idx = indices(r, theta.len());
    let want = finite_diff(theta, &idx, g, f);
    assert!(
        want.iter().any(|v| v.abs() > 1e-3),
        "{name}: the finite-difference gradient is ~0 everywhere, the check would prove nothing"
    );
    let got: Vec<f64> = idx.iter().map(|&i| got[i]).collect();
    rep.check(name, &got, &want, FD_TOL);
}

/// `got − pre`, elementwise: what a backward added to a pre-filled gradient.
fn added(got: &[f64], pre: &[f64]) -> Vec<f64> {
    got.iter().zip(pre).map(|(g, p)| g - p).collect()
}

// ---------------------------------------------------------------------------------------------
// conv2d

struct ConvCase {
    k: usize,
    stride: usize,
    pad: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    /// Whether some input rows/columns lie outside every window (their dx must be exactly 0).
    uncovered: bool,
    what: &'static str,
}

fn conv_naive(x: &[f64], w: &[f64], b: &[f64], xs: Nhwc, conv: &Conv2d) -> Vec<f64> {
    let ys = conv.out_shape(xs);
    let mut y = vec![0.0; ys.len()];
    for n in 0..xs.n {
        for oy in 0..ys.h {
            for ox in 0..ys.w {
                for co in 0..conv.cout {
                    let mut s = b[co];
                    for ci in 0..conv.cin {
                        for ky in 0..conv.k {
                            for kx in 0..conv.k {
                                let iy = (oy * conv.stride + ky) as isize - conv.pad as isize;
                                let ix = (ox * conv.stride + kx) as isize - conv.pad as isize;
                                if iy < 0 || ix < 0 || iy >= xs.h as isize || ix >= xs.w as isize {
                                    continue;
                                }
                                let xi = ((n * xs.h + iy as usize) * xs.w + ix as usize) * xs.c;
                                let wi = ((co * conv.cin + ci) * conv.k + ky) * conv.k + kx;
                                s += w[wi] * x[xi + ci];
                            }
                        }
                    }
                    y[((n * ys.h + oy) * ys.w + ox) * ys.c + co] = s;
                }
            }
        }
    }
    y
}

/// Whether input row (or column) `i` of a side of length `side` lies in some window.
fn conv_covers(conv: &Conv2d, side: usize, i: usize) -> bool {
    (0..conv.out_side(side)).any(|o| {
        let start = (o * conv.stride) as isize - conv.pad as isize;
        (start..start + conv.k as isize).contains(&(i as isize))
    })
}

#[test]
fn conv2d_backward_matches_finite_differences() {
    let cases = [
        ConvCase {
            k: 1,
            stride: 1,
            pad: 0,
            h: 7,
            w: 9,
            cin: 3,
            cout: 4,
            uncovered: false,
            what: "pointwise GEMM path",
        },
        ConvCase {
            k: 3,
            stride: 1,
            pad: 1,
            h: 7,
            w: 9,
            cin: 3,
            cout: 5,
            uncovered: false,
            what: "3x3 same",
        },
        ConvCase {
            k: 5,
            stride: 1,
            pad: 2,
            h: 9,
            w: 7,
            cin: 2,
            cout: 3,
            uncovered: false,
            what: "5x5 same",
        },
        // The model's first layer. With stride 2 and pad 1 the one position left over on the
        // far side is always padding (the input's last row is covered), so this case has no
        // uncovered input; the k3 s2 p0 and k1 s2 cases below do.
        ConvCase {
            k: 7,
            stride: 2,
            pad: 1,
            h: 9,
            w: 11,
            cin: 3,
            cout: 2,
            uncovered: false,
            what: "model stem 7x7/2",
        },
        ConvCase {
            k: 3,
            stride: 2,
            pad: 1,
            h: 9,
            w: 7,
            cin: 4,
            cout: 3,
            uncovered: false,
            what: "3x3/2 reduction",
        },
        ConvCase {
            k: 3,
            stride: 2,
            pad: 0,
            h: 8,
            w: 6,
            cin: 2,
            cout: 3,
            uncovered: true,
            what: "3x3/2 unpadded, even side: last row/col outside every window",
        },
        ConvCase {
            k: 1,
            stride: 2,
            pad: 0,
            h: 6,
            w: 5,
            cin: 5,
            cout: 2,
            uncovered: true,
            what: "strided 1x1 (im2col path, odd rows skipped)",
        },
    ];
    let be = cpu();
    let mut r = rng(0xC0_2D);
    let mut rep = Report::default();
    for case in &cases {
        for n in [1, 2] {
            let conv = Conv2d {
                cin: case.cin,
                cout: case.cout,
                k: case.k,
                stride: case.stride,
                pad: case.pad,
            };
            let xs = Nhwc::new(n, case.h, case.w, case.cin);
            let ys = conv.out_shape(xs);
            let tag = format!(
                "conv2d k{} s{} p{} x{:?} ({})",
                case.k, case.stride, case.pad, xs, case.what
            );
            let x = uniform(&mut r, xs.len(), -1.0, 1.0);
            let w = uniform(&mut r, conv.weight_len(), -1.0, 1.0);
            let b = uniform(&mut r, conv.cout, -1.0, 1.0);
            let g = uniform(&mut r, ys.len(), -1.0, 1.0);

            let fwd = |x: &Vec<f64>, w: &Vec<f64>, b: &Vec<f64>| {
                let mut y = vec![f64::NAN; ys.len()];
                be.conv2d_forward(&mut y, x, w, b, xs, &conv);
                y
            };
            rep.check(
                &format!("{tag} y vs naive loops"),
                &fwd(&x, &w, &b),
                &conv_naive(&x, &w, &b, xs, &conv),
                FWD_TOL,
            );

            let mut dx = vec![f64::NAN; xs.len()];
            let dw0 = uniform(&mut r, w.len(), -1.0, 1.0);
            let db0 = uniform(&mut r, b.len(), -1.0, 1.0);
            let (mut dw, mut db) = (dw0.clone(), db0.clone());
            be.conv2d_backward(Some(&mut dx), &mut dw, &mut db, &g, &x, &w, xs, &conv);
            let (dw, db) = (added(&dw, &dw0), added(&db, &db0));

            check_fd(&mut rep, &mut r, &format!("{tag} dx"), &dx, &x, &g, |t| fwd(t, &w, &b));
            check_fd(&mut rep, &mut r, &format!("{tag} dw"), &dw, &w, &g, |t| fwd(&x, t, &b));
            check_fd(&mut rep, &mut r, &format!("{tag} db"), &db, &b, &g, |t| fwd(&x, &w, t));

            // Input positions outside every window get exactly zero.
            let mut zeros = 0;
            for (i, v) in dx.iter().enumerate() {
                let (iy, ix) = ((i / xs.c / xs.w) % xs.h, (i / xs.c) % xs.w);
                if !conv_covers(&conv, xs.h, iy) || !conv_covers(&conv, xs.w, ix) {
                    assert_eq!(
                        *v, 0.0,
                        "{tag}: dx[{i}] (row {iy}, col {ix}) is outside every window"
                    );
                    zeros += 1;
                }
            }
            assert_eq!(
                zeros > 0,
                case.uncovered,
                "{tag}: expected uncovered inputs: {}",
                case.uncovered
            );

            // Without dx the parameter gradients are the same.
            let (mut dw2, mut db2) = (dw0.clone(), db0.clone());
            be.conv2d_backward(None, &mut dw2, &mut db2, &g, &x, &w, xs, &conv);
            rep.check(&format!("{tag} dw without dx"), &added(&dw2, &dw0), &dw, EXACT);
            rep.check(&format!("{tag} db without dx"), &added(&db2, &db0), &db, EXACT);
        }
    }
    rep.finish("conv2d backward vs finite differences");
}

// ---------------------------------------------------------------------------------------------
// batch_norm

/// Training-mode forward on scratch statistics; returns y only.
fn bn_train_y(x: &Vec<f64>, gamma: &Vec<f64>, beta: &Vec<f64>, xs: Nhwc) -> Vec<f64> {
    let be = cpu();
    let c = xs.c;
    let mut y = vec![f64::NAN; xs.len()];
    let (mut mean, mut invstd) = (vec![0.0; c], vec![0.0; c]);
    let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
    be.batch_norm_forward_train(
        &mut y,
        x,
        Affine { gamma, beta },
        RunningStats { mean: &mut rm, var: &mut rv },
        BatchStats { mean: &mut mean, invstd: &mut invstd },
        xs,
        &BatchNormCfg::default(),
        false,
        None,
    )
    .unwrap();
    y
}

/// Per-channel batch mean and biased variance, two-pass.
fn channel_stats(x: &[f64], xs: Nhwc) -> (Vec<f64>, Vec<f64>) {
    let (m, c) = (xs.pixels(), xs.c);
    let mean: Vec<f64> =
        (0..c).map(|ch| (0..m).map(|p| x[p * c + ch]).sum::<f64>() / m as f64).collect();
    let var: Vec<f64> = (0..c)
        .map(|ch| (0..m).map(|p| (x[p * c + ch] - mean[ch]).powi(2)).sum::<f64>() / m as f64)
        .collect();
    (mean, var)
}

#[test]
fn batch_norm_backward_matches_finite_differences() {
    let be = cpu();
    let mut r = rng(0xB0_4E);
    let mut rep = Report::default();
    // Batch 1 with H·W > 1 (PyTorch accepts it: more than one value per channel), batch 3 2×2,
    // and a rectangular batch 2.
    for xs in [Nhwc::new(1, 3, 5, 4), Nhwc::new(3, 2, 2, 3), Nhwc::new(2, 3, 2, 5)] {
        let c = xs.c;
        let tag = format!("batch_norm x{xs:?}");
        // Offset and spread per channel, so mean and variance both matter.
        let shift = uniform(&mut r, c, -3.0, 3.0);
        let spread = uniform(&mut r, c, 0.5, 3.0);
        let x: Vec<f64> = uniform(&mut r, xs.len(), -1.0, 1.0)
            .iter()
            .enumerate()
            .map(|(i, u)| shift[i % c] + spread[i % c] * u)
            .collect();
        let gamma = signed(&mut r, c, 0.5, 2.0);
        let beta = uniform(&mut r, c, -1.0, 1.0);
        let g = uniform(&mut r, xs.len(), -1.0, 1.0);

        let mut y = vec![f64::NAN; xs.len()];
        let (mut mean, mut invstd) = (vec![f64::NAN; c], vec![f64::NAN; c]);
        let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
        be.batch_norm_forward_train(
            &mut y,
            &x,
            Affine { gamma: &gamma, beta: &beta },
            RunningStats { mean: &mut rm, var: &mut rv },
            BatchStats { mean: &mut mean, invstd: &mut invstd },
            xs,
            &BatchNormCfg::default(),
            false,
            None,
        )
        .unwrap();

        let mut dx = vec![f64::NAN; xs.len()];
        let dgamma0 = uniform(&mut r, c, -1.0, 1.0);
        let dbeta0 = uniform(&mut r, c, -1.0, 1.0);
        let (mut dgamma, mut dbeta) = (dgamma0.clone(), dbeta0.clone());
        be.batch_norm_backward(
            &mut dx,
            Affine { gamma: &mut dgamma, beta: &mut dbeta },
            &g,
            None,
            &x,
            &gamma,
            BatchStats { mean: &mean, invstd: &invstd },
            xs,
            None,
        );
        let (dgamma, dbeta) = (added(&dgamma, &dgamma0), added(&dbeta, &dbeta0));

        check_fd(&mut rep, &mut r, &format!("{tag} dx"), &dx, &x, &g, |t| {
            bn_train_y(t, &gamma, &beta, xs)
        });
        check_fd(&mut rep, &mut r, &format!("{tag} dgamma"), &dgamma, &gamma, &g, |t| {
            bn_train_y(&x, t, &beta, xs)
        });
        check_fd(&mut rep, &mut r, &format!("{tag} dbeta"), &dbeta, &beta, &g, |t| {
            bn_train_y(&x, &gamma, t, xs)
        });
    }
    rep.finish("batch_norm backward vs finite differences");
}

#[test]
fn batch_norm_running_stats_and_eval_follow_pytorch() {
    let be = cpu();
    let mut r = rng(0xB0_57);
    let mut rep = Report::default();
    for (xs, cfg) in [
        (Nhwc::new(2, 3, 3, 4), BatchNormCfg::default()),
        (Nhwc::new(1, 2, 3, 3), BatchNormCfg::default()),
        // Other hyper-parameters, so neither is taken for granted.
        (Nhwc::new(3, 2, 2, 2), BatchNormCfg { eps: 1e-3, momentum: 0.25 }),
    ] {
        let (c, m) = (xs.c, xs.pixels() as f64);
        let tag = format!("batch_norm x{xs:?} {cfg:?}");
        let x: Vec<f64> = uniform(&mut r, xs.len(), -2.0, 4.0);
        let gamma = signed(&mut r, c, 0.5, 2.0);
        let beta = uniform(&mut r, c, -1.0, 1.0);
        let rm0 = uniform(&mut r, c, -1.0, 1.0);
        let rv0 = uniform(&mut r, c, 0.5, 2.0);

        let mut y = vec![f64::NAN; xs.len()];
        let (mut mean, mut invstd) = (vec![f64::NAN; c], vec![f64::NAN; c]);
        let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
        be.batch_norm_forward_train(
            &mut y,
            &x,
            Affine { gamma: &gamma, beta: &beta },
            RunningStats { mean: &mut rm, var: &mut rv },
            BatchStats { mean: &mut mean, invstd: &mut invstd },
            xs,
            &cfg,
            false,
            None,
        )
        .unwrap();

        // By hand: biased variance normalises, the unbiased one (×M/(M−1)) feeds the running
        // variance; running = (1 − momentum)·running + momentum·batch.
        let (bm, bv) = channel_stats(&x, xs);
        let want_invstd: Vec<f64> = bv.iter().map(|v| 1.0 / (v + cfg.eps).sqrt()).collect();
        let want_rm: Vec<f64> =
            (0..c).map(|ch| (1.0 - cfg.momentum) * rm0[ch] + cfg.momentum * bm[ch]).collect();
        let want_rv: Vec<f64> = (0..c)
            .map(|ch| (1.0 - cfg.momentum) * rv0[ch] + cfg.momentum * bv[ch] * m / (m - 1.0))
            .collect();
        let want_y: Vec<f64> = (0..xs.len())
            .map(|i| {
                let ch = i % c;
                (x[i] - bm[ch]) * want_invstd[ch] * gamma[ch] + beta[ch]
            })
            .collect();
        rep.check(&format!("{tag} saved mean"), &mean, &bm, FWD_TOL);
        rep.check(&format!("{tag} saved invstd"), &invstd, &want_invstd, FWD_TOL);
        rep.check(&format!("{tag} running_mean"), &rm, &want_rm, FWD_TOL);
        rep.check(&format!("{tag} running_var (unbiased)"), &rv, &want_rv, FWD_TOL);
        rep.check(&format!("{tag} train y"), &y, &want_y, FWD_TOL);
        // The unbiased and biased updates differ by far more than the tolerance, so the check
        // above tells them apart.
        let biased_rv: Vec<f64> =
            (0..c).map(|ch| (1.0 - cfg.momentum) * rv0[ch] + cfg.momentum * bv[ch]).collect();
        assert!(
            common::compare("biased", &rv, &biased_rv, FWD_TOL).is_err(),
            "{tag}: running_var matches the biased update too; the case cannot tell them apart"
        );

        // Eval mode normalises with the running statistics, not the batch's.
        let xe = uniform(&mut r, xs.len(), -2.0, 4.0);
        let mut ye = vec![f64::NAN; xs.len()];
        be.batch_norm_forward_eval(
            &mut ye,
            &xe,
            Affine { gamma: &gamma, beta: &beta },
            RunningStats { mean: &rm, var: &rv },
            xs,
            &cfg,
            false,
        );
        let want_ye: Vec<f64> = (0..xs.len())
            .map(|i| {
                let ch = i % c;
                (xe[i] - want_rm[ch]) / (want_rv[ch] + cfg.eps).sqrt() * gamma[ch] + beta[ch]
            })
            .collect();
        rep.check(&format!("{tag} eval y"), &ye, &want_ye, FWD_TOL);
    }
    rep.finish("batch_norm statistics");
}

#[test]
fn batch_norm_training_rejects_one_value_per_channel() {
    // PyTorch: "Expected more than 1 value per channel when training".
    let be = cpu();
    let xs = Nhwc::new(1, 1, 1, 3);
    let (mut y, mut mean, mut invstd) = (vec![0.0; 3], vec![0.0; 3], vec![0.0; 3]);
    let (mut rm, mut rv) = (vec![0.0; 3], vec![1.0; 3]);
    let res = be.batch_norm_forward_train(
        &mut y,
        &vec![1.0, 2.0, 3.0],
        Affine { gamma: &vec![1.0; 3], beta: &vec![0.0; 3] },
        RunningStats { mean: &mut rm, var: &mut rv },
        BatchStats { mean: &mut mean, invstd: &mut invstd },
        xs,
        &BatchNormCfg::default(),
        false,
        None,
    );
    assert!(res.is_err(), "a 1x1x1 batch must be refused in training mode");
    assert_eq!(rm, vec![0.0; 3], "a refused batch must leave running_mean alone");
    assert_eq!(rv, vec![1.0; 3], "a refused batch must leave running_var alone");
}

// ---------------------------------------------------------------------------------------------
// relu

#[test]
fn relu_backward_matches_finite_differences() {
    let be = cpu();
    let mut r = rng(0x4E_10);
    let mut rep = Report::default();
    // Inputs at least 1e-3 away from 0, where relu is not differentiable.
    let x = signed(&mut r, 2 * 5 * 7 * 3, 1e-3, 2.0);
    assert!(x.iter().any(|v| *v < 0.0) && x.iter().any(|v| *v > 0.0));
    let g = uniform(&mut r, x.len(), -1.0, 1.0);
    let fwd = |x: &Vec<f64>| {
        let mut y = vec![f64::NAN; x.len()];
        be.relu_forward(&mut y, x);
        y
    };
    let y = fwd(&x);
    let want_y: Vec<f64> = x.iter().map(|v| v.max(0.0)).collect();
    rep.check("relu y", &y, &want_y, EXACT);
    let mut dx = g.clone();
    be.relu_backward(&mut dx, &y);
    check_fd(&mut rep, &mut r, "relu dx", &dx, &x, &g, fwd);
    rep.finish("relu backward vs finite differences");
}

// ---------------------------------------------------------------------------------------------
// max_pool2d

/// Naive max pooling with padding as −∞: the first maximum in row-major window order wins.
fn max_pool_naive(x: &[f64], xs: Nhwc, pool: &MaxPool2d) -> (Vec<f64>, Vec<u32>) {
    let ys = pool.out_shape(xs);
    let (mut y, mut arg) = (vec![0.0; ys.len()], vec![0u32; ys.len()]);
    for n in 0..xs.n {
        for oy in 0..ys.h {
            for ox in 0..ys.w {
                for ch in 0..xs.c {
                    let mut best: Option<(f64, usize)> = None;
                    for ky in 0..pool.k {
                        for kx in 0..pool.k {
                            let iy = (oy * pool.stride + ky) as isize - pool.pad as isize;
                            let ix = (ox * pool.stride + kx) as isize - pool.pad as isize;
                            if iy < 0 || ix < 0 || iy >= xs.h as isize || ix >= xs.w as isize {
                                continue;
                            }
                            let i = ((n * xs.h + iy as usize) * xs.w + ix as usize) * xs.c + ch;
                            if best.is_none_or(|(b, _)| x[i] > b) {
                                best = Some((x[i], i));
                            }
                        }
                    }
                    let (v, i) = best.expect("a window with no input element");
                    let o = ((n * ys.h + oy) * ys.w + ox) * ys.c + ch;
                    y[o] = v;
                    arg[o] = i as u32;
                }
            }
        }
    }
    (y, arg)
}

fn max_pool_run(
    x: &Vec<f64>, dy: &Vec<f64>, xs: Nhwc, pool: &MaxPool2d,
) -> (Vec<f64>, Vec<u32>, Vec<f64>) {
    let be = cpu();
    let mut y = vec![f64::NAN; pool.out_shape(xs).len()];
    be.max_pool2d_forward(&mut y, x, xs, pool);
    let argmax = incept::backend::cpu::max_pool2d_argmax(x, xs, pool);
    let mut dx = vec![f64::NAN; xs.len()];
    be.max_pool2d_backward(&mut dx, dy, x, &y, xs, pool);
    (y, argmax, dx)
}

#[test]
fn max_pool2d_backward_matches_finite_differences() {
    let be = cpu();
    let mut r = rng(0x9A_A1);
    let mut rep = Report::default();
    let k3s1 = MaxPool2d { k: 3, stride: 1, pad: 1 };
    let k3s2 = MaxPool2d { k: 3, stride: 2, pad: 1 };
    for (xs, pool) in [
        (Nhwc::new(2, 7, 9, 3), k3s1),
        (Nhwc::new(2, 7, 9, 3), k3s2),
        (Nhwc::new(1, 8, 6, 2), k3s2),
        (Nhwc::new(1, 5, 5, 4), k3s1),
    ] {
        let ys = pool.out_shape(xs);
        let tag = format!("max_pool2d k{} s{} p{} x{xs:?}", pool.k, pool.stride, pool.pad);
        // Distinct values at least 5e-3 apart (a shuffled grid plus a small jitter), so a step
        // of 1e-6 never changes which element wins.
        let mut perm: Vec<usize> = (0..xs.len()).collect();
        perm.shuffle(&mut r);
        let x: Vec<f64> = perm
            .iter()
            .map(|&p| (p as f64 - xs.len() as f64 / 2.0) * 1e-2 + r.random_range(0.0..5e-3))
            .collect();
        let mut sorted = x.clone();
        sorted.sort_by(f64::total_cmp);
        assert!(sorted.windows(2).all(|w| w[1] - w[0] > 1e-3), "{tag}: values too close");
        let g = uniform(&mut r, ys.len(), -1.0, 1.0);

        let (y, argmax, dx) = max_pool_run(&x, &g, xs, &pool);
        let (want_y, want_arg) = max_pool_naive(&x, xs, &pool);
        rep.check(&format!("{tag} y vs naive"), &y, &want_y, EXACT);
        assert_eq!(argmax, want_arg, "{tag}: argmax vs naive");
        let fwd = |x: &Vec<f64>| {
            let mut y = vec![f64::NAN; ys.len()];
            be.max_pool2d_forward(&mut y, x, xs, &pool);
            y
        };
        check_fd(&mut rep, &mut r, &format!("{tag} dx"), &dx, &x, &g, fwd);
    }
    rep.finish("max_pool2d backward vs finite differences");
}

#[test]
fn max_pool2d_ties_go_to_first_maximum_in_scan_order() {
    let mut rep = Report::default();

    // 1) Every value equal (and negative, so a zero-padding bug would show in y): each window,
    //    border ones included, sends its gradient to its first valid element in row-major order.
    //    Outputs (oy, ox) with k3 s1 p1 on 3×3: the first valid element is
    //    (max(oy−1, 0), max(ox−1, 0)).
    let xs = Nhwc::new(1, 3, 3, 1);
    let pool = MaxPool2d { k: 3, stride: 1, pad: 1 };
    let dy: Vec<f64> = (0..9).map(|i| (1u32 << i) as f64).collect(); // 1, 2, 4, …, 256
    let (y, argmax, dx) = max_pool_run(&vec![-1.0; 9], &dy, xs, &pool);
    rep.check("all-equal 3x3 y (padding is -inf, not 0)", &y, &[-1.0; 9], EXACT);
    assert_eq!(argmax, vec![0, 0, 1, 0, 0, 1, 3, 3, 4], "all-equal 3x3: argmax");
    // (0,0) ← outputs (0,0),(0,1),(1,0),(1,1) = 1+2+8+16; (0,1) ← (0,2),(1,2) = 4+32;
    // (1,0) ← (2,0),(2,1) = 64+128; (1,1) ← (2,2) = 256.
    let want = [27.0, 36.0, 0.0, 192.0, 256.0, 0.0, 0.0, 0.0, 0.0];
    rep.check("all-equal 3x3 dx", &dx, &want, EXACT);

    // 2) Two channels, k3 s2 p1 on 4×4: ties in the middle of windows, an element shared by
    //    two windows, and (channel 1) equal maxima in several windows that all lose to the
    //    first one of the shared element.
    let xs = Nhwc::new(1, 4, 4, 2);
    let pool = MaxPool2d { k: 3, stride: 2, pad: 1 };
    #[rustfmt::skip]
    let ch0 = [
        0.0, 5.0, 1.0, 5.0,
        5.0, 2.0, 5.0, 0.0,
        3.0, 5.0, 4.0, 1.0,
        5.0, 0.0, 2.0, 3.0,
    ];
    #[rustfmt::skip]
    let ch1 = [
        1.0, 1.0, 1.0, 1.0,
        1.0, 9.0, 1.0, 9.0,
        1.0, 1.0, 1.0, 1.0,
        1.0, 9.0, 1.0, 9.0,
    ];
    let x: Vec<f64> = (0..32).map(|i| if i % 2 == 0 { ch0[i / 2] } else { ch1[i / 2] }).collect();
    // Outputs (0,0),(0,1),(1,0),(1,1) per channel: ch0 1,2,4,8; ch1 16,32,64,128.
    let dy = vec![1.0, 16.0, 2.0, 32.0, 4.0, 64.0, 8.0, 128.0];
    let (y, _, dx) = max_pool_run(&x, &dy, xs, &pool);
    rep.check("4x4x2 y", &y, &[5.0, 9.0, 5.0, 9.0, 5.0, 9.0, 5.0, 9.0], EXACT);
    let at = |iy: usize, ix: usize, ch: usize| (iy * 4 + ix) * 2 + ch;
    let mut want = vec![0.0; 32];
    // ch0: windows (0,0) rows 0-1 cols 0-1 and (0,1) rows 0-1 cols 1-3 both pick (0,1);
    // (1,0) rows 1-3 cols 0-1 picks (1,0); (1,1) rows 1-3 cols 1-3 picks (1,2).
    want[at(0, 1, 0)] = 1.0 + 2.0;
    want[at(1, 0, 0)] = 4.0;
    want[at(1, 2, 0)] = 8.0;
    // ch1: every window contains (1,1), which comes first in each: the other 9s get nothing.
    want[at(1, 1, 1)] = 16.0 + 32.0 + 64.0 + 128.0;
    rep.check("4x4x2 ties dx", &dx, &want, EXACT);
    let (_, want_arg) = max_pool_naive(&x, xs, &pool);
    let dx_naive = {
        let mut d = vec![0.0; 32];
        for (g, &i) in dy.iter().zip(&want_arg) {
            d[i as usize] += g;
        }
        d
    };
    rep.check("4x4x2 ties dx vs naive", &dx, &dx_naive, EXACT);

    // 3) Windows of −∞ only: PyTorch keeps the first element of the window as the argmax, so
    //    the gradient still lands on a real input (never lost, never out of bounds).
    let xs = Nhwc::new(1, 2, 2, 1);
    let pool = MaxPool2d { k: 3, stride: 1, pad: 1 };
    let (y, argmax, dx) =
        max_pool_run(&vec![f64::NEG_INFINITY; 4], &vec![1.0, 2.0, 4.0, 8.0], xs, &pool);
    assert!(y.iter().all(|v| *v == f64::NEG_INFINITY), "all -inf: y {y:?}");
    assert_eq!(argmax, vec![0, 0, 0, 0], "all -inf: argmax");
    rep.check("all -inf dx", &dx, &[15.0, 0.0, 0.0, 0.0], EXACT);

    // 4) Border windows of a larger input with the maximum in the corner and the rest equal:
    //    the corner wins every window that holds it; the others fall back to their first
    //    element, checked against the naive loops.
    let xs = Nhwc::new(2, 5, 5, 1);
    let pool = MaxPool2d { k: 3, stride: 2, pad: 1 };
    let mut x = vec![-3.0; xs.len()];
    x[0] = 1.0; // image 0, corner (0,0)
    x[25 + 24] = 1.0; // image 1, corner (4,4)
    let dy: Vec<f64> = (0..pool.out_shape(xs).len()).map(|i| (i + 1) as f64).collect();
    let (y, argmax, dx) = max_pool_run(&x, &dy, xs, &pool);
    let (want_y, want_arg) = max_pool_naive(&x, xs, &pool);
    rep.check("5x5 corners y", &y, &want_y, EXACT);
    assert_eq!(argmax, want_arg, "5x5 corners: argmax");
    assert_eq!(argmax[0], 0, "image 0: window (0,0) holds the corner maximum");
    assert_eq!(argmax[17], 25 + 24, "image 1: window (2,2) holds the corner maximum");
    let mut want = vec![0.0; xs.len()];
    for (g, &i) in dy.iter().zip(&want_arg) {
        want[i as usize] += g;
    }
    rep.check("5x5 corners dx", &dx, &want, EXACT);

    rep.finish("max_pool2d ties and borders");
}

// ---------------------------------------------------------------------------------------------
// concat / fork

#[test]
fn concat_forward_backward_are_copies() {
    let be = cpu();
    let mut r = rng(0xCA_7C);
    let mut rep = Report::default();
    let pixels = 2 * 3 * 5;
    let channels = [3usize, 1, 4, 2];
    let total: usize = channels.iter().sum();
    let parts: Vec<Vec<f64>> =
        channels.iter().map(|&c| uniform(&mut r, pixels * c, -1.0, 1.0)).collect();
    let refs: Vec<&Vec<f64>> = parts.iter().collect();
    let mut y = vec![f64::NAN; pixels * total];
    be.concat_forward(&mut y, &refs, &channels);
    let mut want_y = Vec::new();
    for p in 0..pixels {
        for (part, &c) in parts.iter().zip(&channels) {
            want_y.extend_from_slice(&part[p * c..(p + 1) * c]);
        }
    }
    rep.check("concat y", &y, &want_y, EXACT);

    // Backward: each part's gradient is its column slice of dy (pre-filled with NaN: overwritten).
    let dy = uniform(&mut r, pixels * total, -1.0, 1.0);
    let mut dparts: Vec<Vec<f64>> = channels.iter().map(|&c| vec![f64::NAN; pixels * c]).collect();
    {
        let mut drefs: Vec<&mut Vec<f64>> = dparts.iter_mut().collect();
        be.concat_backward(&mut drefs, &dy, &channels);
    }
    let mut off = 0;
    for (j, (d, &c)) in dparts.iter().zip(&channels).enumerate() {
        let want: Vec<f64> = (0..pixels)
            .flat_map(|p| dy[p * total + off..p * total + off + c].iter().copied())
            .collect();
        rep.check(&format!("concat dpart[{j}] (channels {off}..{})", off + c), d, &want, EXACT);
        off += c;
    }

    // Round trip: splitting the concatenation gives the parts back.
    let mut back: Vec<Vec<f64>> = channels.iter().map(|&c| vec![f64::NAN; pixels * c]).collect();
    {
        let mut brefs: Vec<&mut Vec<f64>> = back.iter_mut().collect();
        be.concat_backward(&mut brefs, &y, &channels);
    }
    for (j, (b, p)) in back.iter().zip(&parts).enumerate() {
        rep.check(&format!("concat round trip part[{j}]"), b, p, EXACT);
    }
    rep.finish("concat");
}

#[test]
fn fork_backward_sums_parts_in_order() {
    let be = cpu();
    let mut r = rng(0xF0_4C);
    let mut rep = Report::default();
    // Longer than two of the backend's 4096-element chunks, with a ragged tail.
    let len = 2 * 4096 + 37;
    for nparts in [1usize, 2, 4] {
        let mut parts: Vec<Vec<f64>> =
            (0..nparts).map(|_| uniform(&mut r, len, -1.0, 1.0)).collect();
        // Where the order matters: 1 + 1e17 rounds to 1e17, so in order (1 + 1e17) − 1e17 = 0,
        // while any other grouping gives 1.
        let probes = [5usize, 4096, len - 1];
        if nparts >= 3 {
            for &i in &probes {
                parts[0][i] = 1.0;
                parts[1][i] = 1e17;
                parts[2][i] = -1e17;
                for p in parts.iter_mut().skip(3) {
                    p[i] = 0.0;
                }
            }
            assert_eq!(1.0 + (1e17 + -1e17), 1.0, "the probe must depend on the order");
        }
        let refs: Vec<&Vec<f64>> = parts.iter().collect();
        let mut dx = vec![f64::NAN; len];
        be.fork_backward(&mut dx, &refs);
        let want: Vec<f64> = (0..len)
            .map(|i| {
                let mut s = parts[0][i];
                for p in &parts[1..] {
                    s += p[i];
                }
                s
            })
            .collect();
        if nparts >= 3 {
            for &i in &probes {
                assert_eq!(dx[i], 0.0, "fork of {nparts}: dx[{i}] not summed in branch order");
            }
        }
        rep.check(&format!("fork_backward of {nparts} parts"), &dx, &want, EXACT);
    }
    rep.finish("fork_backward");
}

// ---------------------------------------------------------------------------------------------
// avg_pool2d

#[test]
fn avg_pool2d_backward_matches_finite_differences() {
    let be = cpu();
    let mut r = rng(0xA7_9E);
    let mut rep = Report::default();
    for xs in [
        Nhwc::new(2, 4, 6, 3),
        Nhwc::new(1, 5, 5, 2), // odd: last row and column are not pooled
        Nhwc::new(2, 7, 4, 2), // odd rows only
    ] {
        let ys = Nhwc::new(xs.n, xs.h / 2, xs.w / 2, xs.c);
        let tag = format!("avg_pool2d x{xs:?}");
        let x = uniform(&mut r, xs.len(), -1.0, 1.0);
        let g = uniform(&mut r, ys.len(), -1.0, 1.0);
        let fwd = |x: &Vec<f64>| {
            let mut y = vec![f64::NAN; ys.len()];
            be.avg_pool2d_forward(&mut y, x, xs);
            y
        };
        let mut want_y = vec![0.0; ys.len()];
        for (o, v) in want_y.iter_mut().enumerate() {
            let (n, oy, ox, ch) =
                (o / (ys.h * ys.w * ys.c), (o / (ys.w * ys.c)) % ys.h, (o / ys.c) % ys.w, o % ys.c);
            let at = |dy: usize, dx: usize| {
                x[((n * xs.h + 2 * oy + dy) * xs.w + 2 * ox + dx) * xs.c + ch]
            };
            *v = (at(0, 0) + at(0, 1) + at(1, 0) + at(1, 1)) / 4.0;
        }
        rep.check(&format!("{tag} y"), &fwd(&x), &want_y, FWD_TOL);

        let mut dx = vec![f64::NAN; xs.len()];
        be.avg_pool2d_backward(&mut dx, &g, xs);
        check_fd(&mut rep, &mut r, &format!("{tag} dx"), &dx, &x, &g, fwd);
        let mut unpooled = 0;
        for (i, v) in dx.iter().enumerate() {
            let (iy, ix) = ((i / xs.c / xs.w) % xs.h, (i / xs.c) % xs.w);
            if iy >= 2 * ys.h || ix >= 2 * ys.w {
                assert_eq!(*v, 0.0, "{tag}: dx[{i}] (row {iy}, col {ix}) is not pooled");
                unpooled += 1;
            }
        }
        assert_eq!(
            unpooled > 0,
            xs.h % 2 == 1 || xs.w % 2 == 1,
            "{tag}: unpooled count {unpooled}"
        );
    }
    rep.finish("avg_pool2d backward vs finite differences");
}

// ---------------------------------------------------------------------------------------------
// linear

#[test]
fn linear_backward_matches_finite_differences() {
    let be = cpu();
    let mut r = rng(0x11_4E);
    let mut rep = Report::default();
    for (n, fin, fout) in [(3usize, 7usize, 5usize), (1, 4, 10), (4, 1, 3)] {
        let tag = format!("linear n{n} in{fin} out{fout}");
        let x = uniform(&mut r, n * fin, -1.0, 1.0);
        let w = uniform(&mut r, fout * fin, -1.0, 1.0);
        let b = uniform(&mut r, fout, -1.0, 1.0);
        let g = uniform(&mut r, n * fout, -1.0, 1.0);
        let fwd = |x: &Vec<f64>, w: &Vec<f64>, b: &Vec<f64>| {
            let mut y = vec![f64::NAN; n * fout];
            be.linear_forward(&mut y, x, w, b, n, fin, fout);
            y
        };
        let want_y: Vec<f64> = (0..n * fout)
            .map(|i| {
                let (row, o) = (i / fout, i % fout);
                b[o] + (0..fin).map(|j| x[row * fin + j] * w[o * fin + j]).sum::<f64>()
            })
            .collect();
        rep.check(&format!("{tag} y vs naive"), &fwd(&x, &w, &b), &want_y, FWD_TOL);

        let mut dx = vec![f64::NAN; x.len()];
        let dw0 = uniform(&mut r, w.len(), -1.0, 1.0);
        let db0 = uniform(&mut r, b.len(), -1.0, 1.0);
        let (mut dw, mut db) = (dw0.clone(), db0.clone());
        be.linear_backward(Some(&mut dx), &mut dw, &mut db, &g, &x, &w, n, fin, fout);
        let (dw, db) = (added(&dw, &dw0), added(&db, &db0));
        check_fd(&mut rep, &mut r, &format!("{tag} dx"), &dx, &x, &g, |t| fwd(t, &w, &b));
        check_fd(&mut rep, &mut r, &format!("{tag} dw"), &dw, &w, &g, |t| fwd(&x, t, &b));
        check_fd(&mut rep, &mut r, &format!("{tag} db"), &db, &b, &g, |t| fwd(&x, &w, t));

        let (mut dw2, mut db2) = (dw0.clone(), db0.clone());
        be.linear_backward(None, &mut dw2, &mut db2, &g, &x, &w, n, fin, fout);
        rep.check(&format!("{tag} dw without dx"), &added(&dw2, &dw0), &dw, EXACT);
        rep.check(&format!("{tag} db without dx"), &added(&db2, &db0), &db, EXACT);
    }
    rep.finish("linear backward vs finite differences");
}

// ---------------------------------------------------------------------------------------------
// cross_entropy

#[test]
fn cross_entropy_backward_matches_finite_differences() {
    let be = cpu();
    let mut r = rng(0xCE_01);
    let mut rep = Report::default();
    for smoothing in [0.0, 0.1] {
        for (n, k) in [(4usize, 6usize), (1, 10), (3, 2)] {
            let tag = format!("cross_entropy n{n} k{k} smoothing {smoothing}");
            let logits = uniform(&mut r, n * k, -3.0, 3.0);
            let labels: Vec<u32> = (0..n).map(|_| r.random_range(0..k as u32)).collect();
            let loss = |z: &Vec<f64>| {
                let mut probs = vec![f64::NAN; n * k];
                vec![be.cross_entropy_forward(&mut probs, z, &labels, k, smoothing)]
            };
            let mut probs = vec![f64::NAN; n * k];
            be.cross_entropy_forward(&mut probs, &logits, &labels, k, smoothing);
            let mut dlogits = vec![f64::NAN; n * k];
            be.cross_entropy_backward(&mut dlogits, &probs, &labels, k, smoothing);
            // Here y is the loss itself: the upstream gradient is 1.
            check_fd(&mut rep, &mut r, &format!("{tag} dlogits"), &dlogits, &logits, &[1.0], loss);
        }
    }
    rep.finish("cross_entropy backward vs finite differences");
}

#[test]
fn cross_entropy_loss_matches_hand_computation() {
    let be = cpu();
    let mut rep = Report::default();
    let e = std::f64::consts::E;
    // logits [1, 2, 3] label 2 and [0, 0, 0] label 0:
    //   lse₁ = ln(e + e² + e³), nll₁ = lse₁ − 3, mean over classes of −log p = lse₁ − 2;
    //   lse₂ = ln 3, nll₂ = mean = ln 3.
    let logits = vec![1.0, 2.0, 3.0, 0.0, 0.0, 0.0];
    let labels = [2u32, 0];
    let lse1 = (e + e * e + e * e * e).ln();
    for smoothing in [0.0, 0.1] {
        let want = ((1.0 - smoothing) * (lse1 - 3.0) + smoothing * (lse1 - 2.0) + 3f64.ln()) / 2.0;
        let mut probs = vec![f64::NAN; 6];
        let got = be.cross_entropy_forward(&mut probs, &logits, &labels, 3, smoothing);
        rep.check(&format!("loss, 2 samples, smoothing {smoothing}"), &[got], &[want], FWD_TOL);
        let z = e + e * e + e * e * e;
        let want_p = [e / z, e * e / z, e * e * e / z, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0];
        rep.check(&format!("softmax, smoothing {smoothing}"), &probs, &want_p, FWD_TOL);
        // The gradient by hand: (p − target)/N, target = (1 − ε)·onehot + ε/K.
        let mut d = vec![f64::NAN; 6];
        be.cross_entropy_backward(&mut d, &probs, &labels, 3, smoothing);
        let want_d: Vec<f64> = (0..6)
            .map(|i| {
                let onehot = if i % 3 == labels[i / 3] as usize { 1.0 } else { 0.0 };
                (want_p[i] - ((1.0 - smoothing) * onehot + smoothing / 3.0)) / 2.0
            })
            .collect();
        rep.check(&format!("dlogits by hand, smoothing {smoothing}"), &d, &want_d, FWD_TOL);
    }
    // Large logits do not overflow: loss of [1000, 0] with label 1 is 1000 + ln(1 + e^−1000).
    let mut probs = vec![f64::NAN; 2];
    let got = be.cross_entropy_forward(&mut probs, &vec![1000.0, 0.0], &[1], 2, 0.0);
    rep.check("loss of logits [1000, 0] label 1", &[got], &[1000.0], FWD_TOL);
    rep.check("softmax of [1000, 0]", &probs, &[1.0, 0.0], FWD_TOL);
    rep.finish("cross_entropy by hand");
}

// ---------------------------------------------------------------------------------------------
// sgd_step

/// `torch.optim.SGD.step` for one tensor, written from its documentation (dampening 0):
/// d = g + wd·p; with momentum, buf = d on the first step, else μ·buf + d, and
/// d = d + μ·buf (Nesterov) or buf; p −= lr·d.
fn torch_sgd(p: &mut [f64], g: &[f64], buf: &mut Option<Vec<f64>>, opt: &Sgd) {
    let d: Vec<f64> = g.iter().zip(p.iter()).map(|(g, p)| g + opt.weight_decay * p).collect();
    let d = if opt.momentum != 0.0 {
        let b: Vec<f64> = match buf.take() {
            None => d.clone(),
            Some(b) => b.iter().zip(&d).map(|(b, d)| opt.momentum * b + d).collect(),
        };
        let step = if opt.nesterov {
            d.iter().zip(&b).map(|(d, b)| d + opt.momentum * b).collect()
        } else {
            b.clone()
        };
        *buf = Some(b);
        step
    } else {
        d
    };
    for (p, d) in p.iter_mut().zip(&d) {
        *p -= opt.lr * d;
    }
}

#[test]
fn sgd_step_matches_torch_optim_sgd() {
    let be = cpu();
    let mut r = rng(0x56D0);
    let mut rep = Report::default();
    const SGD_TOL: Tol = Tol::new(
        1e-15,
        1e-14,
        "the same f64 formula; only the association of the operations may differ",
    );
    let configs = [
        Sgd { lr: 0.1, momentum: 0.9, weight_decay: 5e-2, nesterov: false },
        Sgd { lr: 0.1, momentum: 0.9, weight_decay: 5e-2, nesterov: true },
        Sgd { lr: 0.05, momentum: 0.5, weight_decay: 0.0, nesterov: true },
        Sgd { lr: 0.1, momentum: 0.0, weight_decay: 5e-2, nesterov: false },
        Sgd { lr: 0.1, momentum: 0.0, weight_decay: 0.0, nesterov: false },
    ];
    let len = 37;
    for opt in &configs {
        let tag = format!("sgd {opt:?}");
        let p0 = uniform(&mut r, len, -1.0, 1.0);
        let (mut p, mut want_p) = (p0.clone(), p0.clone());
        // Garbage in the buffer before the first step: PyTorch starts from the gradient, and
        // without momentum the buffer is never read.
        let mut buf = vec![f64::NAN; len];
        let mut want_buf = None;
        for step in 0..3 {
            let g = uniform(&mut r, len, -1.0, 1.0);
            be.sgd_step(&mut p, &g, &mut buf, step == 0, opt);
            torch_sgd(&mut want_p, &g, &mut want_buf, opt);
            rep.check(&format!("{tag} step {step} param"), &p, &want_p, SGD_TOL);
            if let Some(b) = &want_buf {
                rep.check(&format!("{tag} step {step} momentum buffer"), &buf, b, SGD_TOL);
            }
        }
        assert!(
            p.iter().zip(&p0).all(|(a, b)| (a - b).abs() > 1e-6),
            "{tag}: the parameters did not move"
        );
    }
    // Nesterov and plain momentum give different results (the check above can tell them apart).
    let g = vec![1.0; 4];
    let mut a = vec![0.0; 4];
    let mut b = vec![0.0; 4];
    let (mut ba, mut bb) = (vec![0.0; 4], vec![0.0; 4]);
    be.sgd_step(&mut a, &g, &mut ba, true, &configs[0]);
    be.sgd_step(&mut b, &g, &mut bb, true, &configs[1]);
    assert!((a[0] - b[0]).abs() > 1e-3, "nesterov made no difference: {a:?} vs {b:?}");
    rep.finish("sgd_step vs torch.optim.SGD");
}

/// The fused BatchNorm+ReLU the network runs (one node where the model has a BatchNorm then a
/// ReLU) is exactly the two ops in sequence, bit for bit, in f32 and f64: training forward
/// (with the running statistics), eval forward, and backward (dx, dγ, dβ accumulated).
#[test]
fn batch_norm_relu_fused_equals_the_two_ops_bitwise() {
    fn run<T: incept::backend::Elem>() {
        let be = Cpu;
        let xs = Nhwc::new(3, 5, 4, 6);
        let c = xs.c;
        let mut r = rng(77);
        let cast = |v: Vec<f64>| v.into_iter().map(T::cast).collect::<Vec<T>>();
        let x = cast(signed(&mut r, xs.len(), 0.0, 2.0));
        let gamma = cast(uniform(&mut r, c, 0.5, 1.5));
        let beta = cast(signed(&mut r, c, 0.0, 0.5));
        let dy0 = cast(signed(&mut r, xs.len(), 0.0, 1.0));
        let rv0 = cast(uniform(&mut r, c, 0.5, 1.5));
        let cfg = BatchNormCfg::default();
        let z = |n: usize| vec![T::zero(); n];
        let bits = |v: &[T]| v.iter().map(|x| x.as_f64().to_bits()).collect::<Vec<_>>();

        // Separate: BatchNorm, ReLU; backward ReLU (in place), BatchNorm.
        let (mut t, mut y1, mut m1, mut i1) = (z(xs.len()), z(xs.len()), z(c), z(c));
        let (mut rm1, mut rv1) = (z(c), rv0.clone());
        be.batch_norm_forward_train(
            &mut t,
            &x,
            Affine { gamma: &gamma, beta: &beta },
            RunningStats { mean: &mut rm1, var: &mut rv1 },
            BatchStats { mean: &mut m1, invstd: &mut i1 },
            xs,
            &cfg,
            false,
            None,
        )
        .unwrap();
        be.relu_forward(&mut y1, &t);
        let mut g = dy0.clone();
        be.relu_backward(&mut g, &y1);
        let (mut dx1, mut dg1, mut db1) = (z(xs.len()), vec![T::one(); c], vec![T::one(); c]);
        be.batch_norm_backward(
            &mut dx1,
            Affine { gamma: &mut dg1, beta: &mut db1 },
            &g,
            None,
            &x,
            &gamma,
            BatchStats { mean: &m1, invstd: &i1 },
            xs,
            None,
        );
        let mut te = z(xs.len());
        let mut e1 = z(xs.len());
        be.batch_norm_forward_eval(
            &mut te,
            &x,
            Affine { gamma: &gamma, beta: &beta },
            RunningStats { mean: &rm1, var: &rv1 },
            xs,
            &cfg,
            false,
        );
        be.relu_forward(&mut e1, &te);

        // Fused.
        let (mut y2, mut m2, mut i2) = (z(xs.len()), z(c), z(c));
        let (mut rm2, mut rv2) = (z(c), rv0.clone());
        be.batch_norm_forward_train(
            &mut y2,
            &x,
            Affine { gamma: &gamma, beta: &beta },
            RunningStats { mean: &mut rm2, var: &mut rv2 },
            BatchStats { mean: &mut m2, invstd: &mut i2 },
            xs,
            &cfg,
            true,
            None,
        )
        .unwrap();
        let d = dy0.clone();
        let (mut dx2, mut dg2, mut db2) = (z(xs.len()), vec![T::one(); c], vec![T::one(); c]);
        be.batch_norm_backward(
            &mut dx2,
            Affine { gamma: &mut dg2, beta: &mut db2 },
            &d,
            Some(&y2),
            &x,
            &gamma,
            BatchStats { mean: &m2, invstd: &i2 },
            xs,
            None,
        );
        let mut e2 = z(xs.len());
        be.batch_norm_forward_eval(
            &mut e2,
            &x,
            Affine { gamma: &gamma, beta: &beta },
            RunningStats { mean: &rm2, var: &rv2 },
            xs,
            &cfg,
            true,
        );

        for (name, a, b) in [
            ("y", &y1, &y2),
            ("mean", &m1, &m2),
            ("invstd", &i1, &i2),
            ("running_mean", &rm1, &rm2),
            ("running_var", &rv1, &rv2),
            ("dx", &dx1, &dx2),
            ("dgamma", &dg1, &dg2),
            ("dbeta", &db1, &db2),
            ("eval y", &e1, &e2),
        ] {
            assert_eq!(
                bits(a),
                bits(b),
                "{name} differs between the fused op and BatchNorm then ReLU; first values {:?} vs {:?}",
                &a[..3],
                &b[..3]
            );
        }
        // The ReLU did something: some outputs are clamped, some gradients masked.
        assert!(y2.iter().any(|v| *v == T::zero()) && y2.iter().any(|v| *v > T::zero()));
    }
    run::<f32>();
    run::<f64>();
}
