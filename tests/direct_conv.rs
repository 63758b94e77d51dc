//! The direct AVX-512 convolutions against the reference (im2col + GEMM, computed in f64), at
//! every convolution shape of the model, forward and both gradients. Skipped, with the reason,
//! on CPUs without AVX-512 (the backend then runs the reference itself).
#![cfg(target_arch = "x86_64")]

mod common;

use common::{Report, Tol};
use incept::backend::cpu::{self, direct, winograd, Cpu};
use incept::backend::{Affine, BatchNormOps, Conv2d, ConvOps, Nhwc, RunningStats};
use incept::model::ModelSpec;
use rand::{Rng, SeedableRng};

/// f32 sums of up to k·k·Cin = 2304 products against an f64 reference: a few ulps of the
/// largest value, as the rounding of either summation order.
const TOL: Tol = Tol::scaled(0.0, 2e-6, 4e-6, "f32 accumulation of up to 2304 products vs f64");

/// Winograd F(4×4, 3×3): the transforms scale terms by up to 8×8 and 1/24 before the sums, so
/// the rounding is a few times a direct sum's (measured 1e-5 – 3e-5 of the largest output).
const WINOGRAD_TOL: Tol =
    Tol::scaled(0.0, 1e-5, 3e-5, "Winograd F(4x4,3x3) in f32 vs f64: transforms amplify rounding");

fn skip_reason() -> Option<&'static str> {
    (!direct::available()).then_some(
        "skipped: this CPU has no AVX-512F; the backend uses the im2col + GEMM reference",
    )
}

fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

fn wide(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

struct Case {
    name: String,
    conv: Conv2d,
    xs: Nhwc,
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    dy: Vec<f32>,
}

/// Every convolution of the seed model at batch `n`, with random data.
fn cases(n: usize) -> Vec<Case> {
    ModelSpec::inception_net_small()
        .convolutions(n)
        .expect("the seed model's shapes fit")
        .into_iter()
        .enumerate()
        .map(|(i, (name, xs, conv))| {
            let seed = 100 * i as u64 + n as u64;
            Case {
                name,
                conv,
                xs,
                x: random(xs.len(), seed),
                w: random(conv.weight_len(), seed + 1),
                b: random(conv.cout, seed + 2),
                dy: random(conv.out_shape(xs).len(), seed + 3),
            }
        })
        .collect()
}

/// Batch 16, and batch 3 so that pixel tiles and weight-gradient pieces come out uneven.
#[test]
fn direct_matches_reference_at_model_shapes() {
    if let Some(why) = skip_reason() {
        eprintln!("{why}");
        return;
    }
    let mut report = Report::default();
    for n in [16, 3] {
        for c in cases(n) {
            let (conv, xs) = (c.conv, c.xs);
            let ys = conv.out_shape(xs);
            let tag = format!("{} n={n}", c.name);

            let mut y = vec![0.0f32; ys.len()];
            direct::conv_forward(&mut y, &c.x, &c.w, Some(&c.b), xs, &conv, false);
            let mut want = vec![0.0f64; ys.len()];
            cpu::conv2d_forward_reference(
                &mut want,
                &wide(&c.x),
                &wide(&c.w),
                &wide(&c.b),
                xs,
                &conv,
            );
            report.check(&format!("{tag} y"), &wide(&y), &want, TOL);

            // dw accumulates: start both from the same non-zero values.
            let start = random(conv.weight_len(), 7);
            let mut dw = start.clone();
            direct::conv_backward_weight(&mut dw, &c.dy, &c.x, xs, &conv);
            let mut want = wide(&start);
            cpu::conv2d_backward_weight_reference(&mut want, &wide(&c.dy), &wide(&c.x), xs, &conv);
            report.check(&format!("{tag} dw"), &wide(&dw), &want, TOL);
            if winograd::supports(&conv) {
                let mut dw = start.clone();
                winograd::conv_backward_weight(&mut dw, &c.dy, &c.x, xs, &conv);
                report.check(&format!("{tag} dw (winograd)"), &wide(&dw), &want, WINOGRAD_TOL);
            }

            let mut want = vec![0.0f64; xs.len()];
            cpu::conv2d_backward_data_reference(&mut want, &wide(&c.dy), &wide(&c.w), xs, &conv);
            // dx is overwritten: start from garbage.
            let mut dx = vec![f32::NAN; xs.len()];
            direct::conv_backward_data_scatter(&mut dx, &c.dy, &c.w, xs, &conv);
            report.check(&format!("{tag} dx (scatter)"), &wide(&dx), &want, TOL);
            if conv.stride == 1 && conv.cin % 16 == 0 {
                let mut dx = vec![f32::NAN; xs.len()];
                direct::conv_backward_data(&mut dx, &c.dy, &c.w, xs, &conv);
                report.check(&format!("{tag} dx (flipped)"), &wide(&dx), &want, TOL);
            }
            if winograd::supports(&winograd::backward_data_conv(&conv)) {
                let mut dx = vec![f32::NAN; xs.len()];
                winograd::conv_backward_data(&mut dx, &c.dy, &c.w, xs, &conv);
                report.check(&format!("{tag} dx (winograd)"), &wide(&dx), &want, WINOGRAD_TOL);
            }
            if winograd::supports(&conv) {
                let mut y = vec![f32::NAN; ys.len()];
                winograd::conv_forward(&mut y, &c.x, &c.w, Some(&c.b), xs, &conv, false);
                let mut want = vec![0.0f64; ys.len()];
                cpu::conv2d_forward_reference(
                    &mut want,
                    &wide(&c.x),
                    &wide(&c.w),
                    &wide(&c.b),
                    xs,
                    &conv,
                );
                report.check(&format!("{tag} y (winograd)"), &wide(&y), &want, WINOGRAD_TOL);
            }
        }
    }
    report.finish("direct convolutions vs reference");
}

/// Every sum runs in a fixed order: one thread or two give the same bits.
#[test]
fn direct_is_independent_of_thread_count() {
    if let Some(why) = skip_reason() {
        eprintln!("{why}");
        return;
    }
    let run = |threads: usize, c: &Case| {
        let pool =
            rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
        pool.install(|| {
            let ys = c.conv.out_shape(c.xs);
            let mut y = vec![0.0f32; ys.len()];
            direct::conv_forward(&mut y, &c.x, &c.w, Some(&c.b), c.xs, &c.conv, false);
            let mut dw = vec![0.0f32; c.conv.weight_len()];
            direct::conv_backward_weight(&mut dw, &c.dy, &c.x, c.xs, &c.conv);
            let mut dx = vec![0.0f32; c.xs.len()];
            direct::conv_backward_data_scatter(&mut dx, &c.dy, &c.w, c.xs, &c.conv);
            let mut yw = vec![0.0f32; ys.len()];
            let mut dww = vec![0.0f32; c.conv.weight_len()];
            if winograd::supports(&c.conv) {
                winograd::conv_forward(&mut yw, &c.x, &c.w, Some(&c.b), c.xs, &c.conv, false);
                winograd::conv_backward_weight(&mut dww, &c.dy, &c.x, c.xs, &c.conv);
            }
            [y, dw, dx, yw, dww].map(|v| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>())
        })
    };
    for c in cases(5) {
        assert!(run(1, &c) == run(2, &c), "{}: 1 vs 2 threads differ", c.name);
    }
}

/// The backend's f32 convolutions are the direct or Winograd kernels (bit for bit) where the
/// CPU has AVX-512, unless INCEPT_CPU_CONV=reference.
#[test]
fn backend_dispatches_to_direct() {
    if let Some(why) = skip_reason() {
        eprintln!("{why}");
        return;
    }
    if !cpu::direct_enabled() {
        eprintln!("skipped: INCEPT_CPU_CONV=reference is set");
        return;
    }
    for c in cases(4) {
        let ys = c.conv.out_shape(c.xs);
        let mut y = vec![0.0f32; ys.len()];
        if winograd::supports(&c.conv) {
            winograd::conv_forward(&mut y, &c.x, &c.w, Some(&c.b), c.xs, &c.conv, false);
        } else {
            direct::conv_forward(&mut y, &c.x, &c.w, Some(&c.b), c.xs, &c.conv, false);
        }
        let mut got = vec![0.0f32; ys.len()];
        ConvOps::<f32>::conv2d_forward(&Cpu, &mut got, &c.x, &c.w, &c.b, c.xs, &c.conv);
        assert!(got == y, "{}: backend forward is not the expected kernel", c.name);

        let mut dw = vec![0.0f32; c.conv.weight_len()];
        if winograd::supports(&c.conv) {
            winograd::conv_backward_weight(&mut dw, &c.dy, &c.x, c.xs, &c.conv);
        } else {
            direct::conv_backward_weight(&mut dw, &c.dy, &c.x, c.xs, &c.conv);
        }
        let (mut gdw, mut gdb) = (vec![0.0f32; dw.len()], vec![0.0f32; c.conv.cout]);
        let mut gdx = vec![0.0f32; c.xs.len()];
        ConvOps::<f32>::conv2d_backward(
            &Cpu,
            Some(&mut gdx),
            &mut gdw,
            &mut gdb,
            &c.dy,
            &c.x,
            &c.w,
            c.xs,
            &c.conv,
        );
        assert!(gdw == dw, "{}: backend dw is not the expected kernel", c.name);
        if winograd::supports(&winograd::backward_data_conv(&c.conv)) {
            let mut dx = vec![0.0f32; c.xs.len()];
            winograd::conv_backward_data(&mut dx, &c.dy, &c.w, c.xs, &c.conv);
            assert!(gdx == dx, "{}: backend dx is not the Winograd kernel", c.name);
        }
    }
}

/// Eval-mode Conv → BatchNorm → ReLU folded into one convolution matches the three ops run
/// one after another, at every model shape; a NaN input still reaches the output.
#[test]
fn fused_conv_batch_norm_relu_eval_matches_separate_ops() {
    use incept::backend::BatchNormCfg;
    if let Some(why) = skip_reason() {
        eprintln!("{why}");
        return;
    }
    if !cpu::direct_enabled() {
        eprintln!("skipped: INCEPT_CPU_CONV=reference is set");
        return;
    }
    let cfg = BatchNormCfg { eps: 1e-5, momentum: 0.1 };
    let mut report = Report::default();
    for c in cases(4) {
        let (conv, xs) = (c.conv, c.xs);
        let ys = conv.out_shape(xs);
        let gamma = random(conv.cout, 11);
        let beta = random(conv.cout, 12);
        let mean = random(conv.cout, 13);
        let var: Vec<f32> = random(conv.cout, 14).iter().map(|v| v * v + 0.1).collect();
        let mut t = vec![0.0f32; ys.len()];
        ConvOps::<f32>::conv2d_forward(&Cpu, &mut t, &c.x, &c.w, &c.b, xs, &conv);
        let mut want = vec![0.0f32; ys.len()];
        let affine = Affine { gamma: &gamma, beta: &beta };
        let running = RunningStats { mean: &mean, var: &var };
        BatchNormOps::<f32>::batch_norm_forward_eval(
            &Cpu, &mut want, &t, affine, running, ys, &cfg, true,
        );
        let mut got = vec![f32::NAN; ys.len()];
        let fused = ConvOps::<f32>::conv2d_batch_norm_relu_forward_eval(
            &Cpu,
            &mut got,
            &c.x,
            (&c.w, &c.b),
            affine,
            running,
            xs,
            &conv,
            &cfg,
        );
        assert!(fused, "{}: the CPU did not fuse", c.name);
        assert!(want.contains(&0.0), "{}: ReLU never clipped", c.name);
        report.check(
            &format!("{} conv+bn+relu", c.name),
            &wide(&got),
            &wide(&want),
            if winograd::supports(&conv) {
                WINOGRAD_TOL
            } else {
                Tol::scaled(0.0, 1e-5, 1e-5, "BatchNorm folded into the weights rounds differently")
            },
        );
    }
    report.finish("fused eval conv+bn+relu vs separate ops");

    // A NaN in the input poisons the pixels whose windows read it, as in PyTorch.
    let cases = cases(1);
    let c =
        cases.iter().find(|c| c.name == "block3.0.branch4_conv.0").expect("block3's branch4 conv");
    let mut x = c.x.clone();
    x[0] = f32::NAN;
    let ones = vec![1.0f32; c.conv.cout];
    let zeros = vec![0.0f32; c.conv.cout];
    let mut y = vec![0.0f32; c.conv.out_shape(c.xs).len()];
    ConvOps::<f32>::conv2d_batch_norm_relu_forward_eval(
        &Cpu,
        &mut y,
        &x,
        (&c.w, &c.b),
        Affine { gamma: &ones, beta: &zeros },
        RunningStats { mean: &zeros, var: &ones },
        c.xs,
        &c.conv,
        &cfg,
    );
    assert!(y[0].is_nan(), "NaN input gave {} at output 0", y[0]);
}
