//! What the libraries would reject is rejected, with the status and the field; algorithms
//! and their workspaces agree.

use super::conv::{cases, problem};
use super::pool::pool_case;
use super::*;

fn expect_err(result: Result<()>, words: &[&str]) {
    let message = match result {
        Ok(()) => panic!("accepted; expected an error mentioning {words:?}"),
        Err(e) => e.to_string(),
    };
    for w in words {
        assert!(message.contains(w), "{message:?} does not mention {w:?}");
    }
}

/// A valid call over made-up, well-separated addresses (validation reads no memory).
fn valid_conv(dir: ConvDirection) -> ConvCall {
    let pr = problem(&cases()[0]);
    let algo = offers(dir)[0].algo;
    let ws = workspace_bytes(&pr, dir, algo).expect("offered");
    ConvCall {
        dir,
        problem: pr,
        algo,
        x: 0x10_0000,
        w: 0x20_0000,
        y: 0x30_0000,
        workspace: 0x40_0000,
        workspace_bytes: ws,
        alpha: 1.0,
        beta: 0.0,
    }
}

#[test]
fn convolution_validation_rejects_what_cudnn_would() {
    let conv = |f: &dyn Fn(&mut ConvCall)| {
        let mut c = valid_conv(ConvDirection::Forward);
        f(&mut c);
        validate_dnn(&DnnCall::Conv(c))
    };
    for dir in [ConvDirection::Forward, ConvDirection::BackwardData, ConvDirection::BackwardFilter]
    {
        validate_dnn(&DnnCall::Conv(valid_conv(dir))).expect("valid");
    }
    conv(&|_| {}).expect("valid");
    expect_err(
        conv(&|c| c.problem.y.dims[2] = 6),
        &["cudnnConvolutionForward", BAD_PARAM, "y dims", "[2, 4, 7, 7]"],
    );
    expect_err(conv(&|c| c.problem.w.dims[1] = 4), &[BAD_PARAM, "C = 3", "C = 4"]);
    expect_err(conv(&|c| c.problem.w.dtype = DType::F16), &[BAD_PARAM, "data types", "w F16"]);
    expect_err(
        conv(&|c| c.problem.conv.compute = DType::F16),
        &[NOT_SUPPORTED, "compute type F16"],
    );
    expect_err(conv(&|c| c.problem.conv.stride = [1, 0]), &[BAD_PARAM, "stride"]);
    expect_err(conv(&|c| c.problem.conv.dilation = [0, 1]), &[BAD_PARAM, "dilation"]);
    expect_err(conv(&|c| c.problem.x.dims[0] = 0), &[BAD_PARAM, "x dims", "zero"]);
    expect_err(conv(&|c| c.problem.x.dims[0] = 1 << 40), &[NOT_SUPPORTED, "x dims", "2^31"]);
    expect_err(
        conv(&|c| c.problem.conv.math = MathType::TensorOp),
        &[NOT_SUPPORTED, "TensorOp", "F32"],
    );
    expect_err(
        conv(&|c| {
            c.problem.w.dims = [4, 3, 11, 3];
            c.problem.conv.pad = [0, 1];
        }),
        &[BAD_PARAM, "11x3 window"],
    );
    expect_err(conv(&|c| c.x = 0), &[BAD_PARAM, "x is a null pointer"]);
    expect_err(conv(&|c| c.w += 2), &[BAD_PARAM, "w at", "aligned to 4"]);
    expect_err(conv(&|c| c.algo = 7), &[NOT_SUPPORTED, "algo 7", "[1, 0]"]);
    expect_err(conv(&|c| c.workspace_bytes -= 1), &[BAD_PARAM, "workspace_bytes"]);
    expect_err(conv(&|c| c.workspace += 8), &[BAD_PARAM, "workspace at", "aligned to 16"]);
    expect_err(conv(&|c| c.workspace = 0), &[BAD_PARAM, "workspace is a null pointer"]);
    expect_err(conv(&|c| c.y = c.x + 64), &[BAD_PARAM, "overlaps", "x", "y"]);
    expect_err(conv(&|c| c.workspace = c.w), &[BAD_PARAM, "overlaps", "workspace"]);
    // Inputs may share memory; a 16-bit convolution may run in FMA math.
    conv(&|c| c.w = c.x).expect("inputs may overlap");
    conv(&|c| {
        c.problem.x.dtype = DType::F16;
        c.problem.w.dtype = DType::F16;
        c.problem.y.dtype = DType::F16;
    })
    .expect("f16 with Fma math");
}

#[test]
fn pooling_and_add_tensor_validation_rejects_what_cudnn_would() {
    let pc = pool_case(PoolMode::MaxDeterministic, 3, 1, 2, [2, 3, 7, 6], DType::F32, Layout::Nhwc);
    let pool = |f: &dyn Fn(&mut PoolForward)| {
        let mut call = PoolForward {
            pool: pc.pool,
            x: pc.x,
            x_ptr: 0x10_0000,
            y: pc.y,
            y_ptr: 0x20_0000,
            alpha: 1.0,
            beta: 0.0,
        };
        f(&mut call);
        validate_dnn(&DnnCall::PoolForward(call))
    };
    pool(&|_| {}).expect("valid");
    expect_err(
        pool(&|p| p.y.dims[3] = 4),
        &["cudnnPoolingForward", BAD_PARAM, "y dims", "[2, 3, 4, 3]"],
    );
    expect_err(pool(&|p| p.y.dims[1] = 4), &[BAD_PARAM, "y dims"]);
    expect_err(pool(&|p| p.pool.window = [0, 3]), &[BAD_PARAM, "window"]);
    expect_err(pool(&|p| p.pool.stride = [2, 0]), &[BAD_PARAM, "stride"]);
    expect_err(pool(&|p| p.pool.pad = [3, 1]), &[BAD_PARAM, "pad"]);
    expect_err(pool(&|p| p.y.dtype = DType::F16), &[BAD_PARAM, "data types"]);
    expect_err(pool(&|p| p.y_ptr = 0), &[BAD_PARAM, "y is a null pointer"]);
    let backward = PoolBackward {
        pool: pc.pool,
        y: pc.y,
        y_ptr: 0x10_0000,
        dy_ptr: 0x20_0000,
        x: pc.x,
        x_ptr: 0x30_0000,
        dx_ptr: 0x40_0000,
        alpha: 1.0,
        beta: 0.0,
    };
    validate_dnn(&DnnCall::PoolBackward(backward)).expect("valid");
    expect_err(
        validate_dnn(&DnnCall::PoolBackward(PoolBackward { dx_ptr: 0x20_0000, ..backward })),
        &["cudnnPoolingBackward", "overlaps", "dx"],
    );

    let add = AddTensor {
        a: TensorDesc { dtype: DType::F32, layout: Layout::Nchw, dims: [1, 5, 1, 1] },
        a_ptr: 0x10_0000,
        c: TensorDesc { dtype: DType::F32, layout: Layout::Nhwc, dims: [2, 5, 4, 4] },
        c_ptr: 0x20_0000,
        alpha: 1.0,
        beta: 1.0,
    };
    validate_dnn(&DnnCall::AddTensor(add)).expect("valid");
    let mut bad = add;
    bad.a.dims = [1, 4, 1, 1];
    expect_err(
        validate_dnn(&DnnCall::AddTensor(bad)),
        &["cudnnAddTensor", BAD_PARAM, "do not broadcast"],
    );
    let mut bad = add;
    bad.a.dtype = DType::F16;
    expect_err(validate_dnn(&DnnCall::AddTensor(bad)), &["cudnnAddTensor", BAD_PARAM, "A F16"]);
}

#[test]
fn gemm_validation_follows_cublas() {
    use Transpose::*;
    let g = Gemm {
        transa: N,
        transb: T,
        m: 5,
        n: 4,
        k: 7,
        a: 0x10_0000,
        lda: 5,
        b: 0x20_0000,
        ldb: 4,
        c: 0x30_0000,
        ldc: 5,
        alpha: 1.0,
        beta: 0.0,
    };
    validate_gemm(&g).expect("valid");
    validate_gemm(&Gemm { transa: T, transb: N, lda: 7, ldb: 7, ..g }).expect("valid");
    expect_err(validate_gemm(&Gemm { k: 0, ..g }), &["cublasSgemm", INVALID_VALUE, "k = 0"]);
    expect_err(validate_gemm(&Gemm { lda: 4, ..g }), &[INVALID_VALUE, "lda = 4"]);
    expect_err(validate_gemm(&Gemm { transa: T, ..g }), &[INVALID_VALUE, "lda = 5", "7 rows"]);
    expect_err(validate_gemm(&Gemm { ldb: 3, ..g }), &[INVALID_VALUE, "ldb = 3"]);
    expect_err(validate_gemm(&Gemm { transb: N, ..g }), &[INVALID_VALUE, "ldb = 4", "7 rows"]);
    expect_err(validate_gemm(&Gemm { ldc: 4, ..g }), &[INVALID_VALUE, "ldc = 4"]);
    expect_err(validate_gemm(&Gemm { b: 0, ..g }), &[INVALID_VALUE, "B is a null pointer"]);
    expect_err(validate_gemm(&Gemm { c: 0x10_0010, ..g }), &[INVALID_VALUE, "overlaps"]);
    expect_err(validate_gemm(&Gemm { c: 0x30_0002, ..g }), &[INVALID_VALUE, "aligned"]);
}

#[test]
fn algorithms_and_workspaces_agree() {
    for case in cases() {
        let pr = problem(&case);
        for dir in
            [ConvDirection::Forward, ConvDirection::BackwardData, ConvDirection::BackwardFilter]
        {
            let ranked = conv_algorithms(&pr, dir, false);
            let measured = conv_algorithms(&pr, dir, true);
            assert!(ranked.len() >= 2);
            let algos: Vec<u32> = ranked.iter().map(|p| p.algo).collect();
            assert_eq!(algos, measured.iter().map(|p| p.algo).collect::<Vec<_>>());
            let mut distinct = algos.clone();
            distinct.sort();
            distinct.dedup();
            assert_eq!(distinct.len(), algos.len(), "{dir:?}: distinct numbers");
            assert!(ranked[0].memory > 0, "{dir:?}: the first needs a workspace");
            assert!(ranked.iter().all(|p| p.ok && p.time_ms == -1.0));
            assert!(measured.windows(2).all(|w| 0.0 < w[0].time_ms && w[0].time_ms < w[1].time_ms));
            let math = if case.dtype == DType::F32 { MathType::Fma } else { MathType::TensorOp };
            for p in &measured {
                assert_eq!(workspace_bytes(&pr, dir, p.algo), Some(p.memory));
                assert_eq!(p.math, math);
                // cuDNN's backward ALGO_0s are the nondeterministic ones.
                assert_eq!(p.deterministic, dir == ConvDirection::Forward || p.algo != 0);
            }
            assert_eq!(workspace_bytes(&pr, dir, 6), None);
            assert_eq!(conv_algorithms(&pr, dir, true), measured, "deterministic times");
        }
        let mut bad = pr;
        bad.y.dims[1] += 1;
        assert!(conv_algorithms(&bad, ConvDirection::Forward, true).iter().all(|p| !p.ok));
    }
}
