//! Pooling, AddTensor and SGEMM against their definitions.

use super::*;

/// The definition, with its own window loop: padding never wins a maximum, NaN is the
/// maximum of any window holding one, and backward routes to the first maximum (the first
/// NaN) in row-major order.
fn pool_oracle(
    pool: &PoolDesc, xd: &TensorDesc, x: &[f64], yd: &TensorDesc, dy: &[f64],
) -> (Exact, Exact) {
    let [n, c, h, w] = xd.dims;
    let [_, _, p, q] = yd.dims;
    let area = (pool.window[0] * pool.window[1]) as f64;
    let (mut fwd, mut bwd) = (Exact::new(yd.len()), Exact::new(xd.len()));
    for ni in 0..n {
        for ci in 0..c {
            for pi in 0..p {
                for qi in 0..q {
                    let yi = yd.offset(ni, ci, pi, qi);
                    let mut taps = Vec::new();
                    for i in 0..pool.window[0] {
                        for j in 0..pool.window[1] {
                            let hi = (pi * pool.stride[0] + i) as isize - pool.pad[0] as isize;
                            let wi = (qi * pool.stride[1] + j) as isize - pool.pad[1] as isize;
                            if hi >= 0 && wi >= 0 && hi < h as isize && wi < w as isize {
                                taps.push(xd.offset(ni, ci, hi as usize, wi as usize));
                            }
                        }
                    }
                    match pool.mode {
                        PoolMode::MaxDeterministic => {
                            let at = match taps.iter().find(|&&t| x[t].is_nan()) {
                                Some(&t) => t,
                                None => taps.iter().copied().fold(taps[0], |m, t| {
                                    if x[t] > x[m] {
                                        t
                                    } else {
                                        m
                                    }
                                }),
                            };
                            fwd.add(yi, x[at]);
                            bwd.add(at, dy[yi]);
                        }
                        PoolMode::AverageCountIncludePadding => {
                            for &t in &taps {
                                fwd.add(yi, x[t] / area);
                                bwd.add(t, dy[yi] / area);
                            }
                        }
                    }
                }
            }
        }
    }
    (fwd, bwd)
}

pub(super) struct PoolCase {
    pub(super) pool: PoolDesc,
    pub(super) x: TensorDesc,
    pub(super) y: TensorDesc,
    pub(super) alpha: f32,
    pub(super) beta: f32,
}

pub(super) fn pool_case(
    mode: PoolMode, window: usize, pad: usize, stride: usize, x: [usize; 4], dtype: DType,
    layout: Layout,
) -> PoolCase {
    let [n, c, h, w] = x;
    let p = out_len(h, pad, window, stride, 1).expect("fits");
    let q = out_len(w, pad, window, stride, 1).expect("fits");
    PoolCase {
        pool: PoolDesc { mode, window: [window; 2], pad: [pad; 2], stride: [stride; 2] },
        x: TensorDesc { dtype, layout, dims: x },
        y: TensorDesc { dtype, layout, dims: [n, c, p, q] },
        alpha: 1.0,
        beta: 0.0,
    }
}

/// Runs forward then backward of `pc` on `xv` (random dy; NaN-filled outputs when beta is
/// 0) and checks both; returns (y, dx).
fn pool_check(pc: &PoolCase, xv: &[f32], seed: u64) -> (Vec<f64>, Vec<f64>) {
    let dt = pc.x.dtype;
    let mut rng = Rng(seed);
    let outputs = |rng: &mut Rng, len| {
        if pc.beta == 0.0 {
            vec![f32::NAN; len]
        } else {
            rng.values(len)
        }
    };
    let mut x = Buf::of(dt, xv);
    let mut y = Buf::of(dt, &outputs(&mut rng, pc.y.len()));
    let mut dy = Buf::of(dt, &rng.values(pc.y.len()));
    let mut dx = Buf::of(dt, &outputs(&mut rng, pc.x.len()));
    let (x0, y0, dy0, dx0) = (
        x.read(dt, pc.x.len()),
        y.read(dt, pc.y.len()),
        dy.read(dt, pc.y.len()),
        dx.read(dt, pc.x.len()),
    );
    let fwd = DnnCall::PoolForward(PoolForward {
        pool: pc.pool,
        x: pc.x,
        x_ptr: x.ptr(),
        y: pc.y,
        y_ptr: y.ptr(),
        alpha: pc.alpha,
        beta: pc.beta,
    });
    // SAFETY: the buffers cover the call's regions.
    unsafe { run_dnn(&fwd).expect("runs") };
    let bwd = DnnCall::PoolBackward(PoolBackward {
        pool: pc.pool,
        y: pc.y,
        y_ptr: y.ptr(),
        dy_ptr: dy.ptr(),
        x: pc.x,
        x_ptr: x.ptr(),
        dx_ptr: dx.ptr(),
        alpha: pc.alpha,
        beta: pc.beta,
    });
    // SAFETY: as above.
    unsafe { run_dnn(&bwd).expect("runs") };
    let (ef, eb) = pool_oracle(&pc.pool, &pc.x, &x0, &pc.y, &dy0);
    let (yv, dxv) = (y.read(dt, pc.y.len()), dx.read(dt, pc.x.len()));
    let what = format!(
        "{:?} {:?} {:?} alpha {} beta {}",
        pc.pool, pc.x.dims, pc.x.layout, pc.alpha, pc.beta
    );
    check(&format!("pool forward {what}"), dt, &yv, &y0, &ef, pc.alpha, pc.beta);
    check(&format!("pool backward {what}"), dt, &dxv, &dx0, &eb, pc.alpha, pc.beta);
    (yv, dxv)
}

#[test]
fn pooling_matches_the_definition() {
    use PoolMode::*;
    let mut seed = 0;
    for dtype in [DType::F32, DType::F16, DType::Bf16] {
        for layout in [Layout::Nchw, Layout::Nhwc] {
            for (mode, window, pad, stride) in [
                // Overlapping windows with padding: the Inception pool branch and the
                // stride-2 reductions.
                (MaxDeterministic, 3, 1, 1),
                (MaxDeterministic, 3, 1, 2),
                (MaxDeterministic, 2, 0, 2),
                (AverageCountIncludePadding, 2, 0, 2),
                (AverageCountIncludePadding, 3, 1, 1),
            ] {
                for (alpha, beta) in [(1.0, 0.0), (0.5, 1.0)] {
                    seed += 1;
                    let mut pc = pool_case(mode, window, pad, stride, [2, 3, 7, 6], dtype, layout);
                    (pc.alpha, pc.beta) = (alpha, beta);
                    // Few distinct values, so that windows hold ties.
                    let mut rng = Rng(seed);
                    let xv: Vec<f32> =
                        (0..pc.x.len()).map(|_| (rng.uniform() * 4.0).round()).collect();
                    pool_check(&pc, &xv, seed);
                }
            }
        }
    }
}

#[test]
fn max_pool_backward_routes_to_the_first_maximum() {
    // 2×2 windows, stride 1, over [[1, 5, 5], [0, 5, 2]]: both windows' maximum 5 first
    // occurs at (0, 1), which gets both gradients.
    let pc = pool_case(PoolMode::MaxDeterministic, 2, 0, 1, [1, 1, 2, 3], DType::F32, Layout::Nchw);
    let (y, dx) = pool_check(&pc, &[1.0, 5.0, 5.0, 0.0, 5.0, 2.0], 3);
    assert_eq!(y, [5.0, 5.0]);
    assert_eq!(dx.iter().filter(|&&g| g != 0.0).count(), 1);
    assert!(dx[1] != 0.0);
}

#[test]
fn max_pool_propagates_nan() {
    let pc = pool_case(PoolMode::MaxDeterministic, 3, 1, 2, [1, 2, 6, 6], DType::F32, Layout::Nhwc);
    let mut xv = Rng(5).values(pc.x.len());
    xv[pc.x.offset(0, 1, 3, 3)] = f32::NAN;
    let (y, dx) = pool_check(&pc, &xv, 9);
    // Window p covers rows 2p-1 ..= 2p+1: (3, 3) lies in those of (p, q) ∈ {1, 2}², channel 1.
    for p in 0..3 {
        for q in 0..3 {
            for c in 0..2 {
                let nan = c == 1 && p >= 1 && q >= 1;
                assert_eq!(y[pc.y.offset(0, c, p, q)].is_nan(), nan, "y at {c} {p} {q}");
            }
        }
    }
    assert!(dx.iter().all(|g| g.is_finite()));
    let avg = pool_case(
        PoolMode::AverageCountIncludePadding,
        3,
        1,
        2,
        [1, 2, 6, 6],
        DType::F32,
        Layout::Nhwc,
    );
    let (y, _) = pool_check(&avg, &xv, 10);
    assert_eq!(y.iter().filter(|v| v.is_nan()).count(), 4);
}

#[test]
fn add_tensor_broadcasts() {
    let cases = [
        // The backend's bias: fp32 [1, C, 1, 1] NCHW onto an fp32 NHWC activation.
        ([1, 5, 1, 1], Layout::Nchw, Layout::Nhwc, DType::F32, 1.0, 1.0),
        ([1, 5, 1, 1], Layout::Nchw, Layout::Nhwc, DType::F32, 1.0, 0.0),
        ([2, 1, 4, 1], Layout::Nhwc, Layout::Nchw, DType::F16, -0.5, 2.0),
        ([2, 5, 4, 3], Layout::Nhwc, Layout::Nchw, DType::Bf16, 1.5, 0.0),
    ];
    for (i, (a_dims, a_layout, c_layout, dt, alpha, beta)) in cases.into_iter().enumerate() {
        let ad = TensorDesc { dtype: dt, layout: a_layout, dims: a_dims };
        let cd = TensorDesc { dtype: dt, layout: c_layout, dims: [2, 5, 4, 3] };
        let mut rng = Rng(20 + i as u64);
        let mut a = Buf::of(dt, &rng.values(ad.len()));
        let c_init = if beta == 0.0 { vec![f32::NAN; cd.len()] } else { rng.values(cd.len()) };
        let mut c = Buf::of(dt, &c_init);
        let (a0, c0) = (a.read(dt, ad.len()), c.read(dt, cd.len()));
        let call = DnnCall::AddTensor(AddTensor {
            a: ad,
            a_ptr: a.ptr(),
            c: cd,
            c_ptr: c.ptr(),
            alpha,
            beta,
        });
        // SAFETY: the buffers cover the call's regions.
        unsafe { run_dnn(&call).expect("runs") };
        let mut e = Exact::new(cd.len());
        let pick = |i: usize, axis: usize| if a_dims[axis] == 1 { 0 } else { i };
        for n in 0..2 {
            for ch in 0..5 {
                for h in 0..4 {
                    for w in 0..3 {
                        e.add(
                            cd.offset(n, ch, h, w),
                            a0[ad.offset(pick(n, 0), pick(ch, 1), pick(h, 2), pick(w, 3))],
                        );
                    }
                }
            }
        }
        check(&format!("add tensor case {i}"), dt, &c.read(dt, cd.len()), &c0, &e, alpha, beta);
    }
}

#[test]
fn gemm_is_column_major_sgemm() {
    use Transpose::*;
    let (m, n, k) = (5, 4, 7);
    for (i, (transa, transb)) in [(N, N), (N, T), (T, N), (T, T)].into_iter().enumerate() {
        for (alpha, beta) in [(1.0f32, 0.0f32), (0.7, 0.5)] {
            let (a_rows, a_cols) = if transa == N { (m, k) } else { (k, m) };
            let (b_rows, b_cols) = if transb == N { (k, n) } else { (n, k) };
            // Leading dimensions beyond the rows: the gaps must be neither read nor written.
            let (lda, ldb, ldc) = (a_rows + 3, b_rows + 1, m + 2);
            let mut rng = Rng(40 + i as u64);
            let a_init = rng.values(lda * a_cols);
            let b_init = rng.values(ldb * b_cols);
            let mut c_init = rng.values(ldc * n);
            for (j, v) in c_init.iter_mut().enumerate() {
                if beta == 0.0 || j % ldc >= m {
                    *v = f32::NAN;
                }
            }
            let (mut a, mut b, mut c) = (
                Buf::of(DType::F32, &a_init),
                Buf::of(DType::F32, &b_init),
                Buf::of(DType::F32, &c_init),
            );
            let g = Gemm {
                transa,
                transb,
                m,
                n,
                k,
                a: a.ptr(),
                lda,
                b: b.ptr(),
                ldb,
                c: c.ptr(),
                ldc,
                alpha,
                beta,
            };
            validate_gemm(&g).expect("valid");
            // SAFETY: the buffers cover the call's regions.
            unsafe { run_gemm(&g).expect("runs") };
            let opa = |r: usize, l: usize| {
                f64::from(if transa == N { a_init[r + l * lda] } else { a_init[l + r * lda] })
            };
            let opb = |l: usize, col: usize| {
                f64::from(if transb == N { b_init[l + col * ldb] } else { b_init[col + l * ldb] })
            };
            let mut e = Exact::new(m * n);
            let mut old = vec![0.0; m * n];
            let mut got = vec![0.0; m * n];
            let out = c.read(DType::F32, ldc * n);
            for col in 0..n {
                for row in 0..m {
                    for l in 0..k {
                        e.add(row + col * m, opa(row, l) * opb(l, col));
                    }
                    old[row + col * m] = f64::from(c_init[row + col * ldc]);
                    got[row + col * m] = out[row + col * ldc];
                }
                for row in m..ldc {
                    assert!(
                        out[row + col * ldc].is_nan(),
                        "C's padding at ({row}, {col}) was written"
                    );
                }
            }
            check(
                &format!("gemm {transa:?}{transb:?} alpha {alpha} beta {beta}"),
                DType::F32,
                &got,
                &old,
                &e,
                alpha,
                beta,
            );
        }
    }
}
