//! The kernels of `cuda/*.cu` as typed functions for the per-kernel tests, launched through the
//! emulated GPU's [`Device::launch`]: the launch path of the CUDA backend.
//!
//! Each function takes host slices, checks that they are large enough for what the kernel
//! will touch with the geometry given, and runs the kernel on a fresh [`EmuDevice`] with its
//! checker on ([`run_kernel`]): one device buffer of exactly each slice's size, uploaded,
//! the launch, a synchronization, the kernel's outputs copied back into their slices. So every
//! launch of these tests is also checked the way the backend's are: each pointer argument must
//! point into a live allocation, a buffer the kernel only reads must have been written, a write
//! past either end of a buffer changes its guard bytes and fails (a read past the end is not
//! seen: it reads guard bytes). Any error of the device is a test failure that names the
//! kernel, the buffer and the problem. None of the kernels' arithmetic is written in Rust.
//!
//! Activation-typed kernels are generic over [`Act`]: `f32`, [`half::f16`] (`__half`) and
//! [`half::bf16`] (`__nv_bfloat16`), which have the same bits on both sides.

#![allow(dead_code)]

use half::{bf16, f16};
use incept::backend::cuda::device::{Device, KernelArg, LaunchDims};
use incept::backend::cuda::emu::{EmuDevice, EmuOptions};
use kernel_emu::Param;
use std::fmt;
use std::os::raw::c_int;

/// A launch geometry: `grid` blocks of `block` threads (x, y, z each), and the emulated
/// device's seed, which orders the blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Launch {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    /// [`EmuOptions::seed`]: 0 runs the blocks one after another in blockIdx order, anything
    /// else in a random order drawn from it. A GPU promises no order, so a kernel's result
    /// must be the same for every seed.
    pub seed: u64,
}

impl Launch {
    /// A 1-D grid of 1-D blocks.
    pub fn linear(grid: u32, block: u32) -> Launch {
        Launch { grid: [grid, 1, 1], block: [block, 1, 1], seed: 0 }
    }
    /// 2-D grid and block.
    pub fn grid2(grid: (u32, u32), block: (u32, u32)) -> Launch {
        Launch { grid: [grid.0, grid.1, 1], block: [block.0, block.1, 1], seed: 0 }
    }
    /// The same launch with its blocks run in the random order drawn from `seed` (0: in
    /// blockIdx order).
    pub fn shuffled(self, seed: u64) -> Launch {
        Launch { seed, ..self }
    }
    fn threads(&self) -> u32 {
        self.block.iter().product()
    }
    fn check(&self) {
        assert!(
            self.grid.iter().all(|&g| g > 0) && self.block.iter().all(|&b| b > 0),
            "launch {self:?}: empty grid or block"
        );
        assert!(self.threads() <= 1024, "launch {self:?}: more than 1024 threads per block");
    }
}

/// The element type of a kernel buffer, with the C++ name the kernel registry reports
/// ([`Param`]).
///
/// # Safety
/// Plain data: no padding, and every bit pattern is a value (buffers are copied as bytes).
pub unsafe trait CType: Copy + 'static {
    const C_TYPE: &'static str;
}

macro_rules! ctype {
    ($($t:ty => $n:literal),* $(,)?) => {
        // SAFETY: primitive integers and floats (half's are `u16` newtypes): no padding, any
        // bits valid.
        $(unsafe impl CType for $t {
            const C_TYPE: &'static str = $n;
        })*
    };
}
ctype!(f32 => "float", f16 => "__half", bf16 => "__nv_bfloat16", i32 => "int", f64 => "double", u8 => "unsigned char");

/// An activation element type of the kernels (`T` in the .cu templates).
pub trait Act: CType + Default + Send + Sync + std::fmt::Debug {
    /// `f32`, `f16` or `bf16`: the suffix of the kernel names.
    const NAME: &'static str;
    fn to_f32(self) -> f32;
    /// Round to nearest even, as the kernels' `from_float`.
    fn from_f32(v: f32) -> Self;
}

impl Act for f32 {
    const NAME: &'static str = "f32";
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl Act for f16 {
    const NAME: &'static str = "f16";
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}
impl Act for bf16 {
    const NAME: &'static str = "bf16";
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

fn bytes<T: CType>(s: &[T]) -> &[u8] {
    // SAFETY: `T: CType` is plain data without padding; the view covers exactly `s`.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

fn bytes_mut<T: CType>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as `bytes`, and every bit pattern written through the view is a valid `T`.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// One argument of [`run_kernel`], as a wrapper gives it.
pub enum KArg<'a> {
    /// A buffer the kernel may write (`elem*`): uploaded, and copied back after the launch.
    Out {
        bytes: &'a mut [u8],
        elem: &'static str,
    },
    /// A buffer the kernel only reads (`const elem*`): uploaded.
    In {
        bytes: &'a [u8],
        elem: &'static str,
    },
    /// The device buffer of argument `i` again, for the kernels that allow an output to be
    /// one of their inputs (dx as its own first part, an in-place unscale).
    Same(usize),
    /// A null pointer: an absent optional buffer.
    Null,
    I32(i32),
    F32(f32),
}

impl fmt::Debug for KArg<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KArg::Out { bytes, elem } => write!(f, "{elem}* ({} bytes)", bytes.len()),
            KArg::In { bytes, elem } => write!(f, "const {elem}* ({} bytes)", bytes.len()),
            KArg::Same(i) => write!(f, "the buffer of argument {i}"),
            KArg::Null => f.write_str("a null pointer"),
            KArg::I32(v) => write!(f, "an int ({v})"),
            KArg::F32(v) => write!(f, "a float ({v})"),
        }
    }
}

/// What a wrapper may pass to [`run!`]: slices and single values (by reference: read-only or
/// written), optional ones (`None`: a null pointer), `int`s, `float`s, or a [`KArg`] itself.
pub trait IntoArg<'a> {
    fn into_arg(self) -> KArg<'a>;
}
impl<'a, T: CType> IntoArg<'a> for &'a mut [T] {
    fn into_arg(self) -> KArg<'a> {
        KArg::Out { bytes: bytes_mut(self), elem: T::C_TYPE }
    }
}
impl<'a, T: CType> IntoArg<'a> for &'a [T] {
    fn into_arg(self) -> KArg<'a> {
        KArg::In { bytes: bytes(self), elem: T::C_TYPE }
    }
}
impl<'a, T: CType> IntoArg<'a> for &'a mut T {
    fn into_arg(self) -> KArg<'a> {
        std::slice::from_mut(self).into_arg()
    }
}
impl<'a, T: CType> IntoArg<'a> for &'a T {
    fn into_arg(self) -> KArg<'a> {
        std::slice::from_ref(self).into_arg()
    }
}
impl<'a, A: IntoArg<'a>> IntoArg<'a> for Option<A> {
    fn into_arg(self) -> KArg<'a> {
        self.map_or(KArg::Null, IntoArg::into_arg)
    }
}
impl<'a> IntoArg<'a> for KArg<'a> {
    fn into_arg(self) -> KArg<'a> {
        self
    }
}
impl<'a> IntoArg<'a> for i32 {
    fn into_arg(self) -> KArg<'a> {
        KArg::I32(self)
    }
}
impl<'a> IntoArg<'a> for f32 {
    fn into_arg(self) -> KArg<'a> {
        KArg::F32(self)
    }
}

/// The name of the `T` instantiation of kernel `base`.
fn kname<T: Act>(base: &str) -> String {
    format!("{base}_{}", T::NAME)
}

/// Checks each argument against the signature the kernel registered from its source: the
/// arity, pointer or value, and for a buffer its element type and whether the kernel may
/// write it (the device itself checks only pointer, `int` or `float`).
fn check_signature(name: &str, args: &[KArg]) {
    let k = kernel_emu::kernel(name).unwrap_or_else(|| panic!("no kernel named {name}"));
    assert_eq!(args.len(), k.params.len(), "{name} takes {} arguments: {k}", k.params.len());
    let buffer = |j: usize| match args.get(j) {
        Some(KArg::Out { elem, .. }) => Some((*elem, true)),
        Some(KArg::In { elem, .. }) => Some((*elem, false)),
        _ => None,
    };
    for (i, (a, p)) in args.iter().zip(&k.params).enumerate() {
        let ok = match (a, *p) {
            (KArg::Out { elem: e, .. }, Param::MutPtr { elem }) => *e == elem,
            (KArg::In { elem: e, .. }, Param::ConstPtr { elem }) => *e == elem,
            // An alias of an earlier buffer; one the kernel writes must be copied back.
            (KArg::Same(j), Param::MutPtr { elem }) => *j < i && buffer(*j) == Some((elem, true)),
            (KArg::Same(j), Param::ConstPtr { elem }) => {
                *j < i && buffer(*j).is_some_and(|(e, _)| e == elem)
            }
            (KArg::Null, Param::MutPtr { .. } | Param::ConstPtr { .. }) => true,
            (KArg::I32(_), Param::Int) | (KArg::F32(_), Param::Float) => true,
            _ => false,
        };
        assert!(ok, "{name} parameter {i} is {p}, the wrapper passes {a:?}");
    }
}

/// Runs kernel `name` on a fresh emulated device, checker on, with the blocks in the order of
/// `l.seed`: allocates one device buffer per slice argument, exactly the slice's size (at
/// least one byte: an empty slice gets one written byte the kernel must not touch), uploads
/// every slice (those the kernel writes too: kernels read-modify-write some, and reading
/// memory nothing wrote is an error), launches through [`Device::launch`], synchronizes,
/// copies each written buffer back into its slice and frees them all. Panics on a signature
/// mismatch and on any error of the device.
pub fn run_kernel(l: Launch, name: &str, mut args: Vec<KArg>) {
    check_signature(name, &args);
    let dev = EmuDevice::new(EmuOptions { seed: l.seed, check: true });
    let s = dev.stream_create().unwrap_or_else(|e| device_error(name, "creating a stream", e));
    let mut ptrs = vec![0u64; args.len()];
    for (i, a) in args.iter().enumerate() {
        let data: &[u8] = match a {
            KArg::Out { bytes, .. } => bytes,
            KArg::In { bytes, .. } => bytes,
            _ => continue,
        };
        let p = dev
            .alloc(s, data.len().max(1))
            .unwrap_or_else(|e| device_error(name, &format!("allocating argument {i}"), e));
        dev.htod(s, p, if data.is_empty() { &[0u8][..] } else { data })
            .unwrap_or_else(|e| device_error(name, &format!("uploading argument {i}"), e));
        ptrs[i] = p;
    }
    let kargs: Vec<KernelArg> = args
        .iter()
        .enumerate()
        .map(|(i, a)| match *a {
            KArg::Out { .. } | KArg::In { .. } => KernelArg::Ptr(ptrs[i]),
            KArg::Same(j) => KernelArg::Ptr(ptrs[j]),
            KArg::Null => KernelArg::Ptr(0),
            KArg::I32(v) => KernelArg::I32(v),
            KArg::F32(v) => KernelArg::F32(v),
        })
        .collect();
    let dims = LaunchDims { grid: l.grid, block: l.block, shared_bytes: 0 };
    dev.launch(s, name, dims, &kargs).unwrap_or_else(|e| device_error(name, "launching", e));
    dev.synchronize().unwrap_or_else(|e| device_error(name, "running", e));
    for (i, a) in args.iter_mut().enumerate() {
        if let KArg::Out { bytes, .. } = a {
            if !bytes.is_empty() {
                dev.dtoh(s, bytes, ptrs[i]).unwrap_or_else(|e| {
                    device_error(name, &format!("copying argument {i} back"), e)
                });
            }
        }
    }
    for (i, &p) in ptrs.iter().enumerate().filter(|&(_, &p)| p != 0) {
        dev.free(s, p).unwrap_or_else(|e| device_error(name, &format!("freeing argument {i}"), e));
    }
    dev.synchronize().unwrap_or_else(|e| device_error(name, "freeing the buffers", e));
    assert_eq!(
        dev.counters().kernels.get(name),
        Some(&1),
        "{name}: the emulated device did not run it exactly once"
    );
}

fn device_error(name: &str, step: &str, e: anyhow::Error) -> ! {
    panic!("kernel {name} on the emulated device, {step}: {e:#}")
}

/// `run!(launch, name, args...)`: [`run_kernel`] with each argument converted by [`IntoArg`].
macro_rules! run {
    ($l:expr, $name:expr, $($a:expr),* $(,)?) => {
        run_kernel($l, &$name, vec![$(IntoArg::into_arg($a)),*])
    };
}

fn int(v: usize, what: &str) -> c_int {
    c_int::try_from(v).unwrap_or_else(|_| panic!("{what} = {v} does not fit a C int"))
}

/// Checks that a `[p, ld]` matrix read or written at columns `off..off + c` fits in `len`.
fn check_cols(len: usize, p: usize, c: usize, ld: usize, off: usize, what: &str) {
    assert!(off + c <= ld, "{what}: columns {off}..{} exceed the row length {ld}", off + c);
    if p > 0 && c > 0 {
        let need = (p - 1) * ld + off + c;
        assert!(len >= need, "{what}: {len} elements, the kernel touches {need}");
    }
    int(p * ld, what);
}

fn check_len<T>(s: &[T], need: usize, what: &str) {
    assert!(s.len() >= need, "{what}: {} elements, the kernel needs {need}", s.len());
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
        Cols { data, ld: c, off: 0 }
    }
}

/// `concat_forward_*`: `y[p·ldy + y_off + c] = x[p·C + c]`.
#[allow(clippy::too_many_arguments)]
pub fn concat_forward<T: Act>(
    l: Launch, y: &mut [T], ldy: usize, y_off: usize, x: &[T], p: usize, c: usize,
) {
    l.check();
    check_cols(y.len(), p, c, ldy, y_off, "concat_forward y");
    check_len(x, p * c, "concat_forward x");
    run!(
        l,
        kname::<T>("concat_forward"),
        y,
        int(ldy, "ldy"),
        int(y_off, "y_off"),
        x,
        int(p, "P"),
        int(c, "C"),
    )
}

/// `concat_backward_*`: `dx[p·C + c] = dy[p·ldy + dy_off + c]`.
pub fn concat_backward<T: Act>(l: Launch, dx: &mut [T], dy: Cols<T>, p: usize, c: usize) {
    l.check();
    check_len(dx, p * c, "concat_backward dx");
    check_cols(dy.data.len(), p, c, dy.ld, dy.off, "concat_backward dy");
    run!(
        l,
        kname::<T>("concat_backward"),
        dx,
        dy.data,
        int(dy.ld, "ldy"),
        int(dy.off, "dy_off"),
        int(p, "P"),
        int(c, "C"),
    )
}

/// Checks the geometry of the grid-wide per-channel reductions (the two BN ones, bias_grad).
fn check_reduction_launch(l: Launch, c: usize, what: &str) {
    l.check();
    let [bx, by, bz] = l.block;
    assert!(bx <= 32 && by <= 32 && bz == 1, "{what}: block {:?}, must be (≤32, ≤32, 1)", l.block);
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
    l: Launch, mean: &mut [f32], invstd: &mut [f32], running: Option<(&mut [f32], &mut [f32])>,
    x: &[T], p: usize, c: usize, eps: f32, momentum: f32,
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
            (Some(rm), Some(rv))
        }
        None => (None, None),
    };
    run!(
        l,
        kname::<T>("batch_norm_stats"),
        mean,
        invstd,
        rm,
        rv,
        &mut ws[..],
        &mut counters[..],
        x,
        int(p, "P"),
        int(c, "C"),
        eps,
        momentum,
    );
    assert_counters_reset(&counters, "batch_norm_stats");
}

/// `batch_norm_relu_apply_*`: `y[p·ldy + y_off + c] = relu?((x − mean)·invstd·gamma + beta)`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_relu_apply<T: Act>(
    l: Launch, y: &mut [T], ldy: usize, y_off: usize, x: &[T], mean: &[f32], invstd: &[f32],
    gamma: &[f32], beta: &[f32], p: usize, c: usize, relu: bool,
) {
    l.check();
    check_cols(y.len(), p, c, ldy, y_off, "batch_norm_relu_apply y");
    check_len(x, p * c, "x");
    for (s, what) in [(mean, "mean"), (invstd, "invstd"), (gamma, "gamma"), (beta, "beta")] {
        check_len(s, c, what);
    }
    run!(
        l,
        kname::<T>("batch_norm_relu_apply"),
        y,
        int(ldy, "ldy"),
        int(y_off, "y_off"),
        x,
        mean,
        invstd,
        gamma,
        beta,
        int(p, "P"),
        int(c, "C"),
        relu as c_int,
    )
}

/// `batch_norm_relu_backward_reduce_*`: `coef` (3·C: a | b | c0 of dx = a·dy' + b·(x − mean)
/// + c0), `dgamma += Σdy'·x̂`, `dbeta += Σdy'` (each when given).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_relu_backward_reduce<T: Act>(
    l: Launch, coef: &mut [f32], dgamma: Option<&mut [f32]>, dbeta: Option<&mut [f32]>,
    dy: Cols<T>, y: Cols<T>, x: &[T], mean: &[f32], invstd: &[f32], gamma: &[f32], p: usize,
    c: usize, relu: bool,
) {
    let (mut ws, mut counters) = bn_reduction_buffers(l, c, "batch_norm_relu_backward_reduce");
    check_len(coef, 3 * c, "coef");
    check_cols(dy.data.len(), p, c, dy.ld, dy.off, "dy");
    check_cols(y.data.len(), p, c, y.ld, y.off, "y");
    check_len(x, p * c, "x");
    for (s, what) in [(mean, "mean"), (invstd, "invstd"), (gamma, "gamma")] {
        check_len(s, c, what);
    }
    for (s, what) in [(&dgamma, "dgamma"), (&dbeta, "dbeta")] {
        if let Some(s) = s {
            check_len(&s[..], c, what);
        }
    }
    run!(
        l,
        kname::<T>("batch_norm_relu_backward_reduce"),
        coef,
        dgamma,
        dbeta,
        &mut ws[..],
        &mut counters[..],
        dy.data,
        int(dy.ld, "ld_dy"),
        int(dy.off, "dy_off"),
        y.data,
        int(y.ld, "ld_y"),
        int(y.off, "y_off"),
        x,
        mean,
        invstd,
        gamma,
        int(p, "P"),
        int(c, "C"),
        relu as c_int,
    );
    assert_counters_reset(&counters, "batch_norm_relu_backward_reduce");
}

/// `batch_norm_relu_backward_apply_*`: `dx = a·dy' + b·(x − mean) + c0`, dx `[p, c]`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_relu_backward_apply<T: Act>(
    l: Launch, dx: &mut [T], dy: Cols<T>, y: Cols<T>, x: &[T], mean: &[f32], coef: &[f32],
    p: usize, c: usize, relu: bool,
) {
    l.check();
    check_len(dx, p * c, "dx");
    check_cols(dy.data.len(), p, c, dy.ld, dy.off, "dy");
    check_cols(y.data.len(), p, c, y.ld, y.off, "y");
    check_len(x, p * c, "x");
    check_len(mean, c, "mean");
    check_len(coef, 3 * c, "coef");
    run!(
        l,
        kname::<T>("batch_norm_relu_backward_apply"),
        dx,
        dy.data,
        int(dy.ld, "ld_dy"),
        int(dy.off, "dy_off"),
        y.data,
        int(y.ld, "ld_y"),
        int(y.off, "y_off"),
        x,
        mean,
        coef,
        int(p, "P"),
        int(c, "C"),
        relu as c_int,
    )
}

/// `batch_norm_eval_invstd`: `invstd[c] = 1/√(running_var[c] + eps)`.
pub fn batch_norm_eval_invstd(l: Launch, invstd: &mut [f32], running_var: &[f32], eps: f32) {
    l.check();
    assert_eq!(invstd.len(), running_var.len(), "invstd and running_var");
    let c = int(invstd.len(), "C");
    run!(l, "batch_norm_eval_invstd", invstd, running_var, c, eps)
}

/// `relu_forward_*`: `y = max(x, 0)`, NaN and −0 passing through unchanged.
pub fn relu_forward<T: Act>(l: Launch, y: &mut [T], x: &[T]) {
    l.check();
    assert_eq!(y.len(), x.len(), "relu_forward y and x");
    run!(l, kname::<T>("relu_forward"), y, x, int(x.len(), "n"))
}

/// `relu_backward_*`: `dy *= [y > 0]` in place (`y <= 0` zeroes; NaN keeps its gradient).
pub fn relu_backward<T: Act>(l: Launch, dy: &mut [T], y: &[T]) {
    l.check();
    assert_eq!(dy.len(), y.len(), "relu_backward dy and y");
    run!(l, kname::<T>("relu_backward"), dy, y, int(y.len(), "n"))
}

/// `fork_backward_*`: `dx = Σ parts` in order, in float, rounded once (one to four parts;
/// absent ones are null).
pub fn fork_backward<T: Act>(l: Launch, dx: &mut [T], parts: &[&[T]]) {
    l.check();
    assert!((1..=4).contains(&parts.len()), "one to four parts");
    for p in parts {
        assert_eq!(p.len(), dx.len(), "fork_backward part length");
    }
    let part = |i: usize| parts.get(i).copied();
    let n = int(dx.len(), "n");
    run!(l, kname::<T>("fork_backward"), dx, part(0), part(1), part(2), part(3), n,)
}

/// `fork_backward_*` with `dx` as its own first part (`dx = dx + Σ rest`): how the GPU host
/// folds more than four parts, which the kernel allows.
pub fn fork_backward_into<T: Act>(l: Launch, dx: &mut [T], rest: &[&[T]]) {
    l.check();
    assert!(rest.len() <= 3, "at most three more parts");
    for p in rest {
        assert_eq!(p.len(), dx.len(), "fork_backward part length");
    }
    let part = |i: usize| rest.get(i).copied();
    let n = int(dx.len(), "n");
    // dx is read and then written element by element by the same thread, the aliasing the
    // kernel documents as allowed: its first part is dx's own device buffer.
    run!(l, kname::<T>("fork_backward"), dx, KArg::Same(0), part(0), part(1), part(2), n)
}

/// `convert_from_f32_*`: `dst = T(src)`, round to nearest even.
pub fn convert_from_f32<T: Act>(l: Launch, dst: &mut [T], src: &[f32]) {
    l.check();
    assert_eq!(dst.len(), src.len(), "convert_from_f32 dst and src");
    run!(l, kname::<T>("convert_from_f32"), dst, src, int(src.len(), "n"))
}

/// `convert_to_f32_*`: `dst = f32(src)`.
pub fn convert_to_f32<T: Act>(l: Launch, dst: &mut [f32], src: &[T]) {
    l.check();
    assert_eq!(dst.len(), src.len(), "convert_to_f32 dst and src");
    run!(l, kname::<T>("convert_to_f32"), dst, src, int(src.len(), "n"))
}

/// `weight_oihw_to_ohwi_*`: `dst` `[k, r·s, c]` (OHWI) = T(`src` `[k, c, r·s]` (OIHW)), with
/// `rs` = r·s.
pub fn weight_oihw_to_ohwi<T: Act>(
    l: Launch, dst: &mut [T], src: &[f32], k: usize, c: usize, rs: usize,
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
    run!(l, kname::<T>("weight_oihw_to_ohwi"), dst, src, int(k, "K"), int(c, "C"), int(rs, "RS"),)
}

/// `add_ohwi_to_oihw_*`: `grad` `[k, c, r·s]` (OIHW) += f32(`g` `[k, r·s, c]` (OHWI)).
pub fn add_ohwi_to_oihw<T: Act>(
    l: Launch, grad: &mut [f32], g: &[T], k: usize, c: usize, rs: usize,
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
    run!(l, kname::<T>("add_ohwi_to_oihw"), grad, g, int(k, "K"), int(c, "C"), int(rs, "RS"),)
}

/// `bias_add_*`: `y[p·C + c] = T(f32(y[p·C + c]) + b[c])` in place, y `[p, c]`.
pub fn bias_add<T: Act>(l: Launch, y: &mut [T], b: &[f32], p: usize, c: usize) {
    l.check();
    check_len(y, p * c, "bias_add y");
    check_len(b, c, "bias_add b");
    run!(l, kname::<T>("bias_add"), y, b, int(p, "P"), int(c, "C"))
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
    l: Launch, db: &mut [f32], workspace: &mut [f64], counters: &mut [i32], dy: &[T], p: usize,
    c: usize, r: usize,
) {
    check_reduction_launch(l, c, "bias_grad");
    assert!(r >= 1, "bias_grad: tiles of at least one row");
    check_len(workspace, bias_grad_workspace(p, c, r), "bias_grad workspace");
    check_len(counters, l.grid[0] as usize, "bias_grad counters");
    check_len(db, c, "bias_grad db");
    check_len(dy, p * c, "bias_grad dy");
    int(p * c, "P·C");
    run!(
        l,
        kname::<T>("bias_grad"),
        db,
        workspace,
        counters,
        dy,
        int(p, "P"),
        int(c, "C"),
        int(r, "R"),
    )
}

/// `avg_pool2d_backward_*`: dx `[n, h, w, c]` from dy `[n, h/2, w/2, c]`, every element of dx
/// written (dy/4 in the pooled area, 0 in an odd last row or column).
pub fn avg_pool2d_backward<T: Act>(l: Launch, dx: &mut [T], dy: &[T], [n, h, w, c]: [usize; 4]) {
    l.check();
    check_len(dx, n * h * w * c, "avg_pool2d_backward dx");
    check_len(dy, n * (h / 2) * (w / 2) * c, "avg_pool2d_backward dy");
    int(n * h * w * c, "N·H·W·C");
    run!(
        l,
        kname::<T>("avg_pool2d_backward"),
        dx,
        dy,
        int(n, "N"),
        int(h, "H"),
        int(w, "W"),
        int(c, "C"),
    )
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
    l: Launch, dlogits: &mut [f32], logits: &[f32], labels: &[i32], k: usize, smoothing: f32,
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
    run!(
        l,
        "cross_entropy_forward_backward",
        dlogits,
        &mut loss,
        &mut correct,
        logits,
        labels,
        int(n, "N"),
        int(k, "K"),
        smoothing,
        loss_scale.as_ref(),
    );
    LossOut { loss, correct }
}

/// `accumulate_step_metrics`: `sums[0] += out.loss · n`, `sums[1] += out.correct`.
pub fn accumulate_step_metrics(l: Launch, sums: &mut [f64; 2], out: LossOut, n: usize) {
    l.check();
    run!(l, "accumulate_step_metrics", &mut sums[..], &out.loss, &out.correct, int(n, "n"))
}

/// `amp_unscale_*`: `master = grad / scale`; sets `*found_inf = 1` on inf/NaN (never clears).
pub fn amp_unscale<T: Act>(
    l: Launch, master: &mut [f32], grad: &[T], scale: f32, found_inf: &mut i32,
) {
    l.check();
    assert_eq!(master.len(), grad.len(), "master and grad");
    run!(l, kname::<T>("amp_unscale"), master, grad, int(grad.len(), "n"), &scale, found_inf,)
}

/// `amp_unscale_f32` in place (`master` and `grad` the same buffer), as the kernel allows.
pub fn amp_unscale_in_place(l: Launch, grad: &mut [f32], scale: f32, found_inf: &mut i32) {
    l.check();
    let n = int(grad.len(), "n");
    // The kernel reads and then writes each element from the same thread: `grad` is the
    // device buffer of `master`.
    run!(l, kname::<f32>("amp_unscale"), grad, KArg::Same(0), n, &scale, found_inf)
}

/// The hyper-parameters of `sgd_step`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdArgs {
    /// Copied to device memory, where the kernel reads it.
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
    pub nesterov: bool,
    pub first_step: bool,
    /// The overflow flag the kernel reads (`None`: null pointer, never skips).
    pub found_inf: Option<i32>,
}

/// `sgd_step` over flat buffers. `momentum_buf` may be empty when `momentum == 0`.
pub fn sgd_step(l: Launch, param: &mut [f32], grad: &[f32], momentum_buf: &mut [f32], a: &SgdArgs) {
    l.check();
    let n = param.len();
    check_len(grad, n, "grad");
    let mom = if a.momentum != 0.0 {
        check_len(momentum_buf, n, "momentum_buf");
        Some(momentum_buf)
    } else {
        None
    };
    run!(
        l,
        "sgd_step",
        param,
        grad,
        mom,
        int(n, "n"),
        &a.lr,
        a.momentum,
        a.weight_decay,
        a.nesterov as c_int,
        a.first_step as c_int,
        a.found_inf.as_ref(),
    )
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
    s: &mut LossScale, growth_factor: f32, backoff_factor: f32, growth_interval: i32,
) {
    run!(
        Launch::linear(1, 1),
        "update_loss_scale",
        &mut s.scale,
        &mut s.growth_tracker,
        &mut s.found_inf,
        &mut s.skipped_steps,
        growth_factor,
        backoff_factor,
        growth_interval,
    )
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

/// `augment_batch_*`: `out` `[batch, 32, 32, 3]`.
pub fn augment_batch<T: Act>(l: Launch, out: &mut [T], records: &[u8], a: &AugmentArgs) {
    l.check();
    let batch = a.indices.len();
    assert!(
        a.dy.len() == batch && a.dx.len() == batch && a.flip.len() == batch,
        "augment_batch: indices, dy, dx and flip differ in length"
    );
    assert_eq!(records.len() % RECORD, 0, "records: whole records");
    check_len(out, batch * 3072, "out");
    // The kernel reads records only for indices in 0..n_records (others give NaN).
    run!(
        l,
        kname::<T>("augment_batch"),
        out,
        records,
        int(records.len() / RECORD, "n_records"),
        a.indices,
        a.dy,
        a.dx,
        a.flip,
        &a.mean[..],
        &a.std[..],
        int(batch, "batch"),
    )
}
