//! The CUDA kernels of cuda/*.cu against the CPU reference backend and `make_batch`, at the
//! model's real layer shapes with a small batch. Each kernel is launched by name through the
//! emulated GPU's `Device::launch`, the CUDA backend's launch path, with the device's checker
//! on: bounds, reads of unwritten memory (the typed wrappers are in common/kernels.rs).
//!
//! Tolerances are `atol + rtol·|ref|` (plus `scale·max|ref|` where cancellation makes single
//! elements small), each with its reason. f16/bf16 kernels get inputs already rounded to the
//! 16-bit type, so the reference sees the very same values: what is left is the kernels' float
//! arithmetic and the final rounding to 16 bits.

mod common;

use common::kernels::{self as emu, Act, AugmentArgs, Cols, Launch, LossScale, SgdArgs};
use common::{Report, Tol};
use half::{bf16, f16};
use incept::backend::cpu::{add_ohwi_to_oihw, weight_oihw_to_ohwi, Cpu};
use incept::backend::ops::*;
use incept::backend::{
    geometry, Affine, BatchNormCfg, BatchStats, Conv2d, Nhwc, RunningStats, Sgd,
};
use incept::data::{make_batch, write_synthetic, Augment, Cifar10, Split, MEAN, STD, TRAIN_FILES};
use incept::model::{Layer, ModelSpec};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Batch of the emulated runs: the real H, W, C of every layer, 8 images.
const N: usize = 8;
/// SMs of an H100/H200, for the launch geometry the GPU backend would use.
const SMS: usize = 132;

/// The BatchNorm+ReLU layers of the network: (name, H, W, C).
const BN_LAYERS: [(&str, usize, usize, usize); 6] = [
    ("block1 14x14x64", 14, 14, 64),
    ("block2 7x7x128", 7, 7, 128),
    ("block3 branch 7x7x64", 7, 7, 64),
    ("block3 reduce 7x7x16", 7, 7, 16),
    ("block4 reduce 4x4x32", 4, 4, 32),
    ("block4 branch 4x4x96", 4, 4, 96),
];

/// The Inception joins: (name, H, W, channels of the four branches).
const JOINS: [(&str, usize, usize, [usize; 4]); 2] = [
    ("block3 join 7x7x256", 7, 7, [64, 64, 64, 64]),
    ("block4 join 4x4x384", 4, 4, [96, 96, 96, 96]),
];

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Roughly normal values (sum of uniforms), mean 0, deviation 1.
fn normal(r: &mut ChaCha8Rng) -> f32 {
    (0..4).map(|_| r.random::<f32>()).sum::<f32>() * 1.732 - 3.464
}

/// A conv output [p, c]: per-channel offset and spread, as BatchNorm sees them.
fn activations(seed: u64, p: usize, c: usize) -> Vec<f32> {
    let mut r = rng(seed);
    let off: Vec<f32> = (0..c).map(|_| normal(&mut r) * 0.5).collect();
    let spread: Vec<f32> = (0..c).map(|_| 0.2 + 2.0 * r.random::<f32>()).collect();
    (0..p * c).map(|i| off[i % c] + spread[i % c] * normal(&mut r)).collect()
}

fn uniform(seed: u64, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    let mut r = rng(seed);
    (0..n).map(|_| lo + (hi - lo) * r.random::<f32>()).collect()
}

/// `v` rounded to `T` (the kernel's input) and back (the reference's input).
fn quantize<T: Act>(v: &[f32]) -> (Vec<T>, Vec<f32>) {
    let t: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
    let back = t.iter().map(|x| x.to_f32()).collect();
    (t, back)
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn act_f64s<T: Act>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f32() as f64).collect()
}

/// Elementwise kernels: block 256, enough blocks for the grid-stride loop to run a few rounds
/// (the emulated threads are real threads, so grids are kept modest).
fn elementwise(n: usize) -> Launch {
    Launch::linear(n.div_ceil(256).clamp(1, 16) as u32, 256)
}

/// The grid-wide BN reductions, with the GPU backend's geometry on an H100/H200.
fn bn_launch(p: usize, c: usize) -> Launch {
    let r = geometry::batch_norm(p, c, SMS as u32);
    Launch::grid2(r.grid, r.block)
}

fn cpu() -> Cpu {
    Cpu
}

// ---- the emulation's 16-bit conversions ------------------------------------------------------

#[test]
fn emu_half_and_bfloat16_conversions_round_to_nearest_even() {
    let mut r = rng(1);
    // Every 16-bit pattern to float, and every float that is a 16-bit value or the midpoint
    // between neighbours (the ties) back, plus random floats over the whole range.
    let mut probes: Vec<f32> = Vec::new();
    for bits in 0..=u16::MAX {
        let h = f16::from_bits(bits);
        let b = bf16::from_bits(bits);
        let (ef, eb) =
            (kernel_emu::emu_f16_bits_to_f32(bits), kernel_emu::emu_bf16_bits_to_f32(bits));
        assert!(
            ef.to_bits() == h.to_f32().to_bits() || (ef.is_nan() && h.is_nan()),
            "__half2float({bits:#06x}) = {ef:e}, half says {:e}",
            h.to_f32()
        );
        assert!(
            eb.to_bits() == b.to_f32().to_bits() || (eb.is_nan() && b.is_nan()),
            "__bfloat162float({bits:#06x}) = {eb:e}, half says {:e}",
            b.to_f32()
        );
        probes.extend([h.to_f32(), b.to_f32()]);
        if bits < u16::MAX {
            let (hn, bn) = (f16::from_bits(bits + 1), bf16::from_bits(bits + 1));
            for (a, z) in [(h.to_f32(), hn.to_f32()), (b.to_f32(), bn.to_f32())] {
                if a.is_finite() && z.is_finite() {
                    let mid = ((a as f64 + z as f64) / 2.0) as f32;
                    probes.extend([
                        mid,
                        f32::from_bits(mid.to_bits() + 1),
                        f32::from_bits(mid.to_bits().max(1) - 1),
                    ]);
                }
            }
        }
    }
    probes.extend((0..200_000).map(|_| f32::from_bits(r.random::<u32>())));
    probes.extend([
        0.0,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        65504.0,
        65519.99,
        65520.0,
        1e-8,
        3e38,
    ]);
    for &v in &probes {
        let (eh, eb) = (kernel_emu::emu_f32_to_f16_bits(v), kernel_emu::emu_f32_to_bf16_bits(v));
        let (h, b) = (f16::from_f32(v), bf16::from_f32(v));
        if v.is_nan() {
            assert!(f16::from_bits(eh).is_nan() && bf16::from_bits(eb).is_nan(), "NaN {v:e}");
            continue;
        }
        assert_eq!(eh, h.to_bits(), "__float2half({v:e} = {:#010x})", v.to_bits());
        assert_eq!(eb, b.to_bits(), "__float2bfloat16({v:e} = {:#010x})", v.to_bits());
    }
}

// ---- concat ----------------------------------------------------------------------------------

fn concat_case<T: Act>(report: &mut Report, name: &str, p: usize, channels: &[usize], seed: u64) {
    let total: usize = channels.iter().sum();
    let parts32: Vec<Vec<f32>> = channels
        .iter()
        .enumerate()
        .map(|(i, &c)| uniform(seed + i as u64, p * c, -3.0, 3.0))
        .collect();
    let parts: Vec<(Vec<T>, Vec<f32>)> = parts32.iter().map(|v| quantize::<T>(v)).collect();
    // Reference: the CPU join of the (already rounded) parts.
    let mut want = vec![0f32; p * total];
    let refs: Vec<&Vec<f32>> = parts.iter().map(|(_, f)| f).collect();
    ConcatOps::<f32>::concat_forward(&cpu(), &mut want, &refs, channels);
    let mut y = vec![T::default(); p * total];
    let mut off = 0;
    for ((part, _), &c) in parts.iter().zip(channels) {
        emu::concat_forward(elementwise(p * c / 4), &mut y, total, off, part, p, c);
        off += c;
    }
    let exact = Tol::new(0.0, 0.0, "a copy is exact");
    report.check(&format!("{name} {} forward", T::NAME), &act_f64s(&y), &f64s(&want), exact);
    // Backward: split the joined gradient (here: the joined tensor itself) back into parts.
    let mut want_parts: Vec<Vec<f32>> = channels.iter().map(|&c| vec![0f32; p * c]).collect();
    {
        let mut dparts: Vec<&mut Vec<f32>> = want_parts.iter_mut().collect();
        ConcatOps::<f32>::concat_backward(&cpu(), &mut dparts, &want, channels);
    }
    let mut off = 0;
    for (i, &c) in channels.iter().enumerate() {
        let mut dx = vec![T::default(); p * c];
        let dy = Cols { data: &y[..], ld: total, off };
        emu::concat_backward(elementwise(p * c / 4), &mut dx, dy, p, c);
        report.check(
            &format!("{name} {} backward part {i}", T::NAME),
            &act_f64s(&dx),
            &f64s(&want_parts[i]),
            exact,
        );
        off += c;
    }
}

#[test]
fn concat_forward_backward_at_the_inception_joins() {
    let mut report = Report::default();
    for (k, (name, h, w, channels)) in JOINS.iter().enumerate() {
        let p = N * h * w;
        concat_case::<f32>(&mut report, name, p, channels, 10 + k as u64);
        concat_case::<f16>(&mut report, name, p, channels, 20 + k as u64);
        concat_case::<bf16>(&mut report, name, p, channels, 30 + k as u64);
    }
    // Channel counts and offsets that break 16-byte alignment take the element-wise path.
    concat_case::<f32>(&mut report, "unaligned [3,5,2]", 50, &[3, 5, 2], 40);
    concat_case::<f16>(&mut report, "unaligned [4,6,8]", 50, &[4, 6, 8], 41);
    report.finish("concat");
}

// ---- BatchNorm statistics ---------------------------------------------------------------------

/// Runs the stats kernel on `x` and the f64 CPU reference on the same values.
#[allow(clippy::too_many_arguments)]
fn stats_case<T: Act>(
    report: &mut Report, name: &str, x32: &[f32], p: usize, c: usize, launch: Launch,
    tol_scale: f64,
) {
    let cfg = BatchNormCfg::default();
    let (x, xr) = quantize::<T>(x32);
    let rm0 = uniform(7, c, -0.5, 0.5);
    let rv0 = uniform(8, c, 0.5, 2.0);
    // Reference in f64, on exactly the values the kernel reads.
    let xs = Nhwc::new(1, p, 1, c);
    let x64 = f64s(&xr);
    let (mut y64, mut mean64, mut inv64) = (vec![0f64; p * c], vec![0f64; c], vec![0f64; c]);
    let (mut rm64, mut rv64) = (f64s(&rm0), f64s(&rv0));
    let (g64, b64) = (vec![1f64; c], vec![0f64; c]);
    BatchNormOps::<f64>::batch_norm_forward_train(
        &cpu(),
        &mut y64,
        &x64,
        Affine { gamma: &g64, beta: &b64 },
        RunningStats { mean: &mut rm64, var: &mut rv64 },
        BatchStats { mean: &mut mean64, invstd: &mut inv64 },
        xs,
        &cfg,
        false,
        None,
    )
    .unwrap();
    let (mut mean, mut invstd, mut rm, mut rv) =
        (vec![0f32; c], vec![0f32; c], rm0.clone(), rv0.clone());
    emu::batch_norm_stats(
        launch,
        &mut mean,
        &mut invstd,
        Some((&mut rm, &mut rv)),
        &x,
        p,
        c,
        cfg.eps as f32,
        cfg.momentum as f32,
    );
    let t = T::NAME;
    // The f64 reference rounded once to f32 is within half an ulp; the kernel adds float
    // per-thread sums over ≤ ~32 values, then double.
    report.check(
        &format!("{name} {t} mean"),
        &f64s(&mean),
        &mean64,
        Tol::scaled(
            0.0,
            2e-7,
            2e-7 * tol_scale,
            "float partial sums, double merge; vs f64 (~2 ulp)",
        ),
    );
    report.check(
        &format!("{name} {t} invstd"),
        &f64s(&invstd),
        &inv64,
        Tol::new(
            0.0,
            4e-7 * tol_scale,
            "corrected two-pass variance from float partials, vs f64 (~3 ulp)",
        ),
    );
    report.check(
        &format!("{name} {t} running_mean"),
        &f64s(&rm),
        &rm64,
        Tol::scaled(0.0, 2e-7, 2e-7 * tol_scale, "0.9·rm + 0.1·mean in double, rounded once"),
    );
    report.check(
        &format!("{name} {t} running_var"),
        &f64s(&rv),
        &rv64,
        Tol::new(0.0, 4e-7 * tol_scale, "0.9·rv + 0.1·var·P/(P−1), var as for invstd"),
    );
}

#[test]
fn batch_norm_stats_and_running_stats_at_every_layer() {
    let mut report = Report::default();
    for (k, &(name, h, w, c)) in BN_LAYERS.iter().enumerate() {
        let p = N * h * w;
        let x = activations(100 + k as u64, p, c);
        stats_case::<f32>(&mut report, name, &x, p, c, bn_launch(p, c), 1.0);
        stats_case::<f16>(&mut report, name, &x, p, c, bn_launch(p, c), 1.0);
        stats_case::<bf16>(&mut report, name, &x, p, c, bn_launch(p, c), 1.0);
    }
    // The training batch of 128 at block1 (P = 25088): the geometry the GPU runs.
    let (p, c) = (128 * 14 * 14, 64);
    let x = activations(200, p, c);
    stats_case::<f32>(&mut report, "block1 batch 128", &x, p, c, bn_launch(p, c), 1.0);
    // A mean 1000x the spread: a one-pass Σx² − (Σx)² formula would lose every digit here.
    let (p, c) = (N * 7 * 7, 128);
    let x: Vec<f32> = activations(201, p, c).iter().map(|v| 300.0 + 0.3 * v).collect();
    stats_case::<f32>(&mut report, "offset 300, spread 0.3", &x, p, c, bn_launch(p, c), 4.0);
    // Degenerate geometries: one chunk, and more chunks than rows per chunk (empty chunks).
    let (p, c) = (N * 4 * 4, 96);
    let x = activations(202, p, c);
    stats_case::<f32>(
        &mut report,
        "G=1 block (32,1)",
        &x,
        p,
        c,
        Launch::grid2((3, 1), (32, 1)),
        1.0,
    );
    stats_case::<f32>(
        &mut report,
        "G=100 (empty chunks)",
        &x,
        p,
        c,
        Launch::grid2((3, 100), (32, 4)),
        1.0,
    );
    report.finish("batch_norm_stats");
}

#[test]
fn batch_norm_stats_are_deterministic() {
    let (p, c) = (N * 14 * 14, 64);
    let x = activations(300, p, c);
    let run = || {
        let (mut m, mut s) = (vec![0f32; c], vec![0f32; c]);
        emu::batch_norm_stats(bn_launch(p, c), &mut m, &mut s, None, &x, p, c, 1e-5, 0.1);
        (m, s)
    };
    let first = run();
    for _ in 0..3 {
        assert_eq!(run(), first, "batch_norm_stats differs between identical launches");
    }
}

// ---- BatchNorm + ReLU forward (train and eval) -------------------------------------------------

struct BnLayer {
    x: Vec<f32>,
    gamma: Vec<f32>,
    beta: Vec<f32>,
    rm: Vec<f32>,
    rv: Vec<f32>,
}

fn bn_layer(seed: u64, p: usize, c: usize) -> BnLayer {
    BnLayer {
        x: activations(seed, p, c),
        gamma: uniform(seed + 1, c, 0.5, 1.5),
        beta: uniform(seed + 2, c, -0.5, 0.5),
        rm: uniform(seed + 3, c, -0.5, 0.5),
        rv: uniform(seed + 4, c, 0.3, 3.0),
    }
}

/// CPU train forward + ReLU on `x`: (y, mean, invstd).
fn cpu_bn_relu_train(l: &BnLayer, x: &[f32], p: usize, c: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut y, mut mean, mut inv) = (vec![0f32; p * c], vec![0f32; c], vec![0f32; c]);
    let (mut rm, mut rv) = (l.rm.clone(), l.rv.clone());
    BatchNormOps::<f32>::batch_norm_forward_train(
        &cpu(),
        &mut y,
        &x.to_vec(),
        Affine { gamma: &l.gamma, beta: &l.beta },
        RunningStats { mean: &mut rm, var: &mut rv },
        BatchStats { mean: &mut mean, invstd: &mut inv },
        Nhwc::new(1, p, 1, c),
        &BatchNormCfg::default(),
        false,
        None,
    )
    .unwrap();
    let mut out = vec![0f32; p * c];
    ElementwiseOps::<f32>::relu_forward(&cpu(), &mut out, &y);
    (out, mean, inv)
}

/// Tolerance of a BN(+ReLU) output in `T`, with outputs of order 1–5.
fn y_tol<T: Act>() -> Tol {
    match T::NAME {
        "f32" => Tol::scaled(
            0.0,
            5e-7,
            3e-7,
            "f32: invstd·γ rounded in float, not from f64; FMA allowance",
        ),
        "f16" => {
            Tol::scaled(0.0, 1e-3, 1e-4, "f16: one rounding of the output (2^-11) plus a tie flip")
        }
        _ => {
            Tol::scaled(0.0, 8e-3, 1e-3, "bf16: one rounding of the output (2^-8) plus a tie flip")
        }
    }
}

fn apply_train_case<T: Act>(report: &mut Report, name: &str, p: usize, c: usize, seed: u64) {
    let l = bn_layer(seed, p, c);
    let (x, xr) = quantize::<T>(&l.x);
    let (want, _, _) = cpu_bn_relu_train(&l, &xr, p, c);
    // Kernel path: stats, then apply with the kernel's own statistics.
    let (mut mean, mut inv, mut rm, mut rv) =
        (vec![0f32; c], vec![0f32; c], l.rm.clone(), l.rv.clone());
    emu::batch_norm_stats(
        bn_launch(p, c),
        &mut mean,
        &mut inv,
        Some((&mut rm, &mut rv)),
        &x,
        p,
        c,
        1e-5,
        0.1,
    );
    let mut y = vec![T::default(); p * c];
    emu::batch_norm_relu_apply(
        elementwise(p * c),
        &mut y,
        c,
        0,
        &x,
        &mean,
        &inv,
        &l.gamma,
        &l.beta,
        p,
        c,
        true,
    );
    report.check(&format!("{name} {} train y", T::NAME), &act_f64s(&y), &f64s(&want), y_tol::<T>());
}

fn apply_eval_case<T: Act>(report: &mut Report, name: &str, p: usize, c: usize, seed: u64) {
    let l = bn_layer(seed, p, c);
    let (x, xr) = quantize::<T>(&l.x);
    let cfg = BatchNormCfg::default();
    let mut y = vec![0f32; p * c];
    BatchNormOps::<f32>::batch_norm_forward_eval(
        &cpu(),
        &mut y,
        &xr,
        Affine { gamma: &l.gamma, beta: &l.beta },
        RunningStats { mean: &l.rm, var: &l.rv },
        Nhwc::new(1, p, 1, c),
        &cfg,
        false,
    );
    let mut want = vec![0f32; p * c];
    ElementwiseOps::<f32>::relu_forward(&cpu(), &mut want, &y);
    let mut inv = vec![0f32; c];
    emu::batch_norm_eval_invstd(Launch::linear(1, 128), &mut inv, &l.rv, cfg.eps as f32);
    let inv_want: Vec<f64> = l.rv.iter().map(|&v| 1.0 / (v as f64 + cfg.eps).sqrt()).collect();
    report.check(
        &format!("{name} eval invstd"),
        &f64s(&inv),
        &inv_want,
        Tol::new(0.0, 1.2e-7, "double arithmetic rounded once to f32 (one ulp)"),
    );
    let mut out = vec![T::default(); p * c];
    emu::batch_norm_relu_apply(
        elementwise(p * c),
        &mut out,
        c,
        0,
        &x,
        &l.rm,
        &inv,
        &l.gamma,
        &l.beta,
        p,
        c,
        true,
    );
    report.check(
        &format!("{name} {} eval y", T::NAME),
        &act_f64s(&out),
        &f64s(&want),
        y_tol::<T>(),
    );
}

#[test]
fn batch_norm_relu_apply_train_and_eval_at_every_layer() {
    let mut report = Report::default();
    for (k, &(name, h, w, c)) in BN_LAYERS.iter().enumerate() {
        let p = N * h * w;
        let seed = 400 + 10 * k as u64;
        apply_train_case::<f32>(&mut report, name, p, c, seed);
        apply_train_case::<f16>(&mut report, name, p, c, seed);
        apply_train_case::<bf16>(&mut report, name, p, c, seed);
        apply_eval_case::<f32>(&mut report, name, p, c, seed);
        apply_eval_case::<f16>(&mut report, name, p, c, seed);
        apply_eval_case::<bf16>(&mut report, name, p, c, seed);
    }
    report.finish("batch_norm_relu_apply");
}

/// Each branch's BN+ReLU writes straight into its channel slice of the join: the result must
/// be the CPU's concat of the four branch outputs, and nothing outside the slices is touched.
fn apply_into_join_case<T: Act>(
    report: &mut Report, name: &str, p: usize, channels: &[usize; 4], seed: u64,
) {
    let total: usize = channels.iter().sum();
    let sentinel = T::from_f32(-7.0); // BN+ReLU never writes a negative value
    let mut joined = vec![sentinel; p * total + 5];
    let mut branch_outputs = Vec::new();
    let mut off = 0;
    for (i, &c) in channels.iter().enumerate() {
        let l = bn_layer(seed + 10 * i as u64, p, c);
        let (x, xr) = quantize::<T>(&l.x);
        let (want, mean, inv) = cpu_bn_relu_train(&l, &xr, p, c);
        emu::batch_norm_relu_apply(
            elementwise(p * c),
            &mut joined,
            total,
            off,
            &x,
            &mean,
            &inv,
            &l.gamma,
            &l.beta,
            p,
            c,
            true,
        );
        branch_outputs.push(want);
        off += c;
    }
    let mut want = vec![0f32; p * total];
    let refs: Vec<&Vec<f32>> = branch_outputs.iter().collect();
    ConcatOps::<f32>::concat_forward(&cpu(), &mut want, &refs, channels);
    report.check(
        &format!("{name} {} joined y", T::NAME),
        &act_f64s(&joined[..p * total]),
        &f64s(&want),
        y_tol::<T>(),
    );
    assert!(
        joined[p * total..].iter().all(|v| v.to_f32() == -7.0),
        "{name}: batch_norm_relu_apply wrote past the joined tensor"
    );
}

#[test]
fn batch_norm_relu_apply_writes_into_the_channel_slice_of_the_join() {
    let mut report = Report::default();
    for (k, (name, h, w, channels)) in JOINS.iter().enumerate() {
        let p = N * h * w;
        apply_into_join_case::<f32>(&mut report, name, p, channels, 500 + 100 * k as u64);
        apply_into_join_case::<f16>(&mut report, name, p, channels, 500 + 100 * k as u64);
    }
    report.finish("batch_norm_relu_apply into join");
}

// ---- BatchNorm + ReLU backward ----------------------------------------------------------------

/// `joined`: read y and dy as the channel slice `off` of wider [p, ld] tensors, as a branch of
/// an Inception block does.
fn backward_case<T: Act>(
    report: &mut Report, name: &str, p: usize, c: usize, joined: Option<(usize, usize)>, seed: u64,
) {
    let l = bn_layer(seed, p, c);
    let (x, xr) = quantize::<T>(&l.x);
    let (y_f32, mean, inv) = cpu_bn_relu_train(&l, &xr, p, c);
    let (y, yr) = quantize::<T>(&y_f32);
    let (dy, dyr) = quantize::<T>(&uniform(seed + 9, p * c, -1.0, 1.0));
    // Reference: relu_backward (mask with the output the kernel sees), then BN backward.
    let mut masked = dyr.clone();
    ElementwiseOps::<f32>::relu_backward(&cpu(), &mut masked, &yr);
    let dgamma0 = uniform(seed + 11, c, -0.1, 0.1);
    let dbeta0 = uniform(seed + 12, c, -0.1, 0.1);
    let (mut dx_want, mut dg_want, mut db_want) =
        (vec![0f32; p * c], dgamma0.clone(), dbeta0.clone());
    BatchNormOps::<f32>::batch_norm_backward(
        &cpu(),
        &mut dx_want,
        Affine { gamma: &mut dg_want, beta: &mut db_want },
        &masked,
        None,
        &xr,
        &l.gamma,
        BatchStats { mean: &mean, invstd: &inv },
        Nhwc::new(1, p, 1, c),
        None,
    );
    // Kernel inputs: y and dy, inside wider tensors when `joined`.
    let (ld, off) = joined.unwrap_or((c, 0));
    let embed = |v: &[T], fill: f32| {
        let mut wide = vec![T::from_f32(fill); p * ld];
        for r in 0..p {
            wide[r * ld + off..r * ld + off + c].copy_from_slice(&v[r * c..(r + 1) * c]);
        }
        wide
    };
    let (y_wide, dy_wide) = (embed(&y, 1.0), embed(&dy, 1e6));
    let (y_cols, dy_cols) =
        (Cols { data: &y_wide[..], ld, off }, Cols { data: &dy_wide[..], ld, off });
    let (mut coef, mut dg, mut db) = (vec![0f32; 3 * c], dgamma0.clone(), dbeta0.clone());
    emu::batch_norm_relu_backward_reduce(
        bn_launch(p, c),
        &mut coef,
        Some(&mut dg),
        Some(&mut db),
        dy_cols,
        y_cols,
        &x,
        &mean,
        &inv,
        &l.gamma,
        p,
        c,
        true,
    );
    let mut dx = vec![T::default(); p * c];
    emu::batch_norm_relu_backward_apply(
        elementwise(p * c),
        &mut dx,
        dy_cols,
        y_cols,
        &x,
        &mean,
        &coef,
        p,
        c,
        true,
    );
    let t = T::NAME;
    let layout = if joined.is_some() { " (slice of join)" } else { "" };
    // Σ over P ≤ 1568 values: float per-thread partials (≤ ~13 values), double after, vs the
    // CPU's f64 sums rounded to f32; Σdy'·x̂ cancels, so the bound is relative to its largest
    // channel.
    let sum_tol = Tol::scaled(
        1e-7,
        2e-6,
        2e-7,
        "float partials of ≤ P/(G·BY) values, then double; cancelling sums",
    );
    report.check(&format!("{name} {t}{layout} dbeta"), &f64s(&db), &f64s(&db_want), sum_tol);
    report.check(&format!("{name} {t}{layout} dgamma"), &f64s(&dg), &f64s(&dg_want), sum_tol);
    let dx_tol = match t {
        "f32" => Tol::scaled(
            0.0,
            1e-6,
            5e-7,
            "f32: a·dy + b·(x−μ) + c0 with coefficients from float sums; cancels",
        ),
        "f16" => {
            Tol::scaled(0.0, 1e-3, 5e-4, "f16: one rounding of dx (2^-11) on top of the f32 error")
        }
        _ => {
            Tol::scaled(0.0, 8e-3, 4e-3, "bf16: one rounding of dx (2^-8) on top of the f32 error")
        }
    };
    report.check(&format!("{name} {t}{layout} dx"), &act_f64s(&dx), &f64s(&dx_want), dx_tol);
}

#[test]
fn batch_norm_relu_backward_matches_relu_backward_then_batch_norm_backward() {
    let mut report = Report::default();
    for (k, &(name, h, w, c)) in BN_LAYERS.iter().enumerate() {
        let p = N * h * w;
        let seed = 700 + 20 * k as u64;
        backward_case::<f32>(&mut report, name, p, c, None, seed);
        backward_case::<f16>(&mut report, name, p, c, None, seed);
        backward_case::<bf16>(&mut report, name, p, c, None, seed);
    }
    // A branch of each Inception block: y and dy are its slice of the joined tensors.
    backward_case::<f32>(&mut report, "block3 branch3", N * 49, 64, Some((256, 128)), 900);
    backward_case::<f16>(&mut report, "block3 branch3", N * 49, 64, Some((256, 128)), 901);
    backward_case::<f32>(&mut report, "block4 branch4", N * 16, 96, Some((384, 288)), 902);
    backward_case::<bf16>(&mut report, "block4 branch4", N * 16, 96, Some((384, 288)), 903);
    report.finish("batch_norm_relu_backward");
}

// ---- cross-entropy ------------------------------------------------------------------------------

fn cross_entropy_case(
    report: &mut Report, n: usize, k: usize, smoothing: f64, scale: Option<f32>, seed: u64,
) {
    let mut r = rng(seed);
    let mut logits: Vec<f32> = (0..n * k).map(|_| 3.0 * normal(&mut r)).collect();
    let labels: Vec<u32> = (0..n).map(|_| r.random_range(0..k as u32)).collect();
    // Rows whose maximum is tied between the label and a lower or a higher class, so the
    // first-maximum rule of argmax is exercised both ways.
    for row in 0..n.min(6) {
        let label = labels[row] as usize;
        let other = if row % 2 == 0 { (label + 1) % k } else { (label + k - 1) % k };
        logits[row * k + label] = 20.0;
        logits[row * k + other] = 20.0;
    }
    let name = format!("N={n} K={k} smoothing={smoothing} scale={scale:?}");
    let mut probs = vec![0f32; n * k];
    let loss_want =
        LossOps::<f32>::cross_entropy_forward(&cpu(), &mut probs, &logits, &labels, k, smoothing);
    let mut d_want = vec![0f32; n * k];
    LossOps::<f32>::cross_entropy_backward(&cpu(), &mut d_want, &probs, &labels, k, smoothing);
    let s = scale.unwrap_or(1.0) as f64;
    let d_want: Vec<f64> = d_want.iter().map(|&v| v as f64 * s).collect();
    let correct_want = (0..n)
        .filter(|&i| {
            let row = &logits[i * k..(i + 1) * k];
            let best = (0..k).fold(0, |b, j| if row[j] > row[b] { j } else { b });
            best == labels[i] as usize
        })
        .count();

    let labels_i32: Vec<i32> = labels.iter().map(|&v| v as i32).collect();
    let block = (32 * n).div_ceil(32).min(32) as u32 * 32;
    let mut dlogits = vec![0f32; n * k];
    let out = emu::cross_entropy_forward_backward(
        Launch::linear(1, block),
        &mut dlogits,
        &logits,
        &labels_i32,
        k,
        smoothing as f32,
        scale,
    );
    report.check(
        &format!("{name} loss"),
        &[out.loss as f64],
        &[loss_want],
        Tol::new(0.0, 5e-7, "float expf sums (GPU expf: 2 ulp), double per-row loss, vs f64"),
    );
    report.check(
        &format!("{name} dlogits"),
        &f64s(&dlogits),
        &d_want,
        Tol::scaled(
            0.0,
            4e-6,
            4e-7,
            "float expf and 1/Σ vs f64 softmax rounded to f32; ×scale exact",
        ),
    );
    report.check(
        &format!("{name} correct"),
        &[out.correct as f64],
        &[correct_want as f64],
        Tol::new(0.0, 0.0, "an exact count"),
    );
}

#[test]
fn cross_entropy_loss_gradient_and_correct_count() {
    let mut report = Report::default();
    for (i, smoothing) in [0.0, 0.1].into_iter().enumerate() {
        for (j, scale) in [None, Some(1024.0), Some(65536.0)].into_iter().enumerate() {
            cross_entropy_case(
                &mut report,
                128,
                10,
                smoothing,
                scale,
                1000 + 10 * i as u64 + j as u64,
            );
        }
    }
    // More classes than lanes (each lane loops), rows not a multiple of the warps.
    cross_entropy_case(&mut report, 37, 100, 0.1, Some(8.0), 1100);
    cross_entropy_case(&mut report, 3, 10, 0.0, None, 1101);
    report.finish("cross_entropy");
}

/// The epoch's running loss and accuracy on the device, as the training loop keeps them on the
/// host: Σ loss·n and Σ correct over the steps, from what the loss kernel wrote each step.
#[test]
fn accumulate_step_metrics_sums_the_epoch_like_the_host() {
    let (n, k) = (64, 10);
    let mut sums = [0f64; 2];
    let (mut loss_sum, mut correct_sum) = (0f64, 0u64);
    for step in 0..5u64 {
        let mut r = rng(1200 + step);
        let logits: Vec<f32> = (0..n * k).map(|_| 3.0 * normal(&mut r)).collect();
        let labels: Vec<i32> = (0..n).map(|_| r.random_range(0..k as i32)).collect();
        let mut dlogits = vec![0f32; n * k];
        let out = emu::cross_entropy_forward_backward(
            Launch::linear(1, 1024),
            &mut dlogits,
            &logits,
            &labels,
            k,
            0.0,
            None,
        );
        emu::accumulate_step_metrics(Launch::linear(1, 1), &mut sums, out, n);
        // What train_loop adds per step from the loss it reads back.
        loss_sum += out.loss as f64 * n as f64;
        correct_sum += out.correct as u64;
    }
    assert_eq!(sums[0].to_bits(), loss_sum.to_bits(), "loss sum {} vs host {loss_sum}", sums[0]);
    assert_eq!(sums[1], correct_sum as f64, "correct count");
    assert!(correct_sum > 0 && sums[0] > 0.0, "a real run: {sums:?}");
    // Only thread (0, 0) adds: a wider launch must not add more than once.
    let before = sums;
    let out = emu::LossOut { loss: 1.5, correct: 3 };
    emu::accumulate_step_metrics(Launch::linear(2, 64), &mut sums, out, 4);
    assert_eq!(sums, [before[0] + 6.0, before[1] + 3.0], "one addition per launch");
}

// ---- mixed precision: unscale, SGD, loss scale -------------------------------------------------

fn unscale_case<T: Act>(bad: Option<f32>) -> (Vec<f32>, i32, Vec<f32>) {
    let n = 10_000;
    let scale = 1024.0f32;
    let mut g32 = uniform(1200, n, -2000.0, 2000.0);
    if let Some(v) = bad {
        g32[4321] = v;
    }
    let (g, gr) = quantize::<T>(&g32);
    let mut master = vec![0f32; n];
    let mut flag = 0;
    emu::amp_unscale(elementwise(n), &mut master, &g, scale, &mut flag);
    (master, flag, gr.iter().map(|v| v * (1.0 / scale)).collect())
}

#[test]
fn amp_unscale_divides_by_the_scale_and_flags_inf_and_nan() {
    fn clean<T: Act>() {
        let (master, flag, want) = unscale_case::<T>(None);
        assert_eq!(flag, 0, "{}: overflow flagged on finite gradients", T::NAME);
        // ×2^-10 of a 16-bit value is exact in f32: bitwise.
        for (i, (m, w)) in master.iter().zip(&want).enumerate() {
            assert_eq!(m.to_bits(), w.to_bits(), "{}: master[{i}] = {m:e}, want {w:e}", T::NAME);
        }
    }
    fn flagged<T: Act>(v: f32) {
        let (_, flag, _) = unscale_case::<T>(Some(v));
        assert_eq!(flag, 1, "{}: a gradient {v} was not flagged", T::NAME);
    }
    // The gradients are fp32 (the 16-bit weight gradients are added into them first), so
    // only the fp32 instantiation exists.
    clean::<f32>();
    for v in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        flagged::<f32>(v);
    }
    // The flag is only ever set: a clean pass leaves a raised flag raised.
    let mut flag = 1;
    let mut master = vec![0f32; 4];
    emu::amp_unscale(Launch::linear(1, 32), &mut master, &[1.0f32; 4], 2.0, &mut flag);
    assert_eq!(flag, 1, "amp_unscale cleared the flag");
    // f32 in place.
    let mut g = vec![2.0f32, -4.0, 8.0, f32::NAN];
    let mut flag = 0;
    emu::amp_unscale_in_place(Launch::linear(1, 32), &mut g, 4.0, &mut flag);
    assert_eq!((g[0], g[1], g[2], flag), (0.5, -1.0, 2.0, 1));
}

/// The parameters of the model as one flat buffer (its real size), with gradients.
fn flat_params(seed: u64) -> (Vec<f32>, Vec<f32>) {
    let n = 575_050; // about the model's parameter count
    (uniform(seed, n, -0.3, 0.3), uniform(seed + 1, n, -0.05, 0.05))
}

fn sgd_case(report: &mut Report, opt: Sgd, steps: usize, seed: u64) {
    let (mut p_ref, _) = flat_params(seed);
    let mut p = p_ref.clone();
    let mut buf_ref = vec![0f32; p.len()];
    let mut buf = vec![0f32; p.len()];
    for step in 0..steps {
        let (_, grad) = flat_params(seed + 10 + step as u64);
        let first = step == 0;
        OptimOps::<f32>::sgd_step(&cpu(), &mut p_ref, &grad, &mut buf_ref, first, &opt);
        let args = SgdArgs {
            lr: opt.lr as f32,
            momentum: opt.momentum as f32,
            weight_decay: opt.weight_decay as f32,
            nesterov: opt.nesterov,
            first_step: first,
            found_inf: Some(0),
        };
        emu::sgd_step(Launch::linear(64, 256), &mut p, &grad, &mut buf, &args);
    }
    let name = format!(
        "lr {} momentum {} wd {} nesterov {} x{steps}",
        opt.lr, opt.momentum, opt.weight_decay, opt.nesterov
    );
    // Same f32 operations in the same order (the emulation does not contract to FMA): the
    // tolerance only allows for an FMA-contracting compiler.
    let tol = Tol::new(1e-8, 1e-6, "f32 elementwise, same operation order; FMA allowance");
    report.check(&format!("{name} param"), &f64s(&p), &f64s(&p_ref), tol);
    if opt.momentum != 0.0 {
        report.check(&format!("{name} momentum"), &f64s(&buf), &f64s(&buf_ref), tol);
    }
}

#[test]
fn sgd_step_matches_the_cpu_over_a_flat_buffer() {
    let mut report = Report::default();
    let base = Sgd { lr: 0.1, momentum: 0.9, weight_decay: 5e-4, nesterov: false };
    sgd_case(&mut report, base, 3, 1300);
    sgd_case(&mut report, Sgd { nesterov: true, ..base }, 3, 1310);
    sgd_case(&mut report, Sgd { momentum: 0.0, ..base }, 2, 1320);
    sgd_case(&mut report, Sgd { weight_decay: 0.0, lr: 0.05, ..base }, 1, 1330);
    report.finish("sgd_step");
}

#[test]
fn sgd_step_is_skipped_on_overflow() {
    let (p0, grad) = flat_params(1400);
    let buf0 = uniform(1402, p0.len(), -0.01, 0.01);
    let args = SgdArgs {
        lr: 0.1,
        momentum: 0.9,
        weight_decay: 5e-4,
        nesterov: true,
        first_step: false,
        found_inf: Some(1),
    };
    let (mut p, mut buf) = (p0.clone(), buf0.clone());
    emu::sgd_step(Launch::linear(64, 256), &mut p, &grad, &mut buf, &args);
    assert!(
        p.iter().zip(&p0).all(|(a, b)| a.to_bits() == b.to_bits()),
        "params changed on an overflowed step"
    );
    assert!(
        buf.iter().zip(&buf0).all(|(a, b)| a.to_bits() == b.to_bits()),
        "momentum changed on an overflowed step"
    );
}

#[test]
fn update_loss_scale_halves_on_overflow_and_doubles_after_clean_steps() {
    let mut s = LossScale { scale: 65536.0, growth_tracker: 0, found_inf: 0, skipped_steps: 0 };
    let interval = 5;
    // Overflow: halve, restart the count, count the skipped step, clear the flag.
    s.growth_tracker = 3;
    s.found_inf = 1;
    emu::update_loss_scale(&mut s, 2.0, 0.5, interval);
    assert_eq!(s, LossScale { scale: 32768.0, growth_tracker: 0, found_inf: 0, skipped_steps: 1 });
    // interval − 1 clean steps: counted, scale kept.
    for k in 1..interval {
        emu::update_loss_scale(&mut s, 2.0, 0.5, interval);
        assert_eq!((s.scale, s.growth_tracker), (32768.0, k));
    }
    // The interval-th clean step doubles and restarts the count.
    emu::update_loss_scale(&mut s, 2.0, 0.5, interval);
    assert_eq!(s, LossScale { scale: 65536.0, growth_tracker: 0, found_inf: 0, skipped_steps: 1 });
    // Two overflows in a row.
    for expect in [32768.0, 16384.0] {
        s.found_inf = 1;
        emu::update_loss_scale(&mut s, 2.0, 0.5, interval);
        assert_eq!((s.scale, s.growth_tracker, s.found_inf), (expect, 0, 0));
    }
    assert_eq!(s.skipped_steps, 3);
    // Growth that would overflow f32 is not applied (torch keeps the scale).
    let mut big = LossScale { scale: f32::MAX, growth_tracker: 0, found_inf: 0, skipped_steps: 0 };
    emu::update_loss_scale(&mut big, 2.0, 0.5, 1);
    assert_eq!((big.scale, big.growth_tracker), (f32::MAX, 0));
}

// ---- the data kernel --------------------------------------------------------------------------

struct Records {
    _tmp: tempfile::TempDir,
    ds: Cifar10,
    bytes: Vec<u8>,
}

fn records(n: usize) -> Records {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cifar");
    write_synthetic(&dir, n, 1, 11).unwrap();
    let ds = Cifar10::open(&dir, Split::Train).unwrap();
    // The records in the order Cifar10 numbers them: the training files in order.
    let mut bytes = Vec::new();
    for f in TRAIN_FILES {
        bytes.extend(std::fs::read(dir.join(f)).unwrap());
    }
    assert_eq!(bytes.len(), ds.len() * emu::RECORD);
    Records { _tmp: tmp, ds, bytes }
}

/// 1024 threads per block, 3 blocks per image (fewer, larger blocks emulate faster).
const AUG_LAUNCH_BLOCK: u32 = 1024;

fn augment<T: Act>(rec: &Records, indices: &[i32], dy: &[i32], dx: &[i32], flip: &[i32]) -> Vec<T> {
    let b = indices.len();
    let mut out = vec![T::default(); b * 3072];
    let a = AugmentArgs { indices, dy, dx, flip, mean: MEAN, std: STD };
    emu::augment_batch(
        Launch::grid2((3072 / AUG_LAUNCH_BLOCK, b as u32), (AUG_LAUNCH_BLOCK, 1)),
        &mut out,
        &rec.bytes,
        &a,
    );
    out
}

fn same_bits(a: &[f32], b: &[f32]) -> bool {
    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()) && a.len() == b.len()
}

#[test]
fn augment_without_crop_or_flip_is_make_batch_bitwise() {
    let rec = records(40);
    let idx: Vec<usize> = (0..40).rev().step_by(3).collect();
    let (mut want, mut want_y) = (Vec::new(), Vec::new());
    make_batch(&rec.ds, &idx, Augment::NONE, 5, 0, 0, &mut want, &mut want_y);
    let b = idx.len();
    let idx_i32: Vec<i32> = idx.iter().map(|&i| i as i32).collect();
    let zeros = vec![0; b];
    let got = augment::<f32>(&rec, &idx_i32, &zeros, &zeros, &zeros);
    assert!(same_bits(&got, &want), "augment_batch_f32 differs from make_batch (no augmentation)");
    // f16/bf16: make_batch's floats rounded to nearest even.
    let h = augment::<f16>(&rec, &idx_i32, &zeros, &zeros, &zeros);
    assert!(h.iter().zip(&want).all(|(g, w)| g.to_bits() == f16::from_f32(*w).to_bits()), "f16");
    let bf = augment::<bf16>(&rec, &idx_i32, &zeros, &zeros, &zeros);
    assert!(bf.iter().zip(&want).all(|(g, w)| g.to_bits() == bf16::from_f32(*w).to_bits()), "bf16");
}

/// make_batch draws each image's (dy, dx, flip) privately. Here every image of a training
/// batch is the same record, so one launch renders that record under all 162 (dy, dx, flip)
/// the kernel can be given; each of make_batch's images must equal exactly one of them, bit for
/// bit, and over the batch those cover the extreme offsets ±4 and both flips.
#[test]
fn augment_with_crop_and_flip_reproduces_make_batch_bitwise() {
    let rec = records(20);
    let batch = 128;
    let record = 13;
    let (mut want, mut want_y) = (Vec::new(), Vec::new());
    make_batch(&rec.ds, &vec![record; batch], Augment::TRAIN, 3, 2, 640, &mut want, &mut want_y);
    let combos: Vec<(i32, i32, i32)> =
        (-4..=4).flat_map(|dy| (-4..=4).flat_map(move |dx| [(dy, dx, 0), (dy, dx, 1)])).collect();
    let n = combos.len();
    let indices = vec![record as i32; n];
    let dy: Vec<i32> = combos.iter().map(|c| c.0).collect();
    let dx: Vec<i32> = combos.iter().map(|c| c.1).collect();
    let flip: Vec<i32> = combos.iter().map(|c| c.2).collect();
    let out = augment::<f32>(&rec, &indices, &dy, &dx, &flip);
    let (mut seen_dy, mut seen_dx, mut seen_flip) = (Vec::new(), Vec::new(), Vec::new());
    for j in 0..batch {
        let image = &want[j * 3072..(j + 1) * 3072];
        let matches: Vec<(i32, i32, i32)> = (0..n)
            .filter(|&k| same_bits(&out[k * 3072..(k + 1) * 3072], image))
            .map(|k| combos[k])
            .collect();
        assert_eq!(
            matches.len(),
            1,
            "image {j}: {} of the 162 crops/flips reproduce make_batch: {matches:?}",
            matches.len()
        );
        let (dy, dx, flip) = matches[0];
        seen_dy.push(dy);
        seen_dx.push(dx);
        seen_flip.push(flip);
    }
    for extreme in [-4, 4] {
        assert!(
            seen_dy.contains(&extreme),
            "no image of the batch had dy = {extreme}: {seen_dy:?}"
        );
        assert!(
            seen_dx.contains(&extreme),
            "no image of the batch had dx = {extreme}: {seen_dx:?}"
        );
    }
    assert!(seen_flip.contains(&0) && seen_flip.contains(&1), "flips: {seen_flip:?}");
}

/// What training on a GPU does each step: the host draws every image's crop and flip with
/// `augment_view` (the draws make_batch uses), the kernel renders the batch. Over several
/// batches of an epoch, in f32 the result is make_batch's batch bit for bit, and in f16 its
/// values rounded to nearest even.
#[test]
fn augment_with_host_drawn_views_is_make_batch_bitwise() {
    let rec = records(60);
    let (seed, epoch) = (11, 3);
    let order = incept::data::epoch_order(60, seed, epoch);
    for (k, idx) in order.chunks(16).enumerate() {
        let first = (k * 16) as u64;
        let (mut want, mut want_y) = (Vec::new(), Vec::new());
        make_batch(&rec.ds, idx, Augment::TRAIN, seed, epoch, first, &mut want, &mut want_y);
        let views: Vec<(i32, i32, bool)> = (0..idx.len() as u64)
            .map(|j| incept::data::augment_view(Augment::TRAIN, seed, epoch, first + j))
            .collect();
        let idx_i32: Vec<i32> = idx.iter().map(|&i| i as i32).collect();
        let dy: Vec<i32> = views.iter().map(|v| v.0).collect();
        let dx: Vec<i32> = views.iter().map(|v| v.1).collect();
        let flip: Vec<i32> = views.iter().map(|v| v.2 as i32).collect();
        let got = augment::<f32>(&rec, &idx_i32, &dy, &dx, &flip);
        if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
            panic!(
                "batch {k}: value {i} (image {}): kernel {} make_batch {}; first values {:?} vs {:?}",
                i / 3072,
                got[i],
                want[i],
                &got[..4],
                &want[..4]
            );
        }
        let h = augment::<f16>(&rec, &idx_i32, &dy, &dx, &flip);
        assert!(
            h.iter().zip(&want).all(|(g, w)| g.to_bits() == f16::from_f32(*w).to_bits()),
            "batch {k}: f16 values are not make_batch's rounded to nearest even"
        );
    }
    // The draws really vary (a constant view would also pass above only by luck).
    let views: Vec<_> =
        (0..64).map(|p| incept::data::augment_view(Augment::TRAIN, seed, epoch, p)).collect();
    assert!(views.iter().any(|v| v.2) && views.iter().any(|v| !v.2));
    assert!(views.iter().any(|v| v.0 != 0) && views.iter().any(|v| v.1 != 0));
}

#[test]
fn augment_rejects_a_bad_index_visibly() {
    let rec = records(5);
    let out = augment::<f32>(&rec, &[1, 7], &[0, 0], &[0, 0], &[0, 0]);
    assert!(out[..3072].iter().all(|v| v.is_finite()));
    assert!(out[3072..].iter().all(|v| v.is_nan()), "record 7 of 5 must give NaN");
}

// ---- elementwise.cu -----------------------------------------------------------------------------

/// The launch of the GPU backend's element-wise kernels: block 256, grid min(ceil(n/256), 4096),
/// so the largest tensors also take the grid-stride loop.
fn gpu_elementwise(n: usize) -> Launch {
    Launch::linear(n.div_ceil(256).clamp(1, 4096) as u32, 256)
}

/// The elements of the largest activation of the model at batch 128: [128, 16, 16, 64].
const BIG: usize = 128 * 16 * 16 * 64;

/// Bitwise comparison of values widened to f32 (exact and injective for every type except NaN
/// payloads): NaN matches NaN, −0 does not match +0. On failure records the number of
/// mismatches, the first one, the worst finite difference and the first values.
fn check_bits(report: &mut Report, name: &str, got: &[f32], want: &[f32], why: &str) {
    report.checked += 1;
    let same = |g: f32, w: f32| g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan());
    if got.len() != want.len() {
        report.failures.push(format!("{name}: {} values, expected {}", got.len(), want.len()));
        return;
    }
    let bad: Vec<usize> = (0..got.len()).filter(|&i| !same(got[i], want[i])).collect();
    if bad.is_empty() {
        report.lines.push(format!("{name}: bitwise equal"));
        return;
    }
    let worst = bad
        .iter()
        .copied()
        .max_by(|&a, &b| {
            let d = |i: usize| {
                let d = (got[i] as f64 - want[i] as f64).abs();
                if d.is_nan() {
                    f64::INFINITY
                } else {
                    d
                }
            };
            d(a).total_cmp(&d(b))
        })
        .unwrap();
    let first = bad[0];
    let n = got.len().min(6);
    report.failures.push(format!(
        "{name}: {} of {} values differ from the bitwise reference ({why})\n  first at [{first}]: got {:e} ({:#010x}), want {:e} ({:#010x})\n  worst at [{worst}]: got {:.8e}, want {:.8e}, |diff| {:.3e}\n  first got:  {:?}\n  first want: {:?}",
        bad.len(),
        got.len(),
        got[first],
        got[first].to_bits(),
        want[first],
        want[first].to_bits(),
        got[worst],
        want[worst],
        (got[worst] as f64 - want[worst] as f64).abs(),
        &got[..n],
        &want[..n]
    ));
}

fn widen<T: Act>(v: &[T]) -> Vec<f32> {
    v.iter().map(|x| x.to_f32()).collect()
}

/// `v` rounded to `T` and back: what a kernel that rounds once to `T` must store.
fn round_to<T: Act>(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| T::from_f32(x).to_f32()).collect()
}

/// Values around zero with the special cases of ReLU at the front: ±0, NaN, ±inf and values
/// that are subnormal in `T` (for f32: in f32).
fn relu_input<T: Act>(seed: u64, n: usize) -> Vec<f32> {
    let mut v = uniform(seed, n, -1.0, 1.0);
    let tiny = if T::NAME == "f32" { 1e-40 } else { 1e-6 };
    let special = [0.0, -0.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY, tiny, -tiny];
    v[..special.len()].copy_from_slice(&special);
    // Some further ones spread over the tensor, in other blocks of the grid.
    for (k, &s) in special.iter().enumerate() {
        v[(n / 2 + 997 * k) % n] = s;
    }
    v
}

fn relu_case<T: Act>(report: &mut Report, name: &str, n: usize, l: Launch, seed: u64) {
    let (x, xr) = quantize::<T>(&relu_input::<T>(seed, n));
    let t = T::NAME;
    let mut y = vec![T::from_f32(7.0); n];
    emu::relu_forward(l, &mut y, &x);
    let mut want = vec![0f32; n];
    ElementwiseOps::<f32>::relu_forward(&cpu(), &mut want, &xr);
    // max(x, 0) of a T value is that value or 0: no rounding anywhere.
    check_bits(
        report,
        &format!("{name} {t} relu_forward"),
        &widen(&y),
        &want,
        "max(x, 0) of a T value is exact; NaN and -0 pass",
    );
    // The gradient against the kernel's own output, which holds every special case.
    let yr = widen(&y);
    let (dy, dyr) = quantize::<T>(&uniform(seed + 1, n, -1.0, 1.0));
    let mut got = dy.clone();
    emu::relu_backward(l, &mut got, &y);
    let mut want = dyr.clone();
    ElementwiseOps::<f32>::relu_backward(&cpu(), &mut want, &yr);
    check_bits(
        report,
        &format!("{name} {t} relu_backward"),
        &widen(&got),
        &want,
        "a mask: dy or 0, no arithmetic",
    );
}

#[test]
fn relu_forward_and_backward_match_the_cpu_bitwise() {
    let mut report = Report::default();
    // The largest activation at batch 128 (the grid-stride loop runs twice), and the block3
    // Inception input of the emulated batch.
    for (name, n) in [("[128,16,16,64]", BIG), ("[8,7,7,128]", N * 7 * 7 * 128)] {
        let l = elementwise(n);
        relu_case::<f32>(&mut report, name, n, l, 0xE1E);
        relu_case::<f16>(&mut report, name, n, l, 0xE2E);
        relu_case::<bf16>(&mut report, name, n, l, 0xE3E);
    }
    // The GPU backend's geometry (4096 blocks, two rounds of the loop) once; fewer elements
    // than one block; a count that is not a multiple of the block.
    relu_case::<bf16>(&mut report, "GPU grid", BIG, gpu_elementwise(BIG), 0xE4E);
    relu_case::<f16>(&mut report, "n=77", 77, gpu_elementwise(77), 0xE5E);
    relu_case::<f32>(&mut report, "n=1000", 1000, Launch::linear(3, 256), 0xE6E);
    report.finish("relu");
}

fn fork_case<T: Act>(report: &mut Report, name: &str, n: usize, l: Launch, seed: u64) {
    let t = T::NAME;
    // Gradients of different sizes, so that the float sums do round.
    let parts: Vec<(Vec<T>, Vec<f32>)> = [1.0f32, 8.0, 0.25, 64.0]
        .iter()
        .enumerate()
        .map(|(i, &m)| quantize::<T>(&uniform(seed + i as u64, n, -m, m)))
        .collect();
    for k in 1..=4 {
        let refs: Vec<&[T]> = parts[..k].iter().map(|(p, _)| p.as_slice()).collect();
        let mut got = vec![T::from_f32(f32::NAN); n];
        emu::fork_backward(l, &mut got, &refs);
        // Reference: the CPU's f32 sum in branch order of the very same values, rounded once.
        let mut want = vec![0f32; n];
        let owned: Vec<Vec<f32>> = parts[..k].iter().map(|(_, r)| r.clone()).collect();
        ConcatOps::<f32>::fork_backward(&cpu(), &mut want, &owned.iter().collect::<Vec<_>>());
        check_bits(
            report,
            &format!("{name} {t} fork_backward of {k}"),
            &widen(&got),
            &round_to::<T>(&want),
            "the same float additions in the same order, one rounding to T",
        );
    }
    // dx as its own first part (the host folds a fifth to seventh branch this way).
    let mut got: Vec<T> = parts[0].0.clone();
    let rest: Vec<&[T]> = parts[1..].iter().map(|(p, _)| p.as_slice()).collect();
    emu::fork_backward_into(l, &mut got, &rest);
    let mut want = vec![0f32; n];
    let owned: Vec<Vec<f32>> = parts.iter().map(|(_, r)| r.clone()).collect();
    ConcatOps::<f32>::fork_backward(&cpu(), &mut want, &owned.iter().collect::<Vec<_>>());
    check_bits(
        report,
        &format!("{name} {t} fork_backward in place"),
        &widen(&got),
        &round_to::<T>(&want),
        "dx = dx + b + c + d, as with four separate parts",
    );
}

#[test]
fn fork_backward_sums_in_float_in_branch_order_and_rounds_once() {
    let mut report = Report::default();
    for (name, n) in [("[128,16,16,64]", BIG), ("[8,7,7,256]", N * 7 * 7 * 256)] {
        let l = elementwise(n);
        fork_case::<f32>(&mut report, name, n, l, 0xF00);
        fork_case::<f16>(&mut report, name, n, l, 0xF11);
        fork_case::<bf16>(&mut report, name, n, l, 0xF22);
    }
    fork_case::<f16>(&mut report, "n=1000", 1000, gpu_elementwise(1000), 0xF33);
    // Rounding after every addition would lose what only the float sum keeps: 1 + ½ulp + ½ulp
    // is 1 + 1ulp, but each ½ulp alone is a tie that rounds back to 1.
    fn ties<T: Act>(report: &mut Report, half_ulp: f32) {
        let one = [T::from_f32(1.0); 300];
        let tie = [T::from_f32(half_ulp); 300];
        let mut got = [T::default(); 300];
        emu::fork_backward(Launch::linear(2, 256), &mut got, &[&one, &tie, &tie]);
        check_bits(
            report,
            &format!("{} 1 + ½ulp + ½ulp", T::NAME),
            &widen(&got),
            &[1.0 + 2.0 * half_ulp; 300],
            "summed in float, rounded once",
        );
    }
    ties::<f16>(&mut report, 2f32.powi(-11));
    ties::<bf16>(&mut report, 2f32.powi(-8));
    report.finish("fork_backward");
}

/// Probes of the f32 → 16-bit rounding: every kind of value the training can produce.
fn conversion_probes(seed: u64) -> Vec<f32> {
    let mut r = rng(seed);
    let mut v = vec![
        0.0,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-45, // the smallest f32 subnormal
        -1e-40,
        // f16: the largest finite, the last value that rounds to it, the first that overflows,
        // and beyond.
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1e5,
        -1e9,
        // f16 subnormals: the smallest (2^-24), the tie below it (→ 0), just above the tie
        // (→ 2^-24), the largest subnormal and the smallest normal.
        2f32.powi(-24),
        2f32.powi(-25),
        2f32.powi(-25) * 1.0001,
        -2f32.powi(-25) * 1.5,
        1023.0 * 2f32.powi(-24),
        2f32.powi(-14),
        // bf16: the largest finite and the first that overflows (f32::MAX rounds up to inf).
        3.389_531_4e38,
        3.395e38,
        // Ties to even: 1 + 2^-11 (f16 tie → 1), 1 + 3·2^-11 (→ 1 + 2^-9), 1 + 2^-8 (bf16).
        1.0 + 2f32.powi(-11),
        1.0 + 3.0 * 2f32.powi(-11),
        1.0 + 2f32.powi(-8),
        1.0 + 3.0 * 2f32.powi(-8),
    ];
    // Random bit patterns (every exponent) and weights-like values.
    v.extend((0..50_000).map(|_| f32::from_bits(r.random::<u32>())));
    v.extend((0..50_000).map(|_| normal(&mut r) * 0.05));
    v
}

fn convert_case<T: Act>(report: &mut Report, seed: u64) {
    let t = T::NAME;
    let src = conversion_probes(seed);
    let l = gpu_elementwise(src.len());
    let mut dst = vec![T::default(); src.len()];
    emu::convert_from_f32(l, &mut dst, &src);
    // The `half` crate rounds to nearest even (and is checked against the emulation's
    // conversions bit for bit in emu_half_and_bfloat16_conversions_round_to_nearest_even).
    check_bits(
        report,
        &format!("convert_from_f32_{t} vs half"),
        &widen(&dst),
        &src.iter().map(|&v| T::from_f32(v).to_f32()).collect::<Vec<_>>(),
        "round to nearest even, overflow to inf, subnormals kept",
    );
    // Back to f32: exact.
    let mut back = vec![f32::NAN; src.len()];
    emu::convert_to_f32(l, &mut back, &dst);
    check_bits(
        report,
        &format!("convert_to_f32_{t} of the rounded probes"),
        &back,
        &widen(&dst),
        "widening is exact",
    );
}

#[test]
fn conversions_round_trip_and_match_the_half_crate() {
    let mut report = Report::default();
    convert_case::<f16>(&mut report, 1501);
    convert_case::<bf16>(&mut report, 1502);
    // Every 16-bit pattern: to f32 as `half` widens it, and back to the same bits (NaN stays
    // NaN). Through the kernels, so the widening and the rounding are checked on all values.
    fn all_patterns<T: Act>(report: &mut Report, from_bits: fn(u16) -> T) {
        let t = T::NAME;
        let src: Vec<T> = (0..=u16::MAX).map(from_bits).collect();
        let l = gpu_elementwise(src.len());
        let mut wide = vec![f32::NAN; src.len()];
        emu::convert_to_f32(l, &mut wide, &src);
        check_bits(
            report,
            &format!("convert_to_f32_{t} of every pattern"),
            &wide,
            &widen(&src),
            "exact widening",
        );
        let mut back = vec![T::default(); src.len()];
        emu::convert_from_f32(l, &mut back, &wide);
        check_bits(
            report,
            &format!("convert_from_f32_{t} of every widened pattern"),
            &widen(&back),
            &widen(&src),
            "a 16-bit value survives the round trip",
        );
    }
    all_patterns::<f16>(&mut report, f16::from_bits);
    all_patterns::<bf16>(&mut report, bf16::from_bits);
    report.finish("convert");
}

// ---- conv.cu: the 16-bit working copy of the conv weights (weight_oihw_to_ohwi, add_ohwi_to_oihw)

/// The index in OIHW `[k, c, rs]` of element `j` of OHWI `[k, rs, c]`.
fn oihw_index(j: usize, c: usize, rs: usize) -> usize {
    let (ch, t) = (j % c, j / c);
    let (r, k) = (t % rs, t / rs);
    (k * c + ch) * rs + r
}

fn weight_layout_case<T: Act>(
    report: &mut Report, name: &str, conv: &Conv2d, l: Launch, seed: u64,
) {
    let t = T::NAME;
    let (k, c, rs) = (conv.cout, conv.cin, conv.k * conv.k);
    let n = k * c * rs;
    // The fp32 master weight (OIHW) to the 16-bit working copy (OHWI): the CPU's reorder, then
    // one rounding. A value beyond f16 becomes inf there, NaN stays NaN, −0 stays −0.
    let mut w = uniform(seed, n, -0.3, 0.3);
    w[1] = 1e6;
    w[n / 2] = f32::NAN;
    w[n - 1] = -0.0;
    let mut low = vec![T::from_f32(f32::NAN); n];
    emu::weight_oihw_to_ohwi(l, &mut low, &w, k, c, rs);
    check_bits(
        report,
        &format!("{name} {t} weight_oihw_to_ohwi"),
        &widen(&low),
        &round_to::<T>(&weight_oihw_to_ohwi(&w, conv)),
        "the CPU's OIHW -> OHWI reorder, one rounding to T",
    );
    // The reverse: a gradient from cuDNN in the working copy's layout, added into the fp32 OIHW
    // gradient. Overflowed 16-bit gradients and NaN must reach the fp32 gradient (amp_unscale
    // looks for them there); +inf + −inf is NaN.
    let mut g32 = uniform(seed + 1, n, -1.0, 1.0);
    let mut grad0 = uniform(seed + 2, n, -0.5, 0.5);
    let specials = [
        (3, f32::INFINITY, 0.5, "+inf"),
        (n / 3, f32::NEG_INFINITY, -0.5, "-inf"),
        (n / 2, f32::NAN, 1.0, "NaN"),
        (n - 2, f32::INFINITY, f32::NEG_INFINITY, "NaN"),
        (n - 1, 1e6, 0.0, if t == "f16" { "+inf" } else { "finite" }),
    ];
    for &(j, g, acc, _) in &specials {
        g32[j] = g;
        grad0[oihw_index(j, c, rs)] = acc;
    }
    let (g, gr) = quantize::<T>(&g32);
    let mut grad = grad0.clone();
    emu::add_ohwi_to_oihw(l, &mut grad, &g, k, c, rs);
    let mut want = grad0.clone();
    add_ohwi_to_oihw(&mut want, &gr, conv);
    check_bits(
        report,
        &format!("{name} {t} add_ohwi_to_oihw"),
        &grad,
        &want,
        "the CPU's OHWI -> OIHW reorder, one float addition of the exactly widened gradient",
    );
    // The bitwise check covers these too; spelled out so a failure names the rule it broke.
    for &(j, _, _, what) in &specials {
        let v = grad[oihw_index(j, c, rs)];
        let ok = match what {
            "+inf" => v == f32::INFINITY,
            "-inf" => v == f32::NEG_INFINITY,
            "NaN" => v.is_nan(),
            _ => v.is_finite(),
        };
        report.checked += 1;
        if !ok {
            report.failures.push(format!(
                "{name} add_ohwi_to_oihw_{t}: OHWI [{j}] = {:e} added to {:e} gave {v:e}, want {what}",
                gr[j],
                grad0[oihw_index(j, c, rs)]
            ));
        }
    }
    // The two are inverse permutations: the working copy added back onto zeros is the master
    // weight rounded to T, in place.
    let mut back = vec![0f32; n];
    emu::add_ohwi_to_oihw(l, &mut back, &low, k, c, rs);
    check_bits(
        report,
        &format!("{name} {t} OIHW -> OHWI -> OIHW"),
        &back,
        &round_to::<T>(&w).iter().map(|&v| v + 0.0).collect::<Vec<_>>(),
        "the round trip is the rounding to T",
    );
}

#[test]
fn conv_weights_cross_between_oihw_fp32_and_ohwi_16_bit_like_the_cpu_reorders() {
    let mut report = Report::default();
    let mut seen: Vec<Conv2d> = Vec::new();
    let convs =
        ModelSpec::inception_net_small().convolutions(N).expect("the seed model's shapes fit");
    for (name, _, conv) in convs {
        if seen.contains(&conv) {
            continue;
        }
        seen.push(conv);
        let n = conv.weight_len();
        let (seed, l) = (1600 + 10 * seen.len() as u64, elementwise(n));
        weight_layout_case::<f16>(&mut report, &name, &conv, l, seed + 1);
        weight_layout_case::<bf16>(&mut report, &name, &conv, l, seed + 2);
    }
    // The GPU backend's launch (one element per thread) on the largest weight.
    let big = *seen.iter().max_by_key(|c| c.weight_len()).expect("convolutions");
    let l = gpu_elementwise(big.weight_len());
    weight_layout_case::<f16>(&mut report, "largest, GPU grid", &big, l, 1690);
    report.finish("conv weight layouts");
}

/// The [P, C] shapes of the bias kernels: convolution outputs at batch 128 and odd ones.
const BIAS_SHAPES: [(&str, usize, usize); 5] = [
    ("stem 128x32x32, C=32", 128 * 32 * 32, 32),
    ("512x8x8, C=128", 512 * 8 * 8, 128),
    ("block3 reduce 128x7x7, C=16", 128 * 7 * 7, 16),
    ("P=1000, C=10", 1000, 10),
    ("P=999, C=33", 999, 33),
];

fn bias_add_case<T: Act>(
    report: &mut Report, name: &str, p: usize, c: usize, l: Launch, seed: u64,
) {
    let t = T::NAME;
    let (y0, y0r) = quantize::<T>(&activations(seed, p, c));
    let b = uniform(seed + 1, c, -1.0, 1.0);
    // A tail past P·C that the kernel must not touch.
    let sentinel = T::from_f32(-7.0);
    let mut y = y0.clone();
    y.extend([sentinel; 5]);
    emu::bias_add(l, &mut y, &b, p, c);
    let want: Vec<f32> = (0..p * c).map(|i| y0r[i] + b[i % c]).collect();
    check_bits(
        report,
        &format!("{name} {t} bias_add"),
        &widen(&y[..p * c]),
        &round_to::<T>(&want),
        "one float addition, one rounding to T",
    );
    assert!(y[p * c..].iter().all(|v| v.to_f32() == -7.0), "{name} {t}: bias_add wrote past P·C");
}

#[test]
fn bias_add_adds_the_channel_bias_and_rounds_once() {
    let mut report = Report::default();
    for (k, &(name, p, c)) in BIAS_SHAPES.iter().enumerate() {
        let (seed, l) = (1700 + 10 * k as u64, elementwise(p * c));
        bias_add_case::<f16>(&mut report, name, p, c, l, seed + 1);
        bias_add_case::<bf16>(&mut report, name, p, c, l, seed + 2);
    }
    // The GPU backend's geometry: 4096 blocks over 131072·32 values.
    let (p, c) = (BIAS_SHAPES[0].1, BIAS_SHAPES[0].2);
    bias_add_case::<f16>(&mut report, "GPU grid", p, c, gpu_elementwise(p * c), 1790);
    report.finish("bias_add");
}

// ---- conv.cu: bias_grad --------------------------------------------------------------------------

/// Rows per tile, as the GPU backend launches bias_grad.
const TILE: usize = geometry::BIAS_GRAD_TILE_ROWS;

/// The launch of the per-channel reductions with `g` row chunks: block (32, 16), or (16, 32)
/// when C ≤ 16, as the kernel comments recommend.
fn reduction_launch(c: usize, g: usize) -> Launch {
    let (bx, by) = if c <= 16 { (16, 32) } else { (32, 16) };
    Launch::grid2((c.div_ceil(bx) as u32, g as u32), (bx as u32, by as u32))
}

/// The GPU backend's launch of bias_grad on a GPU with `sms` multiprocessors.
fn bias_grad_launch(p: usize, c: usize, sms: u32) -> Launch {
    let r = geometry::bias_grad(p, c, sms);
    Launch::grid2(r.grid, r.block)
}

/// Block counts to try: one block walking every tile, and the backend's on an H100/H200. (Every
/// block and every tile is a round of barriers across 512 host threads in the emulation, so the
/// number of large launches is kept small; that the block count changes no bit is tested on
/// its own below, idle blocks have their own small cases.)
fn chunk_counts(p: usize, c: usize) -> Vec<usize> {
    let mut g = vec![1, bias_grad_launch(p, c, SMS as u32).grid[1] as usize];
    g.dedup();
    g
}

/// f64 column sums of `dy` [p, c] plus `db0`: the reference of bias_grad.
fn column_sums(dy: &[f32], db0: &[f32], p: usize, c: usize) -> Vec<f64> {
    let mut s = f64s(db0);
    for r in 0..p {
        for (ch, acc) in s.iter_mut().enumerate() {
            *acc += dy[r * c + ch] as f64;
        }
    }
    s
}

/// Multiples of 2^-6 in [-2, 2]: exact in f16 and bf16, and every partial sum of up to 2^17 of
/// them is a multiple of 2^-6 below 2^18 in magnitude, which float holds exactly. The kernel's
/// per-thread float sums, double merges and the conversion of the total are then all exact, and
/// only the final `db + total` rounds: the result must equal the f64 reference rounded once.
fn exact_gradients(seed: u64, p: usize, c: usize) -> Vec<f32> {
    assert!(p <= 1 << 17, "the exactness argument needs P ≤ 2^17");
    let mut r = rng(seed);
    (0..p * c).map(|_| r.random_range(-128i32..=128) as f32 / 64.0).collect()
}

#[allow(clippy::too_many_arguments)]
fn bias_grad_exact_case<T: Act>(
    report: &mut Report, name: &str, p: usize, c: usize, tile: usize, chunks: &[usize], seed: u64,
) {
    let (dy, dyr) = quantize::<T>(&exact_gradients(seed, p, c));
    assert_eq!(dyr, exact_gradients(seed, p, c), "inputs not exact in T");
    let db0 = uniform(seed + 1, c, -0.3, 0.3);
    // db0 + Σ is exact in f64 (both are floats less than 2^29 apart in exponent), so `as f32`
    // is the one rounding the kernel's float addition makes.
    let want: Vec<f32> = column_sums(&dyr, &db0, p, c).iter().map(|&v| v as f32).collect();
    for &g in chunks {
        let mut db = db0.clone();
        emu::bias_grad(reduction_launch(c, g), &mut db, &dy, p, c, tile);
        check_bits(
            report,
            &format!("{name} {} G={g} R={tile} exact inputs", T::NAME),
            &db,
            &want,
            "exact partial sums: only db + Σ rounds",
        );
    }
}

/// The bound of bias_grad's error on the worst channel with tiles of `tile` rows and blocks of
/// `l.block[1]` rows: the float sums of m = ceil(tile/BY) values per thread err by at most
/// (m−1)·2^-24 of the |values| they add (recursive summation), the double stages by ~2^-50 of
/// that, and the conversion of the total and the final addition by 2^-24 of |Σ| and of
/// |db0 + Σ| each: in all at most (m+1)·2^-24·(Σ|dy| + |db0|).
fn bias_grad_bound(dy: &[f32], db0: &[f32], p: usize, c: usize, l: Launch, tile: usize) -> f64 {
    let m = tile.div_ceil(l.block[1] as usize) as f64;
    (m + 1.0) * 2f64.powi(-24) * worst_abs_column(dy, db0, p, c)
}

/// max over channels of Σ_p |dy[p, c]| + |db0[c]|.
fn worst_abs_column(dy: &[f32], db0: &[f32], p: usize, c: usize) -> f64 {
    let mut abs = db0.iter().map(|v| v.abs() as f64).collect::<Vec<_>>();
    for r in 0..p {
        for (ch, acc) in abs.iter_mut().enumerate() {
            *acc += dy[r * c + ch].abs() as f64;
        }
    }
    abs.iter().fold(0.0f64, |a, &b| a.max(b))
}

fn bias_grad_random_case<T: Act>(
    report: &mut Report, name: &str, p: usize, c: usize, chunks: &[usize], seed: u64,
) {
    // Gradients of a conv output: per-channel offsets (so the column sums are large) and
    // spread, rounded to T; the reference sums the very same values in f64.
    let (dy, dyr) = quantize::<T>(&activations(seed, p, c));
    let db0 = uniform(seed + 1, c, -0.3, 0.3);
    let want = column_sums(&dyr, &db0, p, c);
    for &g in chunks {
        let l = reduction_launch(c, g);
        let mut db = db0.clone();
        emu::bias_grad(l, &mut db, &dy, p, c, TILE);
        report.check(
            &format!("{name} {} G={g} random", T::NAME),
            &f64s(&db),
            &want,
            Tol::new(
                bias_grad_bound(&dyr, &db0, p, c, l, TILE),
                0.0,
                "(m+1)·2^-24·Σ|dy|: m-term float sums per thread, double after, 2 roundings",
            ),
        );
    }
}

#[test]
fn bias_grad_accumulates_the_column_sums_of_dy() {
    let mut report = Report::default();
    for (k, &(name, p, c)) in BIAS_SHAPES.iter().enumerate() {
        let seed = 1800 + 10 * k as u64;
        // Exact inputs with one block and with the backend's; realistic inputs with the
        // backend's (the bound holds whatever G).
        let all = chunk_counts(p, c);
        bias_grad_exact_case::<f32>(&mut report, name, p, c, TILE, &all, seed);
        bias_grad_exact_case::<f16>(&mut report, name, p, c, TILE, &all, seed + 1);
        bias_grad_exact_case::<bf16>(&mut report, name, p, c, TILE, &all, seed + 2);
        let backend = &all[all.len() - 1..];
        bias_grad_random_case::<f32>(&mut report, name, p, c, backend, seed + 3);
        bias_grad_random_case::<f16>(&mut report, name, p, c, backend, seed + 4);
        bias_grad_random_case::<bf16>(&mut report, name, p, c, backend, seed + 5);
    }
    // More blocks than tiles (idle blocks must still arrive at the counter), tiles that do not
    // divide P, and a tile of one row: P = 50 in 40 blocks over 7 tiles of 8 rows; P = 1000 in
    // 300 blocks over 250 tiles of 4; P = 37 in tiles of 1.
    for (p, tile, g, seed) in [(50, 8, 40, 1880), (1000, 4, 300, 1881), (37, 1, 5, 1882)] {
        let name = format!("P={p} C=10 R={tile} (idle blocks)");
        bias_grad_exact_case::<f16>(&mut report, &name, p, 10, tile, &[g], seed);
    }
    // C = 10 with the (32, 16) block: 22 idle columns of threads.
    let (p, c) = (1000, 10);
    let (dy, dyr) = quantize::<f16>(&exact_gradients(1890, p, c));
    let want: Vec<f32> = column_sums(&dyr, &[0.0; 10], p, c).iter().map(|&v| v as f32).collect();
    let mut db = vec![0f32; c];
    emu::bias_grad(Launch::grid2((1, 5), (32, 16)), &mut db, &dy, p, c, TILE);
    check_bits(&mut report, "P=1000 C=10 block (32,16) f16", &db, &want, "exact partial sums");
    report.finish("bias_grad");
}

#[test]
fn bias_grad_is_deterministic_reuses_its_counters_and_accumulates() {
    // Four channel groups (four counters), 8 tiles: G = 32 and 40 leave blocks idle.
    let (p, c) = (128 * 8 * 8, 128);
    let (dy, dyr) = quantize::<f16>(&activations(1900, p, c));
    let db0 = uniform(1901, c, -0.3, 0.3);
    // One workspace and one set of counters for every launch, as the GPU backend keeps them.
    let mut ws = vec![0f64; emu::bias_grad_workspace(p, c, TILE)];
    let mut counters = vec![0i32; c.div_ceil(32)];
    let mut run = |l: Launch, db: &mut Vec<f32>| {
        emu::bias_grad_with(l, db, &mut ws, &mut counters, &dy, p, c, TILE);
        assert!(counters.iter().all(|&v| v == 0), "bias_grad left the counters at {counters:?}");
    };
    let l = reduction_launch(c, 7);
    let mut first = db0.clone();
    run(l, &mut first);
    // The same bits for every block count and every order the blocks run in: the tiles, not
    // the grid, fix the order of the sums.
    let mut report = Report::default();
    for (g, order) in [(7, 0), (7, 1), (7, 2), (1, 0), (32, 3), (40, 4)] {
        let mut again = db0.clone();
        run(reduction_launch(c, g).shuffled(order), &mut again);
        check_bits(
            &mut report,
            &format!("G={g} block order {order} vs G=7 in order"),
            &again,
            &first,
            "the summation order depends on the tiles only",
        );
    }
    // A second launch accumulates onto the first: db0 + 2·Σ.
    let mut twice = first.clone();
    run(l, &mut twice);
    let want: Vec<f64> = column_sums(&dyr, &db0, p, c)
        .iter()
        .zip(&db0)
        .map(|(s, &d0)| 2.0 * s - d0 as f64)
        .collect();
    report.check(
        "two launches accumulate",
        &f64s(&twice),
        &want,
        Tol::new(
            3.0 * bias_grad_bound(&dyr, &db0, p, c, l, TILE),
            0.0,
            "two launches' bounds plus the extra addition",
        ),
    );
    report.finish("bias_grad determinism");
}

/// One bias gradient of the model: `[p, c]`, and the convolution it belongs to (None: the
/// linear head).
struct BiasShape {
    name: String,
    p: usize,
    c: usize,
    conv: Option<(Nhwc, Conv2d)>,
}

/// The bias gradients of the model at batch `n`: every convolution output and the linear head,
/// each `[P, C]` once, named by its first layer.
fn model_bias_shapes(n: usize) -> Vec<BiasShape> {
    let spec = ModelSpec::inception_net_small();
    let mut out: Vec<BiasShape> = Vec::new();
    for (name, xs, conv) in spec.convolutions(n).expect("the seed model's shapes fit") {
        let p = conv.out_shape(xs).pixels();
        if !out.iter().any(|o| (o.p, o.c) == (p, conv.cout)) {
            out.push(BiasShape { name, p, c: conv.cout, conv: Some((xs, conv)) });
        }
    }
    for layer in &spec.layers {
        if let Layer::Linear { name, fout, .. } = layer {
            let name = name.clone();
            out.push(BiasShape { name, p: n, c: *fout, conv: None });
        }
    }
    out
}

/// The CPU reference's bias gradient `db0 + Σ_p dy[p, ·]`: through its convolution backward
/// (or the linear head's, for `conv` None), whose other outputs are not looked at.
fn cpu_bias_grad(
    dy: &[f32], db0: &[f32], p: usize, c: usize, conv: Option<(Nhwc, Conv2d)>,
) -> Vec<f32> {
    let mut db = db0.to_vec();
    match conv {
        Some((xs, conv)) => {
            let (x, w) = (vec![0f32; xs.len()], vec![0f32; conv.weight_len()]);
            let mut dw = vec![0f32; conv.weight_len()];
            cpu().conv2d_backward(None, &mut dw, &mut db, &dy.to_vec(), &x, &w, xs, &conv);
        }
        None => {
            let (fin, x) = (1, vec![0f32; p]);
            let (w, mut dw) = (vec![0f32; c * fin], vec![0f32; c * fin]);
            cpu().linear_backward(None, &mut dw, &mut db, &dy.to_vec(), &x, &w, p, fin, c);
        }
    }
    db
}

#[test]
fn bias_grad_f32_matches_the_cpu_at_the_model_shapes_with_the_same_bits_on_every_launch() {
    // The fp32 path's bias gradients (every convolution and the linear head) come from this
    // kernel: within the two summations' error bounds of the CPU reference, and the same bits
    // whatever grid the backend picks (every G from 1 to the number of tiles, i.e. every SM
    // count) and whatever order the blocks run in, so a run-to-run difference on the GPU would
    // show here as a difference between launches.
    let mut report = Report::default();
    // Two batches: the test's own, and 128, where the largest layer has 25 tiles.
    let shapes = model_bias_shapes(N).into_iter().chain(model_bias_shapes(128).into_iter().take(1));
    for (k, BiasShape { name, p, c, conv }) in shapes.enumerate() {
        let seed = 1950 + 10 * k as u64;
        let name = format!("{name} P={p} C={c}");
        let dy = activations(seed, p, c);
        let db0 = uniform(seed + 1, c, -0.3, 0.3);
        let want = cpu_bias_grad(&dy, &db0, p, c, conv);
        let l0 = bias_grad_launch(p, c, SMS as u32);
        let mut got = db0.clone();
        emu::bias_grad(l0, &mut got, &dy, p, c, TILE);
        // The CPU sums runs of 8 rows in float, then in f64, then rounds twice: its own bound
        // is (8+1)·2^-24 of the same column magnitudes.
        let cpu_bound = 9.0 * 2f64.powi(-24) * worst_abs_column(&dy, &db0, p, c);
        report.check(
            &format!("{name} vs CPU"),
            &f64s(&got),
            &f64s(&want),
            Tol::new(
                bias_grad_bound(&dy, &db0, p, c, l0, TILE) + cpu_bound,
                0.0,
                "both summations' error bounds",
            ),
        );
        let tiles = p.div_ceil(TILE);
        let mut grids: Vec<u32> = if tiles <= 8 {
            (1..=tiles as u32).collect()
        } else {
            [1, 2, 14, 54, 66, 108, 132, 144, 1024]
                .iter()
                .map(|&sms| bias_grad_launch(p, c, sms).grid[1])
                .collect()
        };
        grids.dedup();
        for (i, &g) in grids.iter().enumerate() {
            for order in [0, 1 + i as u64] {
                let l = Launch::grid2((l0.grid[0], g), (l0.block[0], l0.block[1])).shuffled(order);
                let mut again = db0.clone();
                emu::bias_grad(l, &mut again, &dy, p, c, TILE);
                check_bits(
                    &mut report,
                    &format!("{name} G={g} block order {order} vs G={}", l0.grid[1]),
                    &again,
                    &got,
                    "bias_grad's bits depend on the shape and the data only",
                );
            }
        }
    }
    report.finish("bias_grad f32 at the model's shapes");
}

/// cuDNN's bias-gradient reduction (cudnnConvolutionBackwardBias) takes no algorithm and
/// promises no determinism, while `--deterministic` promises the same bits run to run and
/// the fp32 path is compared with the CPU at fp32 tolerances: every bias gradient of the CUDA
/// backend goes through the project's own `bias_grad_*` kernel, whose order of summation is
/// fixed (tested above). This scan keeps the cuDNN call from coming back.
#[test]
fn the_cuda_backend_never_calls_cudnn_for_bias_gradients() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/backend/cuda");
    let forbidden = "cudnnConvolutionBackwardBias";
    let mut scanned = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("directory entry").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let src =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        scanned += 1;
        if let Some((line, text)) = src.lines().enumerate().find(|(_, l)| l.contains(forbidden)) {
            panic!(
                "{}:{}: {forbidden} is back ({}); use the deterministic bias_grad kernel",
                path.display(),
                line + 1,
                text.trim()
            );
        }
    }
    assert!(scanned >= 3, "found only {scanned} sources in {}", dir.display());
}

// ---- avg_pool2d_backward (pool.cu) -------------------------------------------------------------

/// The input shape of every avg_pool2d of the model at batch `n`.
fn model_avg_pools(n: usize) -> Vec<(String, Nhwc)> {
    ModelSpec::inception_net_small()
        .layer_inputs(n)
        .expect("the seed model's shapes fit")
        .into_iter()
        .filter_map(|(layer, xs)| match layer {
            Layer::AvgPool2 { name } => Some((name, xs)),
            _ => None,
        })
        .collect()
}

fn avg_pool_case<T: Act>(report: &mut Report, name: &str, xs: Nhwc, l: Launch, seed: u64) {
    let ys = Nhwc::new(xs.n, xs.h / 2, xs.w / 2, xs.c);
    let mut g = activations(seed, ys.pixels(), ys.c);
    // NaN, ±inf, −0 and a value whose quarter is subnormal pass as the CPU passes them.
    let specials = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0, 2e-38];
    for (v, s) in g.iter_mut().zip(specials) {
        *v = s;
    }
    let (dy, dyr) = quantize::<T>(&g);
    // NaN everywhere first: every element of dx must be written, the odd tail with zeros.
    let mut dx = vec![T::from_f32(f32::NAN); xs.len()];
    emu::avg_pool2d_backward(l, &mut dx, &dy, [xs.n, xs.h, xs.w, xs.c]);
    let mut want = vec![f32::NAN; xs.len()];
    cpu().avg_pool2d_backward(&mut want, &dyr, xs);
    check_bits(
        report,
        &format!("{name} {}x{}x{}x{} {}", xs.n, xs.h, xs.w, xs.c, T::NAME),
        &widen(&dx),
        &round_to::<T>(&want),
        "dy·0.25 in float, one rounding to T",
    );
}

#[test]
fn avg_pool2d_backward_matches_the_cpu_bitwise() {
    let mut report = Report::default();
    let pools = model_avg_pools(N);
    assert!(!pools.is_empty(), "the model has no avg_pool2d");
    for (k, (name, xs)) in pools.iter().enumerate() {
        let (seed, l) = (2100 + 10 * k as u64, elementwise(xs.len()));
        avg_pool_case::<f32>(&mut report, name, *xs, l, seed);
        avg_pool_case::<f16>(&mut report, name, *xs, l, seed + 1);
        avg_pool_case::<bf16>(&mut report, name, *xs, l, seed + 2);
    }
    // The GPU backend's launch at batch 1024: 4096 blocks, two rounds of the grid-stride loop.
    for (name, xs) in model_avg_pools(1024) {
        avg_pool_case::<f16>(&mut report, &name, xs, gpu_elementwise(xs.len()), 2180);
    }
    // Odd heights and widths: the last row or column is not pooled and gets a zero gradient.
    for (k, xs) in [Nhwc::new(2, 5, 7, 3), Nhwc::new(3, 3, 2, 10), Nhwc::new(1, 1, 4, 8)]
        .into_iter()
        .enumerate()
    {
        let (seed, l) = (2190 + 10 * k as u64, elementwise(xs.len()));
        avg_pool_case::<f32>(&mut report, "odd", xs, l, seed);
        avg_pool_case::<bf16>(&mut report, "odd", xs, l, seed + 1);
    }
    report.finish("avg_pool2d_backward");
}
