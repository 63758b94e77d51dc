//! BatchNorm in training (batch statistics) and evaluation (running statistics), alone and
//! fused with the ReLU that follows it.

// The ops take the arguments `Backend` declares for them, one for one.
#![allow(clippy::too_many_arguments)]

use super::*;

/// Training-mode BatchNorm (then ReLU when `relu`): batch statistics in f64 over fixed row
/// chunks, PyTorch's running-statistics rule. Outputs: y, mean, invstd, running mean and var.
#[allow(clippy::type_complexity)]
pub(super) fn bn_train<T: Elem>(
    (y, mean, invstd, running_mean, running_var): (
        &mut [T],
        &mut [T],
        &mut [T],
        &mut [T],
        &mut [T],
    ),
    (x, gamma, beta): (&[T], &[T], &[T]),
    xs: Nhwc,
    cfg: &BatchNormCfg,
    relu_after: bool,
) -> anyhow::Result<()> {
    crate::backend::check_batch_norm_train(xs)?;
    let (m, c) = (xs.pixels(), xs.c);
    // Two passes (mean, then squared deviations), as exact as the data allows.
    // In f64 per term: with small batches the variance of a channel can be tiny next to its
    // mean, and PyTorch's trajectories are only reproduced with exact statistics (the
    // 5-step Nesterov fixture diverges from PyTorch's within tolerance otherwise).
    let [s1] = channel_sums::<f64, 1>(m, c, |r, acc| {
        for (a, &v) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]) {
            *a += v.as_f64();
        }
    });
    let mu: Vec<f64> = s1.iter().map(|s| s / m as f64).collect();
    let [s2] = channel_sums::<f64, 1>(m, c, |r, acc| {
        for ((a, &v), &mu) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]).zip(&mu) {
            let d = v.as_f64() - mu;
            *a += d * d;
        }
    });
    let var: Vec<f64> = s2.iter().map(|s| s / m as f64).collect();
    let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + cfg.eps).sqrt()).collect();
    for ch in 0..c {
        mean[ch] = T::cast(mu[ch]);
        invstd[ch] = T::cast(inv[ch]);
        let unbiased = var[ch] * m as f64 / (m - 1) as f64;
        running_mean[ch] =
            T::cast((1.0 - cfg.momentum) * running_mean[ch].as_f64() + cfg.momentum * mu[ch]);
        running_var[ch] =
            T::cast((1.0 - cfg.momentum) * running_var[ch].as_f64() + cfg.momentum * unbiased);
    }
    // y = (x − μ)·(invstd·γ) + β; subtracting the mean first keeps f32 exact enough when
    // |μ| is large next to the spread.
    let mean_t: Vec<T> = mu.iter().map(|&v| T::cast(v)).collect();
    let scale: Vec<T> = (0..c)
        .map(|ch| T::cast(inv[ch] * gamma[ch].as_f64()))
        .collect();
    bn_apply(y, x, &mean_t, &scale, beta, c, relu_after);
    Ok(())
}

/// `y = (x − mean)·scale + beta` per channel, then ReLU when `relu_after`.
pub(super) fn bn_apply<T: Elem>(
    y: &mut [T],
    x: &[T],
    mean: &[T],
    scale: &[T],
    beta: &[T],
    c: usize,
    relu_after: bool,
) {
    y.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .with_min_len(ELEMENTWISE_ROWS)
        .for_each(|(yr, xr)| {
            if relu_after {
                for ch in 0..c {
                    yr[ch] = relu((xr[ch] - mean[ch]) * scale[ch] + beta[ch]);
                }
            } else {
                for ch in 0..c {
                    yr[ch] = (xr[ch] - mean[ch]) * scale[ch] + beta[ch];
                }
            }
        });
}

/// Eval-mode BatchNorm (then ReLU when `relu_after`) with the running statistics.
pub(super) fn bn_eval<T: Elem>(
    y: &mut [T],
    (x, gamma, beta): (&[T], &[T], &[T]),
    (running_mean, running_var): (&[T], &[T]),
    xs: Nhwc,
    cfg: &BatchNormCfg,
    relu_after: bool,
) {
    let c = xs.c;
    let scale: Vec<T> = (0..c)
        .map(|ch| {
            let inv = 1.0 / (running_var[ch].as_f64() + cfg.eps).sqrt();
            T::cast(inv * gamma[ch].as_f64())
        })
        .collect();
    bn_apply(y, x, running_mean, &scale, beta, c, relu_after);
}

/// Backward of training-mode BatchNorm, of BatchNorm+ReLU when `y` (the ReLU's output) is
/// given: the incoming gradient is masked by ReLU on the fly, in both passes.
pub(super) fn bn_backward<T: Elem>(
    (dx, dgamma, dbeta): (&mut [T], &mut [T], &mut [T]),
    dy: &[T],
    y: Option<&[T]>,
    (x, gamma, mean, invstd): (&[T], &[T], &[T], &[T]),
    xs: Nhwc,
) {
    let (m, c) = (xs.pixels(), xs.c);
    let inv: Vec<f64> = invstd.iter().map(|v| v.as_f64()).collect();
    // Σ dy and Σ dy·x̂ per channel, x̂ = (x − μ)·invstd, dy masked by the ReLU when there is
    // one. The row loops take slices and branch once per row, so they stay vectorisable.
    let [sum_g, sum_gx] = channel_sums::<T, 2>(m, c, |r, acc| {
        let (dyr, xr) = (&dy[r * c..(r + 1) * c], &x[r * c..(r + 1) * c]);
        let (sg, sgx) = acc.split_at_mut(c);
        // Σ g and Σ g·(x − μ); x̂ = (x − μ)·invstd is applied to the totals.
        match y {
            Some(y) => {
                let yr = &y[r * c..(r + 1) * c];
                for ch in 0..c {
                    let g = relu_grad(dyr[ch], yr[ch]);
                    sg[ch] += g;
                    sgx[ch] += g * (xr[ch] - mean[ch]);
                }
            }
            None => {
                for ch in 0..c {
                    let g = dyr[ch];
                    sg[ch] += g;
                    sgx[ch] += g * (xr[ch] - mean[ch]);
                }
            }
        }
    });
    let sums: Vec<[f64; 2]> = (0..c).map(|ch| [sum_g[ch], sum_gx[ch] * inv[ch]]).collect();
    for ch in 0..c {
        dbeta[ch] += T::cast(sums[ch][0]);
        dgamma[ch] += T::cast(sums[ch][1]);
    }
    // dx = γ·invstd/M · (M·dy − Σdy − x̂·Σ(dy·x̂)) = a·dy + b·(x − μ) + c per channel.
    let mf = m as f64;
    let mut a = vec![T::zero(); c];
    let mut b = vec![T::zero(); c];
    let mut c0 = vec![T::zero(); c];
    for ch in 0..c {
        let k = gamma[ch].as_f64() * inv[ch] / mf;
        a[ch] = T::cast(k * mf);
        b[ch] = T::cast(-k * sums[ch][1] * inv[ch]);
        c0[ch] = T::cast(-k * sums[ch][0]);
    }
    dx.par_chunks_mut(c)
        .enumerate()
        .with_min_len(ELEMENTWISE_ROWS)
        .for_each(|(r, dxr)| {
            let (dyr, xr) = (&dy[r * c..(r + 1) * c], &x[r * c..(r + 1) * c]);
            match y {
                Some(y) => {
                    let yr = &y[r * c..(r + 1) * c];
                    for ch in 0..c {
                        let g = relu_grad(dyr[ch], yr[ch]);
                        dxr[ch] = a[ch] * g + b[ch] * (xr[ch] - mean[ch]) + c0[ch];
                    }
                }
                None => {
                    for ch in 0..c {
                        dxr[ch] = a[ch] * dyr[ch] + b[ch] * (xr[ch] - mean[ch]) + c0[ch];
                    }
                }
            }
        });
}

pub(super) fn batch_norm_forward_train<T: Elem>(
    y: &mut [T],
    mean: &mut [T],
    invstd: &mut [T],
    running_mean: &mut [T],
    running_var: &mut [T],
    x: &[T],
    gamma: &[T],
    beta: &[T],
    xs: Nhwc,
    cfg: &BatchNormCfg,
) -> anyhow::Result<()> {
    bn_train(
        (y, mean, invstd, running_mean, running_var),
        (x, gamma, beta),
        xs,
        cfg,
        false,
    )
}

pub(super) fn batch_norm_relu_forward_train<T: Elem>(
    y: &mut [T],
    mean: &mut [T],
    invstd: &mut [T],
    running_mean: &mut [T],
    running_var: &mut [T],
    x: &[T],
    gamma: &[T],
    beta: &[T],
    xs: Nhwc,
    cfg: &BatchNormCfg,
) -> anyhow::Result<()> {
    bn_train(
        (y, mean, invstd, running_mean, running_var),
        (x, gamma, beta),
        xs,
        cfg,
        true,
    )
}

pub(super) fn batch_norm_forward_eval<T: Elem>(
    y: &mut [T],
    x: &[T],
    gamma: &[T],
    beta: &[T],
    running_mean: &[T],
    running_var: &[T],
    xs: Nhwc,
    cfg: &BatchNormCfg,
) {
    bn_eval(
        y,
        (x, gamma, beta),
        (running_mean, running_var),
        xs,
        cfg,
        false,
    );
}

pub(super) fn batch_norm_relu_forward_eval<T: Elem>(
    y: &mut [T],
    x: &[T],
    gamma: &[T],
    beta: &[T],
    running_mean: &[T],
    running_var: &[T],
    xs: Nhwc,
    cfg: &BatchNormCfg,
) {
    bn_eval(
        y,
        (x, gamma, beta),
        (running_mean, running_var),
        xs,
        cfg,
        true,
    );
}

pub(super) fn batch_norm_backward<T: Elem>(
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
    dy: &[T],
    x: &[T],
    gamma: &[T],
    mean: &[T],
    invstd: &[T],
    xs: Nhwc,
) {
    bn_backward((dx, dgamma, dbeta), dy, None, (x, gamma, mean, invstd), xs);
}

pub(super) fn batch_norm_relu_backward<T: Elem>(
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
    dy: &mut [T],
    y: &[T],
    x: &[T],
    gamma: &[T],
    mean: &[T],
    invstd: &[T],
    xs: Nhwc,
) {
    bn_backward(
        (dx, dgamma, dbeta),
        dy,
        Some(y),
        (x, gamma, mean, invstd),
        xs,
    );
}
