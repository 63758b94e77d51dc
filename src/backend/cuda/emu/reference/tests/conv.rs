//! Convolutions against their definition, and the time one takes.

use super::*;
use std::time::Instant;

/// The definition: every (n, k, p, q, c, r, s) whose tap is not padding contributes
/// x·w to y, dy·w to dx and x·dy to dw.
fn conv_oracle(dir: ConvDirection, pr: &ConvProblem, x: &[f64], w: &[f64], y: &[f64]) -> Exact {
    let [n, c, h, wd] = pr.x.dims;
    let [k, _, r, s] = pr.w.dims;
    let [_, _, p, q] = pr.y.dims;
    let cv = &pr.conv;
    let mut e = Exact::new(match dir {
        ConvDirection::Forward => pr.y.len(),
        ConvDirection::BackwardData => pr.x.len(),
        ConvDirection::BackwardFilter => pr.w.len(),
    });
    for ni in 0..n {
        for ki in 0..k {
            for pi in 0..p {
                for qi in 0..q {
                    for ci in 0..c {
                        for ri in 0..r {
                            for si in 0..s {
                                let hi = (pi * cv.stride[0] + ri * cv.dilation[0]) as isize
                                    - cv.pad[0] as isize;
                                let wi = (qi * cv.stride[1] + si * cv.dilation[1]) as isize
                                    - cv.pad[1] as isize;
                                if hi < 0 || wi < 0 || hi >= h as isize || wi >= wd as isize {
                                    continue;
                                }
                                let xi = pr.x.offset(ni, ci, hi as usize, wi as usize);
                                let wk = pr.w.offset(ki, ci, ri, si);
                                let yi = pr.y.offset(ni, ki, pi, qi);
                                match dir {
                                    ConvDirection::Forward => e.add(yi, x[xi] * w[wk]),
                                    ConvDirection::BackwardData => e.add(xi, y[yi] * w[wk]),
                                    ConvDirection::BackwardFilter => e.add(wk, x[xi] * y[yi]),
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    e
}

#[derive(Clone, Copy)]
pub(super) struct Case {
    pub(super) x: [usize; 4],
    pub(super) w: [usize; 4],
    pub(super) pad: [usize; 2],
    pub(super) stride: [usize; 2],
    pub(super) dilation: [usize; 2],
    pub(super) dtype: DType,
    pub(super) layouts: [Layout; 3],
    pub(super) alpha: f32,
    pub(super) beta: f32,
}

pub(super) fn problem(case: &Case) -> ConvProblem {
    let [n, _, h, w] = case.x;
    let [k, _, r, s] = case.w;
    let p = out_len(h, case.pad[0], r, case.stride[0], case.dilation[0]).expect("case fits");
    let q = out_len(w, case.pad[1], s, case.stride[1], case.dilation[1]).expect("case fits");
    ConvProblem {
        x: TensorDesc { dtype: case.dtype, layout: case.layouts[0], dims: case.x },
        w: FilterDesc { dtype: case.dtype, layout: case.layouts[1], dims: case.w },
        y: TensorDesc { dtype: case.dtype, layout: case.layouts[2], dims: [n, k, p, q] },
        conv: ConvDesc {
            pad: case.pad,
            stride: case.stride,
            dilation: case.dilation,
            compute: DType::F32,
            math: if case.dtype == DType::F32 { MathType::Fma } else { MathType::TensorOp },
        },
    }
}

/// Runs `dir` of `case` with `algo` (on `col_floats`-element im2col runs; `None`: through
/// run_dnn) and checks it against the oracle.
fn conv_check(case: &Case, dir: ConvDirection, algo: u32, col_floats: Option<usize>, seed: u64) {
    let pr = problem(case);
    let dt = case.dtype;
    let mut rng = Rng(seed);
    let inputs = |rng: &mut Rng, len: usize, is_output: bool| {
        if is_output && case.beta == 0.0 {
            vec![f32::NAN; len]
        } else {
            rng.values(len)
        }
    };
    let mut x = Buf::of(dt, &inputs(&mut rng, pr.x.len(), dir == ConvDirection::BackwardData));
    let mut w = Buf::of(dt, &inputs(&mut rng, pr.w.len(), dir == ConvDirection::BackwardFilter));
    let mut y = Buf::of(dt, &inputs(&mut rng, pr.y.len(), dir == ConvDirection::Forward));
    let ws_bytes = workspace_bytes(&pr, dir, algo).expect("an offered algorithm");
    let mut ws = Buf::zeroed(ws_bytes);
    let before = [x.read(dt, pr.x.len()), w.read(dt, pr.w.len()), y.read(dt, pr.y.len())];
    let call = ConvCall {
        dir,
        problem: pr,
        algo,
        x: x.ptr(),
        w: w.ptr(),
        y: y.ptr(),
        workspace: if ws_bytes > 0 { ws.ptr() } else { 0 },
        workspace_bytes: ws_bytes,
        alpha: case.alpha,
        beta: case.beta,
    };
    validate_dnn(&DnnCall::Conv(call)).expect("a valid call");
    // SAFETY: the buffers cover the call's regions.
    unsafe {
        match col_floats {
            None => run_dnn(&DnnCall::Conv(call)).expect("runs"),
            Some(limit) => run_conv(&call, limit),
        }
    }
    let exact = conv_oracle(dir, &pr, &before[0], &before[1], &before[2]);
    let (out, old, len) = match dir {
        ConvDirection::Forward => (&y, &before[2], pr.y.len()),
        ConvDirection::BackwardData => (&x, &before[0], pr.x.len()),
        ConvDirection::BackwardFilter => (&w, &before[1], pr.w.len()),
    };
    let what = format!("{dir:?} algo {algo} of {case:?}");
    check(&what, dt, &out.read(dt, len), old, &exact, case.alpha, case.beta);
    // The inputs are left as they were.
    for (i, (buf, len)) in
        [(&x, pr.x.len()), (&w, pr.w.len()), (&y, pr.y.len())].into_iter().enumerate()
    {
        let is_output = matches!(
            (i, dir),
            (0, ConvDirection::BackwardData)
                | (1, ConvDirection::BackwardFilter)
                | (2, ConvDirection::Forward)
        );
        if !is_output {
            let now = buf.read(dt, len);
            assert!(
                now.iter().zip(&before[i]).all(|(a, b)| a.to_bits() == b.to_bits()),
                "{what}: input {i} changed"
            );
        }
    }
}

impl std::fmt::Debug for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(
            f,
            "x {:?} w {:?} pad {:?} stride {:?} dilation {:?} {:?} {:?} alpha {} beta {}",
            self.x,
            self.w,
            self.pad,
            self.stride,
            self.dilation,
            self.dtype,
            self.layouts,
            self.alpha,
            self.beta
        )
    }
}

pub(super) fn cases() -> Vec<Case> {
    use DType::*;
    use Layout::*;
    let base = Case {
        x: [2, 3, 7, 7],
        w: [4, 3, 3, 3],
        pad: [1, 1],
        stride: [1, 1],
        dilation: [1, 1],
        dtype: F32,
        layouts: [Nchw, Nchw, Nchw],
        alpha: 1.0,
        beta: 0.0,
    };
    vec![
        base,
        Case { layouts: [Nhwc, Nhwc, Nhwc], alpha: 0.5, beta: 1.0, ..base },
        // Strided, dilated, a non-square kernel with asymmetric padding, a non-square input.
        Case {
            x: [2, 5, 9, 6],
            w: [6, 5, 3, 2],
            pad: [2, 1],
            stride: [2, 1],
            dilation: [2, 1],
            layouts: [Nhwc, Nchw, Nhwc],
            alpha: -1.5,
            beta: 0.25,
            ..base
        },
        // The 1×3 and 3×1 kernels of the factorised Inception branches, 16-bit.
        Case {
            x: [2, 8, 6, 5],
            w: [5, 8, 1, 3],
            pad: [0, 1],
            dtype: F16,
            layouts: [Nhwc, Nhwc, Nhwc],
            ..base
        },
        Case {
            x: [3, 4, 5, 6],
            w: [7, 4, 3, 1],
            pad: [1, 0],
            stride: [1, 2],
            dtype: Bf16,
            layouts: [Nchw, Nhwc, Nhwc],
            alpha: 2.0,
            beta: 1.0,
            ..base
        },
        // 1×1 stride 2 (some inputs feed no output), 5×5 pad 2 accumulating in f16.
        Case { x: [2, 6, 7, 8], w: [3, 6, 1, 1], pad: [0, 0], stride: [2, 2], ..base },
        Case {
            x: [1, 4, 8, 8],
            w: [4, 4, 5, 5],
            pad: [2, 2],
            dtype: F16,
            layouts: [Nhwc, Nhwc, Nchw],
            beta: 1.0,
            ..base
        },
        // The stem: 3 → many channels, stride 2.
        Case {
            x: [2, 3, 12, 12],
            w: [16, 3, 3, 3],
            stride: [2, 2],
            dtype: Bf16,
            layouts: [Nhwc, Nhwc, Nhwc],
            ..base
        },
    ]
}

#[test]
fn convolutions_match_the_definition() {
    let dirs = [ConvDirection::Forward, ConvDirection::BackwardData, ConvDirection::BackwardFilter];
    for (i, case) in cases().iter().enumerate() {
        for dir in dirs {
            for perf in conv_algorithms(&problem(case), dir, false) {
                conv_check(case, dir, perf.algo, None, 1 + i as u64);
            }
            // One image per im2col run: the runs must tile the batch, and backward filter
            // must accumulate across them.
            conv_check(case, dir, offers(dir)[0].algo, Some(1), 100 + i as u64);
        }
    }
}

#[test]
fn the_workspace_is_scribbled_on_and_inputs_kept() {
    // run_dnn fills the workspace the algorithm needs with NaN, as garbage on a GPU.
    let case = cases()[0];
    let pr = problem(&case);
    let dir = ConvDirection::Forward;
    let algo = offers(dir)[0].algo;
    let need = workspace_bytes(&pr, dir, algo).expect("offered");
    assert!(need > 0);
    let mut rng = Rng(7);
    let mut x = Buf::of(DType::F32, &rng.values(pr.x.len()));
    let mut w = Buf::of(DType::F32, &rng.values(pr.w.len()));
    let mut y = Buf::zeroed(pr.y.bytes());
    let mut ws = Buf::zeroed(need);
    let call = ConvCall {
        dir,
        problem: pr,
        algo,
        x: x.ptr(),
        w: w.ptr(),
        y: y.ptr(),
        workspace: ws.ptr(),
        workspace_bytes: need,
        alpha: 1.0,
        beta: 0.0,
    };
    // SAFETY: the buffers cover the call's regions.
    unsafe { run_dnn(&DnnCall::Conv(call)).expect("runs") };
    assert!(ws.bytes()[..need].iter().all(|&b| b == 0xff));
}

#[test]
fn time_a_training_sized_convolution() {
    // N=16, 16×16×64 → 64 channels, 3×3 pad 1: printed, not asserted.
    for dtype in [DType::F32, DType::F16] {
        let case = Case {
            x: [16, 64, 16, 16],
            w: [64, 64, 3, 3],
            pad: [1, 1],
            stride: [1, 1],
            dilation: [1, 1],
            dtype,
            layouts: [Layout::Nhwc; 3],
            alpha: 1.0,
            beta: 0.0,
        };
        let pr = problem(&case);
        let mut rng = Rng(77);
        let mut x = Buf::of(dtype, &rng.values(pr.x.len()));
        let mut w = Buf::of(dtype, &rng.values(pr.w.len()));
        let mut y = Buf::of(dtype, &rng.values(pr.y.len()));
        let mut times = Vec::new();
        for dir in
            [ConvDirection::Forward, ConvDirection::BackwardData, ConvDirection::BackwardFilter]
        {
            let algo = conv_algorithms(&pr, dir, false)[0].algo;
            let ws_bytes = workspace_bytes(&pr, dir, algo).expect("offered");
            let mut ws = Buf::zeroed(ws_bytes);
            let call = DnnCall::Conv(ConvCall {
                dir,
                problem: pr,
                algo,
                x: x.ptr(),
                w: w.ptr(),
                y: y.ptr(),
                workspace: ws.ptr(),
                workspace_bytes: ws_bytes,
                alpha: 1.0,
                beta: 0.0,
            });
            let mut best = f64::INFINITY;
            for _ in 0..5 {
                let start = Instant::now();
                // SAFETY: the buffers cover the call's regions.
                unsafe { run_dnn(&call).expect("runs") };
                best = best.min(start.elapsed().as_secs_f64() * 1e3);
            }
            times.push(best);
        }
        println!(
            "{dtype:?} N=16 16x16x64 -> 64, 3x3 pad 1: forward {:.2} ms, backward data {:.2} ms, backward filter {:.2} ms, total {:.2} ms ({} threads)",
            times[0],
            times[1],
            times[2],
            times.iter().sum::<f64>(),
            rayon::current_num_threads()
        );
    }
}
