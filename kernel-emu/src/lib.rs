//! Runs the CUDA kernels of `../cuda/*.cu` on the CPU, for tests.
//!
//! `build.rs` compiles the very same sources with the host C++ compiler (`-DINCEPT_EMU`), where
//! `cuda/emu.h` supplies the CUDA built-ins: blocks run one after another (in blockIdx order,
//! or a seeded random one: [`Launch::shuffled`]), the threads of a block run as real host
//! threads with `__syncthreads` as a barrier, warp shuffles exchange values through per-warp
//! slots. This crate only launches them: every function here takes
//! slices, checks that they are large enough for what the kernel will touch, and runs the
//! kernel with the launch geometry given. None of the kernels' arithmetic is written in Rust.
//!
//! Activation-typed kernels are generic over [`Act`]: `f32`, [`half::f16`] (`__half`) and
//! [`half::bf16`] (`__nv_bfloat16`), which have the same bits on both sides.

use half::{bf16, f16};
use std::os::raw::c_int;

/// A launch geometry: `grid` blocks of `block` threads (x, y, z each), and the order the
/// emulation runs the blocks in.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// 0: blocks one after another in blockIdx order; otherwise the seed of a random order.
    /// A GPU promises no order, so a kernel's result must be the same for every seed.
    pub order: u64,
}

impl Launch {
    /// A 1-D grid of 1-D blocks.
    pub fn linear(grid: u32, block: u32) -> Launch {
        Launch {
            grid: [grid, 1, 1],
            block: [block, 1, 1],
            order: 0,
        }
    }
    /// 2-D grid and block.
    pub fn grid2(grid: (u32, u32), block: (u32, u32)) -> Launch {
        Launch {
            grid: [grid.0, grid.1, 1],
            block: [block.0, block.1, 1],
            order: 0,
        }
    }
    /// The same launch with its blocks run in the random order drawn from `seed` (0: in
    /// blockIdx order).
    pub fn shuffled(self, seed: u64) -> Launch {
        Launch {
            order: seed,
            ..self
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

    // The launch wrappers of one instantiation, each name given with its kernel's label, so a
    // misplaced name (several kernels share a signature) cannot compile.
    macro_rules! instance {
        (
            $t:ty,
            concat_forward: $cf:ident,
            concat_backward: $cb:ident,
            batch_norm_stats: $st:ident,
            batch_norm_relu_apply: $ap:ident,
            batch_norm_relu_backward_reduce: $br:ident,
            batch_norm_relu_backward_apply: $ba:ident,
            amp_unscale: $au:ident,
            augment_batch: $ag:ident,
            relu_forward: $rf:ident,
            relu_backward: $rb:ident,
            fork_backward: $fb:ident,
            convert_from_f32: $cvf:ident,
            convert_to_f32: $cvt:ident,
            weight_oihw_to_ohwi: $w2o:ident,
            add_ohwi_to_oihw: $o2w:ident,
            bias_add: $bad:ident,
            bias_grad: $bgr:ident,
            avg_pool2d_backward: $apb:ident,
        ) => {
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
                pub fn $rf(d: Dims, y: *mut $t, x: *const $t, n: c_int);
                pub fn $rb(d: Dims, dy: *mut $t, y: *const $t, n: c_int);
                pub fn $fb(
                    d: Dims,
                    dx: *mut $t,
                    a: *const $t,
                    b: *const $t,
                    c: *const $t,
                    e: *const $t,
                    n: c_int,
                );
                pub fn $cvf(d: Dims, dst: *mut $t, src: *const f32, n: c_int);
                pub fn $cvt(d: Dims, dst: *mut f32, src: *const $t, n: c_int);
                pub fn $w2o(d: Dims, dst: *mut $t, src: *const f32, k: c_int, c: c_int, rs: c_int);
                pub fn $o2w(d: Dims, grad: *mut f32, g: *const $t, k: c_int, c: c_int, rs: c_int);
                pub fn $bad(d: Dims, y: *mut $t, b: *const f32, p: c_int, c: c_int);
                pub fn $bgr(
                    d: Dims,
                    db: *mut f32,
                    workspace: *mut f64,
                    counters: *mut c_int,
                    dy: *const $t,
                    p: c_int,
                    c: c_int,
                    r: c_int,
                );
                pub fn $apb(
                    d: Dims,
                    dx: *mut $t,
                    dy: *const $t,
                    n: c_int,
                    h: c_int,
                    w: c_int,
                    c: c_int,
                );
            }
        };
    }
    instance!(
        f32,
        concat_forward: emu_concat_forward_f32,
        concat_backward: emu_concat_backward_f32,
        batch_norm_stats: emu_batch_norm_stats_f32,
        batch_norm_relu_apply: emu_batch_norm_relu_apply_f32,
        batch_norm_relu_backward_reduce: emu_batch_norm_relu_backward_reduce_f32,
        batch_norm_relu_backward_apply: emu_batch_norm_relu_backward_apply_f32,
        amp_unscale: emu_amp_unscale_f32,
        augment_batch: emu_augment_batch_f32,
        relu_forward: emu_relu_forward_f32,
        relu_backward: emu_relu_backward_f32,
        fork_backward: emu_fork_backward_f32,
        convert_from_f32: emu_convert_from_f32_f32,
        convert_to_f32: emu_convert_to_f32_f32,
        weight_oihw_to_ohwi: emu_weight_oihw_to_ohwi_f32,
        add_ohwi_to_oihw: emu_add_ohwi_to_oihw_f32,
        bias_add: emu_bias_add_f32,
        bias_grad: emu_bias_grad_f32,
        avg_pool2d_backward: emu_avg_pool2d_backward_f32,
    );
    instance!(
        f16,
        concat_forward: emu_concat_forward_f16,
        concat_backward: emu_concat_backward_f16,
        batch_norm_stats: emu_batch_norm_stats_f16,
        batch_norm_relu_apply: emu_batch_norm_relu_apply_f16,
        batch_norm_relu_backward_reduce: emu_batch_norm_relu_backward_reduce_f16,
        batch_norm_relu_backward_apply: emu_batch_norm_relu_backward_apply_f16,
        amp_unscale: emu_amp_unscale_f16,
        augment_batch: emu_augment_batch_f16,
        relu_forward: emu_relu_forward_f16,
        relu_backward: emu_relu_backward_f16,
        fork_backward: emu_fork_backward_f16,
        convert_from_f32: emu_convert_from_f32_f16,
        convert_to_f32: emu_convert_to_f32_f16,
        weight_oihw_to_ohwi: emu_weight_oihw_to_ohwi_f16,
        add_ohwi_to_oihw: emu_add_ohwi_to_oihw_f16,
        bias_add: emu_bias_add_f16,
        bias_grad: emu_bias_grad_f16,
        avg_pool2d_backward: emu_avg_pool2d_backward_f16,
    );
    instance!(
        bf16,
        concat_forward: emu_concat_forward_bf16,
        concat_backward: emu_concat_backward_bf16,
        batch_norm_stats: emu_batch_norm_stats_bf16,
        batch_norm_relu_apply: emu_batch_norm_relu_apply_bf16,
        batch_norm_relu_backward_reduce: emu_batch_norm_relu_backward_reduce_bf16,
        batch_norm_relu_backward_apply: emu_batch_norm_relu_backward_apply_bf16,
        amp_unscale: emu_amp_unscale_bf16,
        augment_batch: emu_augment_batch_bf16,
        relu_forward: emu_relu_forward_bf16,
        relu_backward: emu_relu_backward_bf16,
        fork_backward: emu_fork_backward_bf16,
        convert_from_f32: emu_convert_from_f32_bf16,
        convert_to_f32: emu_convert_to_f32_bf16,
        weight_oihw_to_ohwi: emu_weight_oihw_to_ohwi_bf16,
        add_ohwi_to_oihw: emu_add_ohwi_to_oihw_bf16,
        bias_add: emu_bias_add_bf16,
        bias_grad: emu_bias_grad_bf16,
        avg_pool2d_backward: emu_avg_pool2d_backward_bf16,
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
        pub fn emu_accumulate_step_metrics(
            d: Dims,
            sums: *mut f64,
            loss: *const f32,
            correct: *const c_int,
            n: c_int,
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
    relu_forward: unsafe extern "C" fn(Dims, *mut T, *const T, c_int),
    relu_backward: unsafe extern "C" fn(Dims, *mut T, *const T, c_int),
    fork_backward:
        unsafe extern "C" fn(Dims, *mut T, *const T, *const T, *const T, *const T, c_int),
    convert_from_f32: unsafe extern "C" fn(Dims, *mut T, *const f32, c_int),
    convert_to_f32: unsafe extern "C" fn(Dims, *mut f32, *const T, c_int),
    weight_oihw_to_ohwi: unsafe extern "C" fn(Dims, *mut T, *const f32, c_int, c_int, c_int),
    add_ohwi_to_oihw: unsafe extern "C" fn(Dims, *mut f32, *const T, c_int, c_int, c_int),
    bias_add: unsafe extern "C" fn(Dims, *mut T, *const f32, c_int, c_int),
    bias_grad:
        unsafe extern "C" fn(Dims, *mut f32, *mut f64, *mut c_int, *const T, c_int, c_int, c_int),
    avg_pool2d_backward: unsafe extern "C" fn(Dims, *mut T, *const T, c_int, c_int, c_int, c_int),
}

macro_rules! act {
    ($t:ty, $name:literal, $to:expr, $from:expr, { $($field:ident: $f:ident),* $(,)? }) => {
        impl Act for $t {
            const NAME: &'static str = $name;
            fn to_f32(self) -> f32 {
                $to(self)
            }
            fn from_f32(v: f32) -> Self {
                $from(v)
            }
            // Every field named once: a missing or repeated kernel is a compile error.
            const K: Kernels<Self> = Kernels {
                $($field: ffi::$f),*
            };
        }
    };
}

act!(
    f32,
    "f32",
    |v: f32| v,
    |v: f32| v,
    {
        concat_forward: emu_concat_forward_f32,
        concat_backward: emu_concat_backward_f32,
        batch_norm_stats: emu_batch_norm_stats_f32,
        batch_norm_relu_apply: emu_batch_norm_relu_apply_f32,
        batch_norm_relu_backward_reduce: emu_batch_norm_relu_backward_reduce_f32,
        batch_norm_relu_backward_apply: emu_batch_norm_relu_backward_apply_f32,
        amp_unscale: emu_amp_unscale_f32,
        augment_batch: emu_augment_batch_f32,
        relu_forward: emu_relu_forward_f32,
        relu_backward: emu_relu_backward_f32,
        fork_backward: emu_fork_backward_f32,
        convert_from_f32: emu_convert_from_f32_f32,
        convert_to_f32: emu_convert_to_f32_f32,
        weight_oihw_to_ohwi: emu_weight_oihw_to_ohwi_f32,
        add_ohwi_to_oihw: emu_add_ohwi_to_oihw_f32,
        bias_add: emu_bias_add_f32,
        bias_grad: emu_bias_grad_f32,
        avg_pool2d_backward: emu_avg_pool2d_backward_f32,
    }
);
act!(
    f16,
    "f16",
    |v: f16| v.to_f32(),
    f16::from_f32,
    {
        concat_forward: emu_concat_forward_f16,
        concat_backward: emu_concat_backward_f16,
        batch_norm_stats: emu_batch_norm_stats_f16,
        batch_norm_relu_apply: emu_batch_norm_relu_apply_f16,
        batch_norm_relu_backward_reduce: emu_batch_norm_relu_backward_reduce_f16,
        batch_norm_relu_backward_apply: emu_batch_norm_relu_backward_apply_f16,
        amp_unscale: emu_amp_unscale_f16,
        augment_batch: emu_augment_batch_f16,
        relu_forward: emu_relu_forward_f16,
        relu_backward: emu_relu_backward_f16,
        fork_backward: emu_fork_backward_f16,
        convert_from_f32: emu_convert_from_f32_f16,
        convert_to_f32: emu_convert_to_f32_f16,
        weight_oihw_to_ohwi: emu_weight_oihw_to_ohwi_f16,
        add_ohwi_to_oihw: emu_add_ohwi_to_oihw_f16,
        bias_add: emu_bias_add_f16,
        bias_grad: emu_bias_grad_f16,
        avg_pool2d_backward: emu_avg_pool2d_backward_f16,
    }
);
act!(
    bf16,
    "bf16",
    |v: bf16| v.to_f32(),
    bf16::from_f32,
    {
        concat_forward: emu_concat_forward_bf16,
        concat_backward: emu_concat_backward_bf16,
        batch_norm_stats: emu_batch_norm_stats_bf16,
        batch_norm_relu_apply: emu_batch_norm_relu_apply_bf16,
        batch_norm_relu_backward_reduce: emu_batch_norm_relu_backward_reduce_bf16,
        batch_norm_relu_backward_apply: emu_batch_norm_relu_backward_apply_bf16,
        amp_unscale: emu_amp_unscale_bf16,
        augment_batch: emu_augment_batch_bf16,
        relu_forward: emu_relu_forward_bf16,
        relu_backward: emu_relu_backward_bf16,
        fork_backward: emu_fork_backward_bf16,
        convert_from_f32: emu_convert_from_f32_bf16,
        convert_to_f32: emu_convert_to_f32_bf16,
        weight_oihw_to_ohwi: emu_weight_oihw_to_ohwi_bf16,
        add_ohwi_to_oihw: emu_add_ohwi_to_oihw_bf16,
        bias_add: emu_bias_add_bf16,
        bias_grad: emu_bias_grad_bf16,
        avg_pool2d_backward: emu_avg_pool2d_backward_bf16,
    }
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

/// Checks the geometry of the grid-wide per-channel reductions (the two BN ones, bias_grad).
fn check_reduction_launch(l: Launch, c: usize, what: &str) {
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
}

/// Checks the geometry of a grid-wide reduction and returns the workspace (2·G·C doubles) and
/// the zeroed counters (one per channel group).
fn bn_reduction_buffers(l: Launch, c: usize, what: &str) -> (Vec<f64>, Vec<c_int>) {
    check_reduction_launch(l, c, what);
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

/// `relu_forward_*`: `y = max(x, 0)`, NaN and −0 passing through unchanged.
pub fn relu_forward<T: Act>(l: Launch, y: &mut [T], x: &[T]) {
    l.check();
    assert_eq!(y.len(), x.len(), "relu_forward y and x");
    // SAFETY: both slices hold n values and do not alias.
    unsafe { (T::K.relu_forward)(l, y.as_mut_ptr(), x.as_ptr(), int(x.len(), "n")) }
}

/// `relu_backward_*`: `dy *= [y > 0]` in place (`y <= 0` zeroes; NaN keeps its gradient).
pub fn relu_backward<T: Act>(l: Launch, dy: &mut [T], y: &[T]) {
    l.check();
    assert_eq!(dy.len(), y.len(), "relu_backward dy and y");
    // SAFETY: both slices hold n values and do not alias.
    unsafe { (T::K.relu_backward)(l, dy.as_mut_ptr(), y.as_ptr(), int(y.len(), "n")) }
}

/// `fork_backward_*`: `dx = Σ parts` in order, in float, rounded once (one to four parts;
/// absent ones are null).
pub fn fork_backward<T: Act>(l: Launch, dx: &mut [T], parts: &[&[T]]) {
    l.check();
    assert!((1..=4).contains(&parts.len()), "one to four parts");
    for p in parts {
        assert_eq!(p.len(), dx.len(), "fork_backward part length");
    }
    let ptr = |i: usize| parts.get(i).map_or(std::ptr::null(), |p| p.as_ptr());
    // SAFETY: every non-null pointer covers n values; dx does not alias the parts.
    unsafe {
        (T::K.fork_backward)(
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

/// `fork_backward_*` with `dx` as its own first part (`dx = dx + Σ rest`): how the GPU host
/// folds more than four parts, which the kernel allows.
pub fn fork_backward_into<T: Act>(l: Launch, dx: &mut [T], rest: &[&[T]]) {
    l.check();
    assert!(rest.len() <= 3, "at most three more parts");
    for p in rest {
        assert_eq!(p.len(), dx.len(), "fork_backward part length");
    }
    let ptr = |i: usize| rest.get(i).map_or(std::ptr::null(), |p| p.as_ptr());
    let d = dx.as_mut_ptr();
    // SAFETY: as fork_backward; dx is read and then written element by element by the same
    // thread, the aliasing the kernel documents as allowed.
    unsafe { (T::K.fork_backward)(l, d, d, ptr(0), ptr(1), ptr(2), int(dx.len(), "n")) }
}

/// `convert_from_f32_*`: `dst = T(src)`, round to nearest even.
pub fn convert_from_f32<T: Act>(l: Launch, dst: &mut [T], src: &[f32]) {
    l.check();
    assert_eq!(dst.len(), src.len(), "convert_from_f32 dst and src");
    // SAFETY: both slices hold n values.
    unsafe { (T::K.convert_from_f32)(l, dst.as_mut_ptr(), src.as_ptr(), int(src.len(), "n")) }
}

/// `convert_to_f32_*`: `dst = f32(src)`.
pub fn convert_to_f32<T: Act>(l: Launch, dst: &mut [f32], src: &[T]) {
    l.check();
    assert_eq!(dst.len(), src.len(), "convert_to_f32 dst and src");
    // SAFETY: both slices hold n values.
    unsafe { (T::K.convert_to_f32)(l, dst.as_mut_ptr(), src.as_ptr(), int(src.len(), "n")) }
}

/// `weight_oihw_to_ohwi_*`: `dst` `[k, r·s, c]` (OHWI) = T(`src` `[k, c, r·s]` (OIHW)), with
/// `rs` = r·s.
pub fn weight_oihw_to_ohwi<T: Act>(
    l: Launch,
    dst: &mut [T],
    src: &[f32],
    k: usize,
    c: usize,
    rs: usize,
) {
    l.check();
    let n = k * c * rs;
    assert!(
        dst.len() == n && src.len() == n,
        "weight_oihw_to_ohwi: {} and {} values for {k}·{c}·{rs}",
        dst.len(),
        src.len()
    );
    int(n, "K·C·RS");
    // SAFETY: both slices hold K·C·RS values, all the kernel indexes; distinct borrows.
    unsafe {
        (T::K.weight_oihw_to_ohwi)(
            l,
            dst.as_mut_ptr(),
            src.as_ptr(),
            int(k, "K"),
            int(c, "C"),
            int(rs, "RS"),
        )
    }
}

/// `add_ohwi_to_oihw_*`: `grad` `[k, c, r·s]` (OIHW) += f32(`g` `[k, r·s, c]` (OHWI)).
pub fn add_ohwi_to_oihw<T: Act>(
    l: Launch,
    grad: &mut [f32],
    g: &[T],
    k: usize,
    c: usize,
    rs: usize,
) {
    l.check();
    let n = k * c * rs;
    assert!(
        grad.len() == n && g.len() == n,
        "add_ohwi_to_oihw: {} and {} values for {k}·{c}·{rs}",
        grad.len(),
        g.len()
    );
    int(n, "K·C·RS");
    // SAFETY: both slices hold K·C·RS values, all the kernel indexes; distinct borrows.
    unsafe {
        (T::K.add_ohwi_to_oihw)(
            l,
            grad.as_mut_ptr(),
            g.as_ptr(),
            int(k, "K"),
            int(c, "C"),
            int(rs, "RS"),
        )
    }
}

/// `bias_add_*`: `y[p·C + c] = T(f32(y[p·C + c]) + b[c])` in place, y `[p, c]`.
pub fn bias_add<T: Act>(l: Launch, y: &mut [T], b: &[f32], p: usize, c: usize) {
    l.check();
    check_len(y, p * c, "bias_add y");
    check_len(b, c, "bias_add b");
    // SAFETY: bounds checked above; y is the only buffer written.
    unsafe { (T::K.bias_add)(l, y.as_mut_ptr(), b.as_ptr(), int(p, "P"), int(c, "C")) }
}

/// `bias_grad_*`: `db[c] += Σ_p dy[p·C + c]`, dy `[p, c]`, summed in tiles of `r` rows.
/// Workspace (ceil(P/r)·C doubles) and counters are allocated here; the counters are checked to
/// come back zero.
pub fn bias_grad<T: Act>(l: Launch, db: &mut [f32], dy: &[T], p: usize, c: usize, r: usize) {
    check_reduction_launch(l, c, "bias_grad");
    let mut ws = vec![0.0; bias_grad_workspace(p, c, r)];
    let mut counters = vec![0; l.grid[0] as usize];
    bias_grad_with(l, db, &mut ws, &mut counters, dy, p, c, r);
    assert_counters_reset(&counters, "bias_grad");
}

/// Doubles of workspace `bias_grad_*` needs: one per channel and tile of `r` rows.
pub fn bias_grad_workspace(p: usize, c: usize, r: usize) -> usize {
    p.div_ceil(r.max(1)) * c
}

/// `bias_grad_*` with the caller's workspace (at least ceil(P/r)·C doubles) and counters
/// (grid.x ints, which the kernel expects zero), so tests can reuse them across launches as
/// the GPU does. Does not check the counters afterwards.
#[allow(clippy::too_many_arguments)]
pub fn bias_grad_with<T: Act>(
    l: Launch,
    db: &mut [f32],
    workspace: &mut [f64],
    counters: &mut [i32],
    dy: &[T],
    p: usize,
    c: usize,
    r: usize,
) {
    check_reduction_launch(l, c, "bias_grad");
    assert!(r >= 1, "bias_grad: tiles of at least one row");
    check_len(
        workspace,
        bias_grad_workspace(p, c, r),
        "bias_grad workspace",
    );
    check_len(counters, l.grid[0] as usize, "bias_grad counters");
    check_len(db, c, "bias_grad db");
    check_len(dy, p * c, "bias_grad dy");
    int(p * c, "P·C");
    // SAFETY: db holds C values, dy P·C, the workspace one double per channel and tile (all
    // the kernel indexes), the counters one per channel group; all distinct borrows.
    unsafe {
        (T::K.bias_grad)(
            l,
            db.as_mut_ptr(),
            workspace.as_mut_ptr(),
            counters.as_mut_ptr(),
            dy.as_ptr(),
            int(p, "P"),
            int(c, "C"),
            int(r, "R"),
        )
    }
}

/// `avg_pool2d_backward_*`: dx `[n, h, w, c]` from dy `[n, h/2, w/2, c]`, every element of dx
/// written (dy/4 in the pooled area, 0 in an odd last row or column).
pub fn avg_pool2d_backward<T: Act>(l: Launch, dx: &mut [T], dy: &[T], [n, h, w, c]: [usize; 4]) {
    l.check();
    check_len(dx, n * h * w * c, "avg_pool2d_backward dx");
    check_len(dy, n * (h / 2) * (w / 2) * c, "avg_pool2d_backward dy");
    int(n * h * w * c, "N·H·W·C");
    // SAFETY: bounds checked above; dx is the only buffer written and does not alias dy.
    unsafe {
        (T::K.avg_pool2d_backward)(
            l,
            dx.as_mut_ptr(),
            dy.as_ptr(),
            int(n, "N"),
            int(h, "H"),
            int(w, "W"),
            int(c, "C"),
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

/// `accumulate_step_metrics`: `sums[0] += out.loss · n`, `sums[1] += out.correct`.
pub fn accumulate_step_metrics(l: Launch, sums: &mut [f64; 2], out: LossOut, n: usize) {
    l.check();
    // SAFETY: two doubles, one loss and one count.
    unsafe {
        ffi::emu_accumulate_step_metrics(l, sums.as_mut_ptr(), &out.loss, &out.correct, int(n, "n"))
    }
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
