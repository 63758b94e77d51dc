//! BatchNorm in training (batch statistics) and evaluation (running statistics), alone and
//! fused with the ReLU that follows it.

// The ops take the arguments `BatchNormOps` declares for them, one for one.
#![allow(clippy::too_many_arguments)]

use super::*;

impl<T: Elem> BatchNormOps<T> for Cpu {
    /// Training-mode BatchNorm (then ReLU when `relu`): batch statistics in f64 over fixed row
    /// chunks, PyTorch's running-statistics rule.
    fn batch_norm_forward_train(
        &self, y: &mut Vec<T>, x: &Vec<T>, Affine { gamma, beta }: Affine<&Vec<T>>,
        running: RunningStats<&mut Vec<T>>, batch: BatchStats<&mut Vec<T>>, xs: Nhwc,
        cfg: &BatchNormCfg, relu: bool, sync: Option<&dyn BatchNormSync>,
    ) -> anyhow::Result<()> {
        crate::backend::check_batch_norm_train(xs)?;
        let (local_m, c) = (xs.pixels(), xs.c);
        // Two passes (mean, then squared deviations), as exact as the data allows.
        // In f64 per term: with small batches the variance of a channel can be tiny next to its
        // mean, and PyTorch's trajectories are only reproduced with exact statistics (the
        // 5-step Nesterov fixture diverges from PyTorch's within tolerance otherwise).
        let [s1] = channel_sums::<f64, 1>(local_m, c, |r, acc| {
            for (a, &v) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]) {
                *a += v.as_f64();
            }
        });
        let mu: Vec<f64> = s1.iter().map(|s| s / local_m as f64).collect();
        let [s2] = channel_sums::<f64, 1>(local_m, c, |r, acc| {
            for ((a, &v), &mu) in acc.iter_mut().zip(&x[r * c..(r + 1) * c]).zip(&mu) {
                let d = v.as_f64() - mu;
                *a += d * d;
            }
        });
        // Σ (x − μ)² over the batch; with `sync`, over every rank's.
        let (m, mu, s2) = match sync {
            None => (local_m, mu, s2),
            Some(sync) => crate::backend::global_moments(sync, local_m, mu, s2),
        };
        let var: Vec<f64> = s2.iter().map(|s| s / m as f64).collect();
        let inv: Vec<f64> = var.iter().map(|v| 1.0 / (v + cfg.eps).sqrt()).collect();
        for ch in 0..c {
            batch.mean[ch] = T::cast(mu[ch]);
            batch.invstd[ch] = T::cast(inv[ch]);
            let unbiased = var[ch] * m as f64 / (m - 1) as f64;
            running.mean[ch] =
                T::cast((1.0 - cfg.momentum) * running.mean[ch].as_f64() + cfg.momentum * mu[ch]);
            running.var[ch] =
                T::cast((1.0 - cfg.momentum) * running.var[ch].as_f64() + cfg.momentum * unbiased);
        }
        // y = (x − μ)·(invstd·γ) + β; subtracting the mean first keeps f32 exact enough when
        // |μ| is large next to the spread.
        let mean_t: Vec<T> = mu.iter().map(|&v| T::cast(v)).collect();
        let scale: Vec<T> = (0..c).map(|ch| T::cast(inv[ch] * gamma[ch].as_f64())).collect();
        bn_apply(y, x, &mean_t, &scale, beta, c, relu);
        Ok(())
    }

    /// Eval-mode BatchNorm (then ReLU when `relu`) with the running statistics.
    fn batch_norm_forward_eval(
        &self, y: &mut Vec<T>, x: &Vec<T>, Affine { gamma, beta }: Affine<&Vec<T>>,
        running: RunningStats<&Vec<T>>, xs: Nhwc, cfg: &BatchNormCfg, relu: bool,
    ) {
        let scale: Vec<T> = (0..xs.c)
            .map(|ch| {
                let inv = 1.0 / (running.var[ch].as_f64() + cfg.eps).sqrt();
                T::cast(inv * gamma[ch].as_f64())
            })
            .collect();
        bn_apply(y, x, running.mean, &scale, beta, xs.c, relu);
    }

    /// Backward of training-mode BatchNorm, of BatchNorm+ReLU when `y` (the ReLU's output) is
    /// given: the incoming gradient is masked by ReLU on the fly, in both passes.
    fn batch_norm_backward(
        &self, dx: &mut Vec<T>, Affine { gamma: dgamma, beta: dbeta }: Affine<&mut Vec<T>>,
        dy: &Vec<T>, relu_out: Option<&Vec<T>>, x: &Vec<T>, gamma: &Vec<T>,
        BatchStats { mean, invstd }: BatchStats<&Vec<T>>, xs: Nhwc,
        sync: Option<&dyn BatchNormSync>,
    ) {
        let (local_m, c) = (xs.pixels(), xs.c);
        let inv: Vec<f64> = invstd.iter().map(|v| v.as_f64()).collect();
        // Σ dy and Σ dy·x̂ per channel, x̂ = (x − μ)·invstd, dy masked by the ReLU when there is
        // one. The row loops take slices and branch once per row, so they stay vectorisable.
        let [sum_g, sum_gx] = channel_sums::<T, 2>(local_m, c, |r, acc| {
            let (dyr, xr) = (&dy[r * c..(r + 1) * c], &x[r * c..(r + 1) * c]);
            let (sg, sgx) = acc.split_at_mut(c);
            // Σ g and Σ g·(x − μ); x̂ = (x − μ)·invstd is applied to the totals.
            match relu_out {
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
        let mut sums: Vec<[f64; 2]> = (0..c).map(|ch| [sum_g[ch], sum_gx[ch] * inv[ch]]).collect();
        for ch in 0..c {
            dbeta[ch] += T::cast(sums[ch][0]);
            dgamma[ch] += T::cast(sums[ch][1]);
        }
        // The affine's gradients are this rank's; dx is that of the global batch, whose sums
        // are every rank's (PyTorch's SyncBatchNorm does the same).
        let mut m = local_m;
        if let Some(sync) = sync {
            let mut flat: Vec<f64> = sums.iter().flatten().copied().collect();
            flat.push(local_m as f64);
            sync.sum(&mut flat);
            for (s, f) in sums.iter_mut().zip(flat.chunks(2)) {
                *s = [f[0], f[1]];
            }
            m = flat[2 * c] as usize;
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
        dx.par_chunks_mut(c).enumerate().with_min_len(ELEMENTWISE_ROWS).for_each(|(r, dxr)| {
            let (dyr, xr) = (&dy[r * c..(r + 1) * c], &x[r * c..(r + 1) * c]);
            match relu_out {
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
}

/// `y = (x − mean)·scale + beta` per channel, then ReLU when `relu_after`.
fn bn_apply<T: Elem>(
    y: &mut [T], x: &[T], mean: &[T], scale: &[T], beta: &[T], c: usize, relu_after: bool,
) {
    y.par_chunks_mut(c).zip(x.par_chunks(c)).with_min_len(ELEMENTWISE_ROWS).for_each(|(yr, xr)| {
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
