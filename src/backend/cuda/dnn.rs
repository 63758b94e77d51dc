//! cuDNN as the backend uses it: the plain-data descriptors of its convolutions and pooling
//! (the device seam's [`ConvProblem`], [`PoolDesc`]) and the choice of each convolution's
//! algorithms from what the device reports, cached per shape.

use super::device::{
    AlgoPerf, ConvDesc, ConvDirection, ConvProblem, Device, FilterDesc, Layout, MathType, PoolDesc,
    PoolMode, Stream, TensorDesc,
};
use super::DType;
use crate::backend::{Conv2d, MaxPool2d, Nhwc};
use anyhow::Result;

/// An NHWC activation of shape `s` and element type `dt`.
pub fn nhwc(s: Nhwc, dt: DType) -> TensorDesc {
    TensorDesc { dtype: dt, layout: Layout::Nhwc, dims: [s.n, s.c, s.h, s.w] }
}

/// An fp32 per-channel vector `[1, C, 1, 1]` (bias).
pub fn channels(c: usize) -> TensorDesc {
    TensorDesc { dtype: DType::F32, layout: Layout::Nchw, dims: [1, c, 1, 1] }
}

/// The layout of `conv`'s weight as the convolutions of data type `dt` read it: the fp32 path
/// reads the master weight itself, PyTorch's OIHW (cuDNN's KCRS, `Nchw` for a filter); mixed
/// precision reads the 16-bit working copy, which `weight_oihw_to_ohwi` writes in OHWI
/// (cuDNN's KRSC), the layout its tensor-core kernels for NHWC activations want.
pub fn filter_layout(dt: DType) -> Layout {
    match dt {
        DType::F32 => Layout::Nchw,
        DType::F16 | DType::Bf16 => Layout::Nhwc,
    }
}

/// Convolving `xs` with `conv` in `dt`, run in math type `math`: cross-correlation with fp32
/// accumulation.
pub fn problem(xs: Nhwc, conv: &Conv2d, dt: DType, math: MathType) -> ConvProblem {
    ConvProblem {
        x: nhwc(xs, dt),
        w: FilterDesc {
            dtype: dt,
            layout: filter_layout(dt),
            dims: [conv.cout, conv.cin, conv.k, conv.k],
        },
        y: nhwc(conv.out_shape(xs), dt),
        conv: ConvDesc {
            pad: [conv.pad, conv.pad],
            stride: [conv.stride, conv.stride],
            dilation: [1, 1],
            compute: DType::F32,
            math,
        },
    }
}

/// Max pooling; padding never wins (cuDNN pads with −∞ for max pooling), NaN propagates.
pub fn max_pool(pool: &MaxPool2d) -> PoolDesc {
    PoolDesc {
        mode: PoolMode::MaxDeterministic,
        window: [pool.k, pool.k],
        pad: [pool.pad, pool.pad],
        stride: [pool.stride, pool.stride],
    }
}

/// `avg_pool2d(2)`.
pub fn avg_pool2() -> PoolDesc {
    PoolDesc {
        mode: PoolMode::AverageCountIncludePadding,
        window: [2, 2],
        pad: [0, 0],
        stride: [2, 2],
    }
}

/// What the convolutions of one shape run: per direction the algorithm and its math type.
#[derive(Clone, Copy, Debug)]
pub struct Algos {
    pub fwd: (u32, MathType),
    pub bwd_data: (u32, MathType),
    pub bwd_filter: (u32, MathType),
    /// Bytes of workspace the largest of the three needs.
    pub workspace: usize,
    /// Whether the device measured them (false: cuDNN's heuristics ranked them).
    pub measured: bool,
}

/// The math type of the descriptors an algorithm search runs with: plain FMA for fp32, so that
/// `Find` measures and the heuristics rank what the fp32 path may run (and [`choose`] takes only
/// FMA results, whatever cuDNN returns); tensor-op math for 16-bit data, which has cuDNN consider
/// tensor-core algorithms beside the others, each result reporting the math type it ran in.
fn default_math(dt: DType) -> MathType {
    match dt {
        DType::F32 => MathType::Fma,
        DType::F16 | DType::Bf16 => MathType::TensorOp,
    }
}

/// The most workspace one algorithm may ask for: the fastest algorithm that needs more is
/// passed over for the next one.
const MAX_WORKSPACE: usize = 1 << 30;

/// Whether a result measured (or ranked) in math type `math` may run on data of type `dt`.
/// The fp32 path (`--no-amp`) is strict fp32: only `CUDNN_FMA_MATH`. Tensor-op math on fp32
/// data is TF32 (10-bit mantissa products) on Ampere and later, and `CUDNN_DEFAULT_MATH` may be
/// too, either of which would put the fp32 path out of reach of the CPU reference's tolerances.
/// 16-bit data runs in whatever math type cuDNN measured.
fn math_allowed(dt: DType, math: MathType) -> bool {
    dt != DType::F32 || math == MathType::Fma
}

/// The first usable result, in cuDNN's order (fastest first for `Find`, best-ranked first for
/// the heuristics): it succeeded, fits the workspace cap, is deterministic when asked, and ran in
/// a math type allowed for `dt`. Returns the algorithm with the math type cuDNN reported for it,
/// which the calls then set on their descriptors: an algorithm's speed and workspace are those of
/// that math type, and some algorithms exist in one math type only, so running a result in
/// another (e.g. a tensor-op result forced to FMA) runs something that was never measured or
/// may not exist. None when no result qualifies.
fn choose(results: &[AlgoPerf], dt: DType, deterministic: bool) -> Option<&AlgoPerf> {
    results.iter().find(|p| {
        p.ok && p.memory <= MAX_WORKSPACE
            && (!deterministic || p.deterministic)
            && math_allowed(dt, p.math)
    })
}

/// Why [`choose`] found nothing for the `what` direction of convolving `xs` with `conv` in `dt`:
/// the convolution's shape and every condition a result had to meet.
fn no_usable_algorithm(
    what: &str, xs: Nhwc, conv: &Conv2d, dt: DType, deterministic: bool,
) -> String {
    let mut conditions =
        vec![format!("succeeded within the {} MiB workspace cap", MAX_WORKSPACE >> 20)];
    if dt == DType::F32 {
        conditions
            .push("ran in plain fp32 math (CUDNN_FMA_MATH; the fp32 path never uses TF32)".into());
    }
    if deterministic {
        conditions.push("is deterministic (--deterministic)".into());
    }
    format!(
        "cuDNN offers no usable {what} algorithm for the {}x{} convolution {} -> {} channels, stride {}, padding {}, on a {}x{}x{}x{} (NHWC) {dt:?} input: none {}",
        conv.k,
        conv.k,
        conv.cin,
        conv.cout,
        conv.stride,
        conv.pad,
        xs.n,
        xs.h,
        xs.w,
        xs.c,
        conditions.join(", ")
    )
}

/// The algorithms for convolving `xs` with `conv` in `dt` on `dev`: measured by the device
/// (`cudnnFind*`, which runs every candidate once), or ranked by cuDNN's heuristics if
/// measuring fails, and always under `--deterministic` (timing decides between algorithms of
/// nearly equal speed by noise; the heuristics make the same choice in every run).
pub fn algos(
    dev: &dyn Device, stream: Stream, xs: Nhwc, conv: &Conv2d, dt: DType, deterministic: bool,
) -> Result<Algos> {
    if deterministic {
        return search(dev, stream, xs, conv, dt, true, false);
    }
    search(dev, stream, xs, conv, dt, false, true).or_else(|find| {
        search(dev, stream, xs, conv, dt, false, false)
            .map_err(|heur| anyhow::anyhow!("{find:#}; with cuDNN's heuristics instead: {heur:#}"))
    })
}

fn search(
    dev: &dyn Device, stream: Stream, xs: Nhwc, conv: &Conv2d, dt: DType, deterministic: bool,
    measure: bool,
) -> Result<Algos> {
    let p = problem(xs, conv, dt, default_math(dt));
    let one = |dir: ConvDirection, what: &str| -> Result<AlgoPerf> {
        let results = dev.conv_algorithms(stream, &p, dir, measure)?;
        choose(&results, dt, deterministic)
            .copied()
            .ok_or_else(|| anyhow::anyhow!(no_usable_algorithm(what, xs, conv, dt, deterministic)))
    };
    let f = one(ConvDirection::Forward, "forward")?;
    let d = one(ConvDirection::BackwardData, "backward-data")?;
    let w = one(ConvDirection::BackwardFilter, "backward-filter")?;
    Ok(Algos {
        fwd: (f.algo, f.math),
        bwd_data: (d.algo, d.math),
        bwd_filter: (w.algo, w.math),
        workspace: f.memory.max(d.memory).max(w.memory),
        measured: measure,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use MathType::{
        Default as DEFAULT, Fma as FMA, TensorOp as TENSOR_OP, TensorOpAllowConversion as CONVERT,
    };

    #[derive(Clone, Copy)]
    struct R {
        math: MathType,
        ok: bool,
        memory: usize,
        deterministic: bool,
    }

    const fn r(math: MathType) -> R {
        R { math, ok: true, memory: 1 << 20, deterministic: true }
    }

    /// Results: algorithm `algos[i]` described by `rs[i]`, fastest first.
    fn perf(rs: &[(u32, R)]) -> Vec<AlgoPerf> {
        rs.iter()
            .enumerate()
            .map(|(i, &(algo, r))| AlgoPerf {
                algo,
                ok: r.ok,
                time_ms: 0.1 * (i + 1) as f32,
                memory: r.memory,
                deterministic: r.deterministic,
                math: r.math,
            })
            .collect()
    }

    fn pick(results: &[AlgoPerf], dt: DType, det: bool) -> Option<(u32, MathType)> {
        choose(results, dt, det).map(|p| (p.algo, p.math))
    }

    // cuDNN's algorithm numbers, for readability.
    const FWD_IMPLICIT_GEMM: u32 = 0;
    const FWD_IMPLICIT_PRECOMP_GEMM: u32 = 1;
    const FWD_GEMM: u32 = 2;
    const FWD_DIRECT: u32 = 3;
    const FWD_WINOGRAD_NONFUSED: u32 = 7;
    const ALGO_0: u32 = 0;
    const ALGO_1: u32 = 1;
    const FFT: u32 = 2;
    const FFT_TILING: u32 = 5;
    const DATA_WINOGRAD: u32 = 4;

    #[test]
    fn strict_fp32_takes_only_fma_results_and_runs_them_in_fma() {
        let results = perf(&[
            (FWD_IMPLICIT_PRECOMP_GEMM, r(TENSOR_OP)),
            (FWD_WINOGRAD_NONFUSED, r(DEFAULT)),
            (FWD_GEMM, r(CONVERT)),
            (FWD_IMPLICIT_GEMM, r(FMA)),
        ]);
        assert_eq!(pick(&results, DType::F32, false), Some((FWD_IMPLICIT_GEMM, FMA)));
    }

    #[test]
    fn strict_fp32_without_an_fma_result_chooses_nothing() {
        // The fastest result was measured with tensor-op math: the algorithm may exist only
        // there, and in fp32 it would run TF32. It must not be run in FMA, nor at all.
        let results = perf(&[(FWD_IMPLICIT_PRECOMP_GEMM, r(TENSOR_OP)), (FWD_GEMM, r(DEFAULT))]);
        assert_eq!(pick(&results, DType::F32, false), None);
        let results = perf(&[(ALGO_1, r(TENSOR_OP))]);
        assert_eq!(pick(&results, DType::F32, false), None);
        let results = perf(&[(ALGO_1, r(CONVERT))]);
        assert_eq!(pick(&results, DType::F32, true), None);
    }

    #[test]
    fn sixteen_bit_runs_each_result_in_the_math_type_cudnn_reported() {
        let failed = R { ok: false, ..r(TENSOR_OP) };
        let results = perf(&[(ALGO_1, failed), (ALGO_0, r(FMA)), (DATA_WINOGRAD, r(TENSOR_OP))]);
        assert_eq!(pick(&results, DType::F16, false), Some((ALGO_0, FMA)));
        for math in [TENSOR_OP, CONVERT, DEFAULT] {
            let results = perf(&[(ALGO_1, r(math))]);
            assert_eq!(pick(&results, DType::Bf16, false), Some((ALGO_1, math)));
        }
    }

    #[test]
    fn failed_oversized_and_nondeterministic_results_are_passed_over() {
        let results = perf(&[
            (FFT, R { ok: false, ..r(FMA) }),
            (FFT_TILING, R { memory: MAX_WORKSPACE + 1, ..r(FMA) }),
            (ALGO_0, R { deterministic: false, ..r(FMA) }),
            (ALGO_1, r(FMA)),
        ]);
        assert_eq!(pick(&results, DType::F32, false), Some((ALGO_0, FMA)));
        assert_eq!(pick(&results, DType::F32, true), Some((ALGO_1, FMA)));
        assert_eq!(pick(&[], DType::F16, false), None);
    }

    #[test]
    fn the_search_descriptors_carry_the_math_type_the_fp32_path_runs() {
        // What Find/Get measure or rank with must be what runs: for fp32 every chosen result
        // is FMA, the descriptors' own math type during the search.
        assert_eq!(default_math(DType::F32), FMA);
        assert_eq!(default_math(DType::F16), TENSOR_OP);
        assert_eq!(default_math(DType::Bf16), TENSOR_OP);
        for math in [DEFAULT, TENSOR_OP, CONVERT, FMA] {
            let results = perf(&[(FWD_DIRECT, r(math))]);
            if let Some((_, m)) = pick(&results, DType::F32, false) {
                assert_eq!(m, default_math(DType::F32));
            }
        }
    }

    #[test]
    fn no_usable_algorithm_names_the_convolution_and_the_conditions() {
        let conv = Conv2d { cin: 3, cout: 64, k: 7, stride: 2, pad: 1 };
        let xs = Nhwc::new(128, 32, 32, 3);
        let msg = no_usable_algorithm("forward", xs, &conv, DType::F32, true);
        for part in [
            "forward",
            "7x7 convolution 3 -> 64 channels, stride 2, padding 1",
            "128x32x32x3 (NHWC) F32 input",
            "CUDNN_FMA_MATH",
            "--deterministic",
        ] {
            assert!(msg.contains(part), "{part:?} missing from: {msg}");
        }
        let msg = no_usable_algorithm("backward-data", xs, &conv, DType::F16, false);
        assert!(!msg.contains("FMA") && !msg.contains("deterministic"), "{msg}");
    }
}
