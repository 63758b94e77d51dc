//! Runs the CUDA kernels of `../cuda/*.cu` on the CPU, for tests.
//!
//! `build.rs` compiles the very same sources with the host C++ compiler (`-DINCEPT_EMU`), where
//! `cuda/emu.h` supplies the CUDA built-ins: blocks run one after another, the threads of a
//! block run as real host threads with `__syncthreads` as a barrier, warp shuffles exchange
//! values through per-warp slots. This crate only launches them: every function here takes
//! slices, checks that they are large enough for what the kernel will touch, and runs the
//! kernel with the launch geometry given. None of the kernels' arithmetic is written in Rust.
//!
//! Activation-typed kernels are generic over [`Act`]: `f32`, [`half::f16`] (`__half`) and
//! [`half::bf16`] (`__nv_bfloat16`), which have the same bits on both sides.

use half::{bf16, f16};
use std::os::raw::c_int;

/// A launch geometry: `grid` blocks of `block` threads (x, y, z each).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

impl Launch {
    /// A 1-D grid of 1-D blocks.
    pub fn linear(grid: u32, block: u32) -> Launch {
        Launch {
            grid: [grid, 1, 1],
            block: [block, 1, 1],
        }
    }
    /// 2-D grid and block.
    pub fn grid2(grid: (u32, u32), block: (u32, u32)) -> Launch {
        Launch {
            grid: [grid.0, grid.1, 1],
            block: [block.0, block.1, 1],
        }
    }
    fn threads(&self) -> u32 {
        self.block.iter().product()
    }
    fn check(&self) {
        assert!(
            self.grid.iter().all(|&g| g > 0) && self.block.iter().all(|&b| b > 0),
            "launch {self:?}: empty grid or block"
        );
        assert!(
            self.threads() <= 1024,
            "launch {self:?}: more than 1024 threads per block"
        );
    }
}

/// An activation element type of the kernels (`T` in the .cu templates).
pub trait Act: Copy + Default + Send + Sync + std::fmt::Debug + 'static {
    /// `f32`, `f16` or `bf16`: the suffix of the kernel names.
    const NAME: &'static str;
    fn to_f32(self) -> f32;
    /// Round to nearest even, as the kernels' `from_float`.
    fn from_f32(v: f32) -> Self;
    #[doc(hidden)]
    const K: Kernels<Self>;
}

type Dims = Launch;

mod ffi {
    use super::Dims;
    use half::{bf16, f16};
    use std::os::raw::c_int;

    macro_rules! instance {
        ($t:ty, $cf:ident, $cb:ident, $st:ident, $ap:ident, $br:ident, $ba:ident, $au:ident, $ag:ident) => {
            extern "C" {
                pub fn $cf(
                    d: Dims,
                    y: *mut $t,
                    ldy: c_int,
                    y_off: c_int,
                    x: *const $t,
                    p: c_int,
                    c: c_int,
                );
                pub fn $cb(
                    d: Dims,
                    dx: *mut $t,
                    dy: *const $t,
                    ldy: c_int,
                    dy_off: c_int,
                    p: c_int,
                    c: c_int,
                );
                pub fn $st(
                    d: Dims,
                    mean: *mut f32,
                    invstd: *mut f32,
                    running_mean: *mut f32,
                    running_var: *mut f32,
                    workspace: *mut f64,
                    counters: *mut c_int,
                    x: *const $t,
                    p: c_int,
                    c: c_int,
                    eps: f32,
                    momentum: f32,
                );
                pub fn $ap(
                    d: Dims,
                    y: *mut $t,
                    ldy: c_int,
                    y_off: c_int,
                    x: *const $t,
                    mean: *const f32,
                    invstd: *const f32,
                    gamma: *const f32,
                    beta: *const f32,
                    p: c_int,
                    c: c_int,
                    relu: c_int,
                );
                pub fn $br(
                    d: Dims,
                    coef: *mut f32,
                    dgamma: *mut f32,
                    dbeta: *mut f32,
                    workspace: *mut f64,
                    counters: *mut c_int,
                    dy: *const $t,
                    ld_dy: c_int,
                    dy_off: c_int,
                    y: *const $t,
                    ld_y: c_int,
                    y_off: c_int,
                    x: *const $t,
                    mean: *const f32,
                    invstd: *const f32,
                    gamma: *const f32,
                    p: c_int,
                    c: c_int,
                    relu: c_int,
                );
                pub fn $ba(
                    d: Dims,
                    dx: *mut $t,
                    dy: *const $t,
                    ld_dy: c_int,
                    dy_off: c_int,
                    y: *const $t,
                    ld_y: c_int,
                    y_off: c_int,
                    x: *const $t,
                    mean: *const f32,
                    coef: *const f32,
                    p: c_int,
                    c: c_int,
                    relu: c_int,
                );
                pub fn $au(
                    d: Dims,
                    master: *mut f32,
                    grad: *const $t,
                    n: c_int,
                    scale: *const f32,
                    found_inf: *mut c_int,
                );
                pub fn $ag(
                    d: Dims,
                    out: *mut $t,
                    labels_out: *mut c_int,
                    records: *const u8,
                    n_records: c_int,
                    indices: *const c_int,
                    dy: *const c_int,
                    dx: *const c_int,
                    flip: *const c_int,
                    mean: *const f32,
                    stdev: *const f32,
                    batch: c_int,
                );
            }
        };
    }
    instance!(
        f32,
        emu_concat_forward_f32,
        emu_concat_backward_f32,
        emu_batch_norm_stats_f32,
        emu_batch_norm_relu_apply_f32,
        emu_batch_norm_relu_backward_reduce_f32,
        emu_batch_norm_relu_backward_apply_f32,
        emu_amp_unscale_f32,
        emu_augment_batch_f32
    );
    instance!(
        f16,
        emu_concat_forward_f16,
        emu_concat_backward_f16,
        emu_batch_norm_stats_f16,
        emu_batch_norm_relu_apply_f16,
        emu_batch_norm_relu_backward_reduce_f16,
        emu_batch_norm_relu_backward_apply_f16,
        emu_amp_unscale_f16,
        emu_augment_batch_f16
    );
    instance!(
        bf16,
        emu_concat_forward_bf16,
        emu_concat_backward_bf16,
        emu_batch_norm_stats_bf16,
        emu_batch_norm_relu_apply_bf16,
        emu_batch_norm_relu_backward_reduce_bf16,
        emu_batch_norm_relu_backward_apply_bf16,
        emu_amp_unscale_bf16,
        emu_augment_batch_bf16
    );

    extern "C" {
        pub fn emu_batch_norm_eval_invstd(
            d: Dims,
            invstd: *mut f32,
            running_var: *const f32,
            c: c_int,
            eps: f32,
        );
        pub fn emu_cross_entropy_forward_backward(
            d: Dims,
            dlogits: *mut f32,
            loss: *mut f32,
            correct: *mut c_int,
            logits: *const f32,
            labels: *const c_int,
            n: c_int,
            k: c_int,
            smoothing: f32,
            loss_scale: *const f32,
        );
        pub fn emu_sgd_step(
            d: Dims,
            param: *mut f32,
            grad: *const f32,
            momentum_buf: *mut f32,
            n: c_int,
            lr: f32,
            momentum: f32,
            weight_decay: f32,
            nesterov: c_int,
            first_step: c_int,
            found_inf: *const c_int,
            lr_device: *const f32,
        );
        pub fn emu_update_loss_scale(
            d: Dims,
            scale: *mut f32,
            growth_tracker: *mut c_int,
            found_inf: *mut c_int,
            skipped_steps: *mut c_int,
            growth_factor: f32,
            backoff_factor: f32,
            growth_interval: c_int,
        );
        pub fn emu_float2half_bits(v: f32) -> u16;
        pub fn emu_half_bits2float(b: u16) -> f32;
        pub fn emu_float2bfloat16_bits(v: f32) -> u16;
        pub fn emu_bfloat16_bits2float(b: u16) -> f32;
    }
}

/// The launch wrappers of one instantiation of the activation-typed kernels.
#[doc(hidden)]
#[allow(clippy::type_complexity)]
pub struct Kernels<T: 'static> {
    concat_forward: unsafe extern "C" fn(Dims, *mut T, c_int, c_int, *const T, c_int, c_int),
    concat_backward: unsafe extern "C" fn(Dims, *mut T, *const T, c_int, c_int, c_int, c_int),
    batch_norm_stats: unsafe extern "C" fn(
        Dims,
        *mut f32,
        *mut f32,
        *mut f32,
        *mut f32,
        *mut f64,
        *mut c_int,
        *const T,
        c_int,
        c_int,
        f32,
        f32,
    ),
    batch_norm_relu_apply: unsafe extern "C" fn(
        Dims,
        *mut T,
        c_int,
        c_int,
        *const T,
        *const f32,
        *const f32,
        *const f32,
        *const f32,
        c_int,
        c_int,
        c_int,
    ),
    batch_norm_relu_backward_reduce: unsafe extern "C" fn(
        Dims,
        *mut f32,
        *mut f32,
        *mut f32,
        *mut f64,
        *mut c_int,
        *const T,
        c_int,
        c_int,
        *const T,
        c_int,
        c_int,
        *const T,
        *const f32,
        *const f32,
        *const f32,
        c_int,
        c_int,
        c_int,
    ),
    batch_norm_relu_backward_apply: unsafe extern "C" fn(
        Dims,
        *mut T,
        *const T,
        c_int,
        c_int,
        *const T,
        c_int,
        c_int,
        *const T,
        *const f32,
        *const f32,
        c_int,
        c_int,
        c_int,
    ),
    amp_unscale: unsafe extern "C" fn(Dims, *mut f32, *const T, c_int, *const f32, *mut c_int),
    augment_batch: unsafe extern "C" fn(
        Dims,
        *mut T,
        *mut c_int,
        *const u8,
        c_int,
        *const c_int,
        *const c_int,
        *const c_int,
        *const c_int,
        *const f32,
        *const f32,
        c_int,
    ),
}

macro_rules! act {
    ($t:ty, $name:literal, $to:expr, $from:expr, $cf:ident, $cb:ident, $st:ident, $ap:ident, $br:ident, $ba:ident, $au:ident, $ag:ident) => {
        impl Act for $t {
            const NAME: &'static str = $name;
            fn to_f32(self) -> f32 {
                $to(self)
            }
            fn from_f32(v: f32) -> Self {
                $from(v)
            }
            const K: Kernels<Self> = Kernels {
                concat_forward: ffi::$cf,
                concat_backward: ffi::$cb,
                batch_norm_stats: ffi::$st,
                batch_norm_relu_apply: ffi::$ap,
                batch_norm_relu_backward_reduce: ffi::$br,
                batch_norm_relu_backward_apply: ffi::$ba,
                amp_unscale: ffi::$au,
                augment_batch: ffi::$ag,
            };
        }
    };
}

act!(
    f32,
    "f32",
    |v: f32| v,
    |v: f32| v,
    emu_concat_forward_f32,
    emu_concat_backward_f32,
    emu_batch_norm_stats_f32,
    emu_batch_norm_relu_apply_f32,
    emu_batch_norm_relu_backward_reduce_f32,
    emu_batch_norm_relu_backward_apply_f32,
    emu_amp_unscale_f32,
    emu_augment_batch_f32
);
act!(
    f16,
    "f16",
    |v: f16| v.to_f32(),
    f16::from_f32,
    emu_concat_forward_f16,
    emu_concat_backward_f16,
    emu_batch_norm_stats_f16,
    emu_batch_norm_relu_apply_f16,
    emu_batch_norm_relu_backward_reduce_f16,
    emu_batch_norm_relu_backward_apply_f16,
    emu_amp_unscale_f16,
    emu_augment_batch_f16
);
act!(
    bf16,
    "bf16",
    |v: bf16| v.to_f32(),
    bf16::from_f32,
    emu_concat_forward_bf16,
    emu_concat_backward_bf16,
    emu_batch_norm_stats_bf16,
    emu_batch_norm_relu_apply_bf16,
    emu_batch_norm_relu_backward_reduce_bf16,
    emu_batch_norm_relu_backward_apply_bf16,
    emu_amp_unscale_bf16,
    emu_augment_batch_bf16
);

fn int(v: usize, what: &str) -> c_int {
    c_int::try_from(v).unwrap_or_else(|_| panic!("{what} = {v} does not fit a C int"))
}

/// Checks that a `[p, ld]` matrix read or written at columns `off..off + c` fits in `len`.
fn check_cols(len: usize, p: usize, c: usize, ld: usize, off: usize, what: &str) {
    assert!(
        off + c <= ld,
        "{what}: columns {off}..{} exceed the row length {ld}",
        off + c
    );
    if p > 0 && c > 0 {
        let need = (p - 1) * ld + off + c;
        assert!(
            len >= need,
            "{what}: {len} elements, the kernel touches {need}"
        );
    }
    int(p * ld, what);
}

fn check_len<T>(s: &[T], need: usize, what: &str) {
    assert!(
        s.len() >= need,
        "{what}: {} elements, the kernel needs {need}",
        s.len()
    );
}

/// A `[p, ld]` row-major matrix read at columns `off..off + c`: a channel slice of a wider NHWC
/// tensor (`ld` = its channels), or a whole tensor (`ld = c`, `off = 0`).
#[derive(Clone, Copy, Debug)]
pub struct Cols<'a, T> {
    pub data: &'a [T],
    pub ld: usize,
    pub off: usize,
}

impl<'a, T> Cols<'a, T> {
    /// A whole `[p, c]` tensor.
    pub fn whole(data: &'a [T], c: usize) -> Self {
        Cols {
            data,
            ld: c,
            off: 0,
        }
    }
}

/// `concat_forward_*`: `y[p·ldy + y_off + c] = x[p·C + c]`.
#[allow(clippy::too_many_arguments)]
pub fn concat_forward<T: Act>(
    l: Launch,
    y: &mut [T],
    ldy: usize,
    y_off: usize,
    x: &[T],
    p: usize,
    c: usize,
) {
    l.check();
    check_cols(y.len(), p, c, ldy, y_off, "concat_forward y");
    check_len(x, p * c, "concat_forward x");
    // SAFETY: the checks above bound every index the kernel touches; the slices do not alias.
    unsafe {
        (T::K.concat_forward)(
            l,
            y.as_mut_ptr(),
            int(ldy, "ldy"),
            int(y_off, "y_off"),
            x.as_ptr(),
            int(p, "P"),
            int(c, "C"),
        )
    }
}

/// `concat_backward_*`: `dx[p·C + c] = dy[p·ldy + dy_off + c]`.
pub fn concat_backward<T: Act>(l: Launch, dx: &mut [T], dy: Cols<T>, p: usize, c: usize) {
    l.check();
    check_len(dx, p * c, "concat_backward dx");
    check_cols(dy.data.len(), p, c, dy.ld, dy.off, "concat_backward dy");
    // SAFETY: as concat_forward.
    unsafe {
        (T::K.concat_backward)(
            l,
            dx.as_mut_ptr(),
            dy.data.as_ptr(),
            int(dy.ld, "ldy"),
            int(dy.off, "dy_off"),
            int(p, "P"),
            int(c, "C"),
        )
    }
}

/// Checks the geometry of the two grid-wide BN reductions and returns the workspace (2·G·C
/// doubles) and the zeroed counters (one per channel group).
fn bn_reduction_buffers(l: Launch, c: usize, what: &str) -> (Vec<f64>, Vec<c_int>) {
    l.check();
    let [bx, by, bz] = l.block;
    assert!(
        bx <= 32 && by <= 32 && bz == 1,
        "{what}: block {:?}, must be (≤32, ≤32, 1)",
        l.block
    );
    assert_eq!(
        l.grid[0] as usize,
        c.div_ceil(bx as usize),
        "{what}: grid.x must be ceil(C / block.x)"
    );
    assert_eq!(l.grid[2], 1, "{what}: grid.z must be 1");
    let g = l.grid[1] as usize;
    (vec![0.0; 2 * g * c], vec![0; l.grid[0] as usize])
}

fn assert_counters_reset(counters: &[c_int], what: &str) {
    assert!(
        counters.iter().all(|&v| v == 0),
        "{what}: the last block did not reset the counters: {counters:?}"
    );
}

/// `batch_norm_stats_*` over `x` `[p, c]`: writes the batch `mean` and `invstd`, and updates
/// `running = (running_mean, running_var)` when given. Workspace and counters are allocated
/// here; the counters are checked to come back zero (the kernel's reset).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_stats<T: Act>(
    l: Launch,
    mean: &mut [f32],
    invstd: &mut [f32],
    running: Option<(&mut [f32], &mut [f32])>,
    x: &[T],
    p: usize,
    c: usize,
    eps: f32,
    momentum: f32,
) {
    let (mut ws, mut counters) = bn_reduction_buffers(l, c, "batch_norm_stats");
    check_len(mean, c, "mean");
    check_len(invstd, c, "invstd");
    check_len(x, p * c, "x");
    int(p * c, "P·C");
    let (rm, rv) = match running {
        Some((rm, rv)) => {
            check_len(rm, c, "running_mean");
            check_len(rv, c, "running_var");
            (rm.as_mut_ptr(), rv.as_mut_ptr())
        }
        None => (std::ptr::null_mut(), std::ptr::null_mut()),
    };
    // SAFETY: every buffer holds what the kernel indexes (C channels, P·C values, 2·G·C
    // workspace doubles, grid.x counters); the running statistics are distinct slices.
    unsafe {
        (T::K.batch_norm_stats)(
            l,
            mean.as_mut_ptr(),
            invstd.as_mut_ptr(),
            rm,
            rv,
            ws.as_mut_ptr(),
            counters.as_mut_ptr(),
            x.as_ptr(),
            int(p, "P"),
            int(c, "C"),
            eps,
            momentum,
        )
    }
    assert_counters_reset(&counters, "batch_norm_stats");
}

/// `batch_norm_relu_apply_*`: `y[p·ldy + y_off + c] = relu?((x − mean)·invstd·gamma + beta)`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_relu_apply<T: Act>(
    l: Launch,
    y: &mut [T],
    ldy: usize,
    y_off: usize,
    x: &[T],
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    beta: &[f32],
    p: usize,
    c: usize,
    relu: bool,
) {
    l.check();
    check_cols(y.len(), p, c, ldy, y_off, "batch_norm_relu_apply y");
    check_len(x, p * c, "x");
    for (s, what) in [
        (mean, "mean"),
        (invstd, "invstd"),
        (gamma, "gamma"),
        (beta, "beta"),
    ] {
        check_len(s, c, what);
    }
    // SAFETY: bounds checked above; y is the only buffer written.
    unsafe {
        (T::K.batch_norm_relu_apply)(
            l,
            y.as_mut_ptr(),
            int(ldy, "ldy"),
            int(y_off, "y_off"),
            x.as_ptr(),
            mean.as_ptr(),
            invstd.as_ptr(),
            gamma.as_ptr(),
            beta.as_ptr(),
            int(p, "P"),
            int(c, "C"),
            relu as c_int,
        )
    }
}

/// `batch_norm_relu_backward_reduce_*`: `coef` (3·C: a | b | c0 of dx = a·dy' + b·(x − mean)
/// + c0), `dgamma += Σdy'·x̂`, `dbeta += Σdy'` (each when given).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_relu_backward_reduce<T: Act>(
    l: Launch,
    coef: &mut [f32],
    dgamma: Option<&mut [f32]>,
    dbeta: Option<&mut [f32]>,
    dy: Cols<T>,
    y: Cols<T>,
    x: &[T],
    mean: &[f32],
    invstd: &[f32],
    gamma: &[f32],
    p: usize,
    c: usize,
    relu: bool,
) {
    let (mut ws, mut counters) = bn_reduction_buffers(l, c, "batch_norm_relu_backward_reduce");
    check_len(coef, 3 * c, "coef");
    check_cols(dy.data.len(), p, c, dy.ld, dy.off, "dy");
    check_cols(y.data.len(), p, c, y.ld, y.off, "y");
    check_len(x, p * c, "x");
    for (s, what) in [(mean, "mean"), (invstd, "invstd"), (gamma, "gamma")] {
        check_len(s, c, what);
    }
    let opt = |s: Option<&mut [f32]>, what: &str| match s {
        Some(s) => {
            check_len(s, c, what);
            s.as_mut_ptr()
        }
        None => std::ptr::null_mut(),
    };
    let (dg, db) = (opt(dgamma, "dgamma"), opt(dbeta, "dbeta"));
    // SAFETY: bounds checked above; the written buffers (coef, dgamma, dbeta, workspace,
    // counters) are distinct mutable borrows.
    unsafe {
        (T::K.batch_norm_relu_backward_reduce)(
            l,
            coef.as_mut_ptr(),
            dg,
            db,
            ws.as_mut_ptr(),
            counters.as_mut_ptr(),
            dy.data.as_ptr(),
            int(dy.ld, "ld_dy"),
            int(dy.off, "dy_off"),
            y.data.as_ptr(),
            int(y.ld, "ld_y"),
            int(y.off, "y_off"),
            x.as_ptr(),
            mean.as_ptr(),
            invstd.as_ptr(),
            gamma.as_ptr(),
            int(p, "P"),
            int(c, "C"),
            relu as c_int,
        )
    }
    assert_counters_reset(&counters, "batch_norm_relu_backward_reduce");
}

/// `batch_norm_relu_backward_apply_*`: `dx = a·dy' + b·(x − mean) + c0`, dx `[p, c]`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_relu_backward_apply<T: Act>(
    l: Launch,
    dx: &mut [T],
    dy: Cols<T>,
    y: Cols<T>,
    x: &[T],
    mean: &[f32],
    coef: &[f32],
    p: usize,
    c: usize,
    relu: bool,
) {
    l.check();
    check_len(dx, p * c, "dx");
    check_cols(dy.data.len(), p, c, dy.ld, dy.off, "dy");
    check_cols(y.data.len(), p, c, y.ld, y.off, "y");
    check_len(x, p * c, "x");
    check_len(mean, c, "mean");
    check_len(coef, 3 * c, "coef");
    // SAFETY: bounds checked above; dx is the only buffer written.
    unsafe {
        (T::K.batch_norm_relu_backward_apply)(
            l,
            dx.as_mut_ptr(),
            dy.data.as_ptr(),
            int(dy.ld, "ld_dy"),
            int(dy.off, "dy_off"),
            y.data.as_ptr(),
            int(y.ld, "ld_y"),
            int(y.off, "y_off"),
            x.as_ptr(),
            mean.as_ptr(),
            coef.as_ptr(),
            int(p, "P"),
            int(c, "C"),
            relu as c_int,
        )
    }
}

/// `batch_norm_eval_invstd`: `invstd[c] = 1/√(running_var[c] + eps)`.
pub fn batch_norm_eval_invstd(l: Launch, invstd: &mut [f32], running_var: &[f32], eps: f32) {
    l.check();
    assert_eq!(invstd.len(), running_var.len(), "invstd and running_var");
    // SAFETY: both slices hold C values.
    unsafe {
        ffi::emu_batch_norm_eval_invstd(
            l,
            invstd.as_mut_ptr(),
            running_var.as_ptr(),
            int(invstd.len(), "C"),
            eps,
        )
    }
}

mod elementwise_ffi {
    use super::Launch as Dims;
    use std::ffi::c_int;
    extern "C" {
        pub fn emu_relu_forward_f32(d: Dims, y: *mut f32, x: *const f32, n: c_int);
        pub fn emu_relu_backward_f32(d: Dims, dy: *mut f32, y: *const f32, n: c_int);
        pub fn emu_fork_backward_f32(
            d: Dims,
            dx: *mut f32,
            a: *const f32,
            b: *const f32,
            c: *const f32,
            e: *const f32,
            n: c_int,
        );
    }
}

/// `relu_forward_f32`: `y = max(x, 0)`, NaN passing through.
pub fn relu_forward(l: Launch, y: &mut [f32], x: &[f32]) {
    l.check();
    assert_eq!(y.len(), x.len(), "relu_forward y and x");
    // SAFETY: both slices hold n values.
    unsafe {
        elementwise_ffi::emu_relu_forward_f32(l, y.as_mut_ptr(), x.as_ptr(), int(x.len(), "n"))
    }
}

/// `relu_backward_f32`: `dy *= [y > 0]` in place.
pub fn relu_backward(l: Launch, dy: &mut [f32], y: &[f32]) {
    l.check();
    assert_eq!(dy.len(), y.len(), "relu_backward dy and y");
    // SAFETY: both slices hold n values.
    unsafe {
        elementwise_ffi::emu_relu_backward_f32(l, dy.as_mut_ptr(), y.as_ptr(), int(y.len(), "n"))
    }
}

/// `fork_backward_f32`: `dx = Σ parts` in order (one to four parts; absent ones are null).
pub fn fork_backward(l: Launch, dx: &mut [f32], parts: &[&[f32]]) {
    l.check();
    assert!((1..=4).contains(&parts.len()), "one to four parts");
    for p in parts {
        assert_eq!(p.len(), dx.len(), "fork_backward part length");
    }
    let ptr = |i: usize| parts.get(i).map_or(std::ptr::null(), |p| p.as_ptr());
    // SAFETY: every non-null pointer covers n values; dx does not alias the parts.
    unsafe {
        elementwise_ffi::emu_fork_backward_f32(
            l,
            dx.as_mut_ptr(),
            ptr(0),
            ptr(1),
            ptr(2),
            ptr(3),
            int(dx.len(), "n"),
        )
    }
}

/// What `cross_entropy_forward_backward` writes besides the gradient.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossOut {
    /// Mean loss over the batch.
    pub loss: f32,
    /// Rows whose argmax is the label.
    pub correct: i32,
}

/// `cross_entropy_forward_backward`: `dlogits = (softmax − target)/N · loss_scale` (1 when
/// `None`), the mean loss and the correct count. logits `[labels.len(), k]`.
pub fn cross_entropy_forward_backward(
    l: Launch,
    dlogits: &mut [f32],
    logits: &[f32],
    labels: &[i32],
    k: usize,
    smoothing: f32,
    loss_scale: Option<f32>,
) -> LossOut {
    l.check();
    assert_eq!(l.grid, [1, 1, 1], "cross_entropy: one block");
    assert!(
        l.block[0].is_multiple_of(32) && l.block[1] == 1 && l.block[2] == 1,
        "cross_entropy: block.x a multiple of 32"
    );
    let n = labels.len();
    check_len(logits, n * k, "logits");
    check_len(dlogits, n * k, "dlogits");
    let (mut loss, mut correct) = (f32::NAN, -1);
    let scale = loss_scale.unwrap_or(1.0);
    let scale_ptr = if loss_scale.is_some() {
        &scale as *const f32
    } else {
        std::ptr::null()
    };
    // SAFETY: N·K logits and gradients, N labels, one loss and one count.
    unsafe {
        ffi::emu_cross_entropy_forward_backward(
            l,
            dlogits.as_mut_ptr(),
            &mut loss,
            &mut correct,
            logits.as_ptr(),
            labels.as_ptr(),
            int(n, "N"),
            int(k, "K"),
            smoothing,
            scale_ptr,
        )
    }
    LossOut { loss, correct }
}

/// `amp_unscale_*`: `master = grad / scale`; sets `*found_inf = 1` on inf/NaN (never clears).
pub fn amp_unscale<T: Act>(
    l: Launch,
    master: &mut [f32],
    grad: &[T],
    scale: f32,
    found_inf: &mut i32,
) {
    l.check();
    assert_eq!(master.len(), grad.len(), "master and grad");
    // SAFETY: both hold n values; scale and found_inf are single values.
    unsafe {
        (T::K.amp_unscale)(
            l,
            master.as_mut_ptr(),
            grad.as_ptr(),
            int(grad.len(), "n"),
            &scale,
            found_inf,
        )
    }
}

/// `amp_unscale_f32` in place (`master` and `grad` the same buffer), as the kernel allows.
pub fn amp_unscale_in_place(l: Launch, grad: &mut [f32], scale: f32, found_inf: &mut i32) {
    l.check();
    let ptr = grad.as_mut_ptr();
    // SAFETY: the kernel reads and then writes each element from the same thread.
    unsafe { (f32::K.amp_unscale)(l, ptr, ptr, int(grad.len(), "n"), &scale, found_inf) }
}

/// The hyper-parameters of `sgd_step`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdArgs {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
    pub first_step: bool,
    /// The overflow flag the kernel reads (`None`: null pointer, never skips).
    pub found_inf: Option<i32>,
    /// A learning rate read from "device memory" instead of `lr`.
    pub lr_device: Option<f32>,
}

/// `sgd_step` over flat buffers. `momentum_buf` may be empty when `momentum == 0`.
pub fn sgd_step(l: Launch, param: &mut [f32], grad: &[f32], momentum_buf: &mut [f32], a: &SgdArgs) {
    l.check();
    let n = param.len();
    check_len(grad, n, "grad");
    let mom = if a.momentum != 0.0 {
        check_len(momentum_buf, n, "momentum_buf");
        momentum_buf.as_mut_ptr()
    } else {
        std::ptr::null_mut()
    };
    let flag = a.found_inf.unwrap_or(0);
    let lr_dev = a.lr_device.unwrap_or(0.0);
    // SAFETY: n values in each buffer; the optional scalars live on this stack frame.
    unsafe {
        ffi::emu_sgd_step(
            l,
            param.as_mut_ptr(),
            grad.as_ptr(),
            mom,
            int(n, "n"),
            a.lr,
            a.momentum,
            a.weight_decay,
            a.nesterov as c_int,
            a.first_step as c_int,
            if a.found_inf.is_some() {
                &flag
            } else {
                std::ptr::null()
            },
            if a.lr_device.is_some() {
                &lr_dev
            } else {
                std::ptr::null()
            },
        )
    }
}

/// The device-resident state of dynamic loss scaling.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScale {
    pub scale: f32,
    pub growth_tracker: i32,
    pub found_inf: i32,
    pub skipped_steps: i32,
}

/// `update_loss_scale` (grid 1, block 1).
pub fn update_loss_scale(
    s: &mut LossScale,
    growth_factor: f32,
    backoff_factor: f32,
    growth_interval: i32,
) {
    // SAFETY: four distinct scalars.
    unsafe {
        ffi::emu_update_loss_scale(
            Launch::linear(1, 1),
            &mut s.scale,
            &mut s.growth_tracker,
            &mut s.found_inf,
            &mut s.skipped_steps,
            growth_factor,
            backoff_factor,
            growth_interval,
        )
    }
}

/// Bytes per CIFAR-10 record: the label, then the R, G, B planes of 32×32.
pub const RECORD: usize = 3073;

/// Per-image parameters of `augment_batch_*`.
#[derive(Clone, Copy, Debug)]
pub struct AugmentArgs<'a> {
    pub indices: &'a [i32],
    pub dy: &'a [i32],
    pub dx: &'a [i32],
    pub flip: &'a [i32],
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// `augment_batch_*`: `out` `[batch, 32, 32, 3]`, `labels` `[batch]`.
pub fn augment_batch<T: Act>(
    l: Launch,
    out: &mut [T],
    labels: &mut [i32],
    records: &[u8],
    a: &AugmentArgs,
) {
    l.check();
    let batch = a.indices.len();
    assert!(
        a.dy.len() == batch && a.dx.len() == batch && a.flip.len() == batch,
        "augment_batch: indices, dy, dx and flip differ in length"
    );
    assert_eq!(records.len() % RECORD, 0, "records: whole records");
    check_len(out, batch * 3072, "out");
    check_len(labels, batch, "labels");
    // SAFETY: the kernel reads records only for indices in 0..n_records (others give NaN), and
    // writes batch·3072 values and batch labels.
    unsafe {
        (T::K.augment_batch)(
            l,
            out.as_mut_ptr(),
            labels.as_mut_ptr(),
            records.as_ptr(),
            int(records.len() / RECORD, "n_records"),
            a.indices.as_ptr(),
            a.dy.as_ptr(),
            a.dx.as_ptr(),
            a.flip.as_ptr(),
            a.mean.as_ptr(),
            a.std.as_ptr(),
            int(batch, "batch"),
        )
    }
}

/// The emulation's `__float2half` (its bits).
pub fn emu_f32_to_f16_bits(v: f32) -> u16 {
    // SAFETY: pure function of its argument.
    unsafe { ffi::emu_float2half_bits(v) }
}
/// The emulation's `__half2float`.
pub fn emu_f16_bits_to_f32(b: u16) -> f32 {
    // SAFETY: pure function of its argument.
    unsafe { ffi::emu_half_bits2float(b) }
}
/// The emulation's `__float2bfloat16` (its bits).
pub fn emu_f32_to_bf16_bits(v: f32) -> u16 {
    // SAFETY: pure function of its argument.
    unsafe { ffi::emu_float2bfloat16_bits(v) }
}
/// The emulation's `__bfloat162float`.
pub fn emu_bf16_bits_to_f32(b: u16) -> f32 {
    // SAFETY: pure function of its argument.
    unsafe { ffi::emu_bfloat16_bits2float(b) }
}
