//! Runs the CUDA kernels of `../cuda/*.cu` on the CPU, for tests.
//!
//! `build.rs` compiles the very same sources with the host C++ compiler (`-DINCEPT_EMU`), where
//! `cuda/emu.h` supplies the CUDA built-ins: blocks run one after another (in blockIdx order,
//! or a seeded random one: [`Launch::shuffled`]), the threads of a block run as user-level
//! contexts on the calling OS thread, switched only at barriers (`__syncthreads`, warp
//! shuffles), and warp shuffles exchange values through per-lane slots.
//!
//! Every kernel registers itself in the .cu file that defines it (its signature is written only
//! there): [`kernels`] lists them with their parameters, [`launch`] runs one by name with
//! cuLaunchKernel-style arguments, checked against the registered signature. The typed
//! functions below are built on [`launch`]: each takes slices, checks that they are large
//! enough for what the kernel will touch, and runs the kernel with the launch geometry given.
//! None of the kernels' arithmetic is written in Rust.
//!
//! Activation-typed kernels are generic over [`Act`]: `f32`, [`half::f16`] (`__half`) and
//! [`half::bf16`] (`__nv_bfloat16`), which have the same bits on both sides.

use half::{bf16, f16};
use std::ffi::{c_char, c_void, CStr, CString};
use std::fmt;
use std::os::raw::c_int;
use std::sync::OnceLock;

mod ffi {
    use std::ffi::{c_char, c_void};
    use std::os::raw::c_int;

    extern "C" {
        pub fn incept_emu_kernel_count() -> c_int;
        pub fn incept_emu_kernel_name(i: c_int) -> *const c_char;
        pub fn incept_emu_kernel_param_count(i: c_int) -> c_int;
        pub fn incept_emu_kernel_param(
            i: c_int,
            j: c_int,
            kind: *mut c_int,
            elem: *mut *const c_char,
            elem_size: *mut c_int,
        ) -> c_int;
        pub fn incept_emu_launch(
            name: *const c_char,
            grid: *const u32,
            block: *const u32,
            shared_bytes: u32,
            order: u64,
            args: *mut *mut c_void,
            err: *mut c_char,
            err_len: usize,
        ) -> c_int;
        pub fn emu_float2half_bits(v: f32) -> u16;
        pub fn emu_half_bits2float(b: u16) -> f32;
        pub fn emu_float2bfloat16_bits(v: f32) -> u16;
        pub fn emu_bfloat16_bits2float(b: u16) -> f32;
    }
}

// ---- the kernel registry ------------------------------------------------------------------------

/// A kernel parameter, as the registry derives it from the C++ function type. `elem` is the
/// C++ name of the pointee: `"float"`, `"__half"`, `"__nv_bfloat16"`, `"int"`, `"double"`,
/// `"unsigned char"` (or `"unsigned int"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Param {
    /// `elem*`: a buffer the kernel may write.
    MutPtr { elem: &'static str },
    /// `const elem*`: a buffer the kernel only reads.
    ConstPtr { elem: &'static str },
    /// `int`.
    Int,
    /// `float`.
    Float,
}

impl fmt::Display for Param {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Param::MutPtr { elem } => write!(f, "{elem}*"),
            Param::ConstPtr { elem } => write!(f, "const {elem}*"),
            Param::Int => f.write_str("int"),
            Param::Float => f.write_str("float"),
        }
    }
}

/// A registered kernel: its `extern "C"` name and parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    pub name: &'static str,
    pub params: Vec<Param>,
}

impl fmt::Display for Kernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}(", self.name)?;
        for (i, p) in self.params.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{p}")?;
        }
        f.write_str(")")
    }
}

/// An argument of [`launch`]: a device (here: host) address for a pointer parameter, the value
/// of an `int` or `float` one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    F32(f32),
}

impl fmt::Display for Arg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arg::Ptr(p) => write!(f, "a pointer ({p:#x})"),
            Arg::I32(v) => write!(f, "an int ({v})"),
            Arg::F32(v) => write!(f, "a float ({v})"),
        }
    }
}

/// The C string the registry holds for a name: a string literal of the C++ side, so 'static.
///
/// # Safety
/// `p` is null or points to a NUL-terminated string that lives for the whole process.
unsafe fn static_str(p: *const c_char) -> &'static str {
    assert!(!p.is_null(), "kernel-emu registry: null name");
    // SAFETY: the caller's promise.
    let s: &'static CStr = unsafe { CStr::from_ptr(p) };
    s.to_str()
        .expect("kernel-emu registry: a name that is not UTF-8")
}

/// Every kernel of `cuda/*.cu`, sorted by name (the registry's order).
pub fn kernels() -> &'static [Kernel] {
    static KERNELS: OnceLock<Vec<Kernel>> = OnceLock::new();
    KERNELS.get_or_init(|| {
        // SAFETY: the registry's C API reads the process-wide registry, filled before main by
        // static initializers; names are string literals (static storage).
        unsafe {
            let n = ffi::incept_emu_kernel_count();
            (0..n)
                .map(|i| {
                    let name = static_str(ffi::incept_emu_kernel_name(i));
                    let params = (0..ffi::incept_emu_kernel_param_count(i))
                        .map(|j| {
                            let (mut kind, mut elem, mut size) = (0, std::ptr::null(), 0);
                            let rc =
                                ffi::incept_emu_kernel_param(i, j, &mut kind, &mut elem, &mut size);
                            assert_eq!(rc, 0, "kernel-emu registry: {name} parameter {j}");
                            let elem = static_str(elem);
                            match kind {
                                0 => Param::MutPtr { elem },
                                1 => Param::ConstPtr { elem },
                                2 => Param::Int,
                                3 => Param::Float,
                                k => panic!("kernel-emu registry: {name} parameter {j}: kind {k}"),
                            }
                        })
                        .collect();
                    Kernel { name, params }
                })
                .collect()
        }
    })
}

/// The registered kernel named `name`.
pub fn kernel(name: &str) -> Option<&'static Kernel> {
    let k = kernels();
    k.binary_search_by(|k| k.name.cmp(name)).ok().map(|i| &k[i])
}

/// Levenshtein distance, for the "did you mean" of an unknown name.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The registered names closest to `name` (at most five): same base name with another
/// element suffix, or a small edit distance.
fn near_names(name: &str) -> Vec<&'static str> {
    let base = |s: &str| -> String {
        ["_f32", "_f16", "_bf16"]
            .iter()
            .find_map(|suf| s.strip_suffix(suf))
            .unwrap_or(s)
            .to_string()
    };
    let b = base(name);
    let mut scored: Vec<(usize, &'static str)> = kernels()
        .iter()
        .map(|k| {
            let d = if base(k.name) == b {
                0
            } else {
                distance(name, k.name)
            };
            (d, k.name)
        })
        .filter(|&(d, _)| d <= (name.len() / 3).max(3))
        .collect();
    scored.sort();
    scored.into_iter().take(5).map(|(_, n)| n).collect()
}

/// Runs the kernel `name` over `grid` blocks of `block` threads (x, y, z each) on the CPU,
/// with `args[i]` the value of its i-th parameter. `order` 0 runs the blocks in blockIdx order,
/// any other value in the random order drawn from it. `shared_bytes` is the dynamic shared
/// memory, which the emulation does not model: it must be 0.
///
/// Checked before anything runs, each failure an `Err` naming the kernel: a known name (the
/// message lists the registered names nearest to it), the number of arguments, the kind of each
/// ([`Arg::Ptr`] for a pointer parameter, [`Arg::I32`] for `int`, [`Arg::F32`] for `float`:
/// the message gives the parameter's index and C++ type), a non-empty grid and block within
/// CUDA's limits (at most 1024 threads per block). Problems of the kernel's execution (a
/// barrier in divergent code, an out-of-bounds access) are not errors: they abort or crash the
/// process, as they would fault on a GPU.
///
/// # Safety
/// Every [`Arg::Ptr`] is a host address (or 0 where the kernel allows a null pointer) valid
/// for every element the kernel reads or writes through it with these arguments and this
/// geometry, for the element type of the parameter, and nothing else accesses that memory
/// while the kernel runs. The kernel dereferences them as CUDA would device pointers.
pub unsafe fn launch(
    name: &str,
    grid: [u32; 3],
    block: [u32; 3],
    shared_bytes: u32,
    order: u64,
    args: &[Arg],
) -> Result<(), String> {
    let k = kernel(name).ok_or_else(|| {
        let near = near_names(name);
        if near.is_empty() {
            format!(
                "no kernel named {name:?} ({} are registered, see kernel_emu::kernels())",
                kernels().len()
            )
        } else {
            format!(
                "no kernel named {name:?}; nearest registered: {}",
                near.join(", ")
            )
        }
    })?;
    if args.len() != k.params.len() {
        return Err(format!(
            "{name}: {} arguments given, the kernel takes {}: {k}",
            args.len(),
            k.params.len()
        ));
    }
    for (i, (a, p)) in args.iter().zip(&k.params).enumerate() {
        let ok = matches!(
            (a, p),
            (Arg::Ptr(_), Param::MutPtr { .. } | Param::ConstPtr { .. })
                | (Arg::I32(_), Param::Int)
                | (Arg::F32(_), Param::Float)
        );
        if !ok {
            let want = match p {
                Param::MutPtr { .. } | Param::ConstPtr { .. } => "Arg::Ptr",
                Param::Int => "Arg::I32",
                Param::Float => "Arg::F32",
            };
            return Err(format!(
                "{name}: argument {i} is {a}, parameter {i} is {p}: expected {want}"
            ));
        }
    }
    if grid.contains(&0) || block.contains(&0) {
        return Err(format!("{name}: empty grid {grid:?} or block {block:?}"));
    }
    let threads: u64 = block.iter().map(|&b| b as u64).product();
    if threads > 1024 {
        return Err(format!(
            "{name}: block {block:?} has {threads} threads, CUDA allows at most 1024"
        ));
    }
    #[repr(C)]
    union Slot {
        p: *mut c_void,
        i: c_int,
        f: f32,
    }
    let mut slots: Vec<Slot> = args
        .iter()
        .map(|a| match *a {
            Arg::Ptr(p) => Slot {
                p: p as usize as *mut c_void,
            },
            Arg::I32(i) => Slot { i },
            Arg::F32(f) => Slot { f },
        })
        .collect();
    let mut ptrs: Vec<*mut c_void> = slots
        .iter_mut()
        .map(|s| s as *mut Slot as *mut c_void)
        .collect();
    let cname = CString::new(name).map_err(|_| format!("{name:?}: a NUL in the name"))?;
    let mut err = vec![0 as c_char; 512];
    // SAFETY: the name, geometry and argument array are valid for the call; each args[i]
    // points to a slot holding a value of the i-th parameter's type (checked above); the
    // pointers' validity is the caller's promise.
    let rc = unsafe {
        ffi::incept_emu_launch(
            cname.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            shared_bytes,
            order,
            ptrs.as_mut_ptr(),
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc != 0 {
        // SAFETY: the C side wrote a NUL-terminated message into `err` (vsnprintf).
        let msg = unsafe { CStr::from_ptr(err.as_ptr()) };
        return Err(msg.to_string_lossy().into_owned());
    }
    Ok(())
}

// ---- the typed API ------------------------------------------------------------------------------

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

/// The C++ name of a kernel buffer's element type, as the registry reports it ([`Param`]).
pub trait CType: Copy + 'static {
    const C_TYPE: &'static str;
}

macro_rules! ctype {
    ($($t:ty => $n:literal),* $(,)?) => {
        $(impl CType for $t {
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

/// An argument of a typed wrapper: pointers keep their element type, which [`run_kernel`]
/// checks against the registered signature.
#[derive(Clone, Copy, Debug)]
enum TArg {
    Mut(u64, &'static str),
    Const(u64, &'static str),
    I(i32),
    F(f32),
}

trait IntoArg {
    fn into_arg(self) -> TArg;
}
impl<E: CType> IntoArg for *mut E {
    fn into_arg(self) -> TArg {
        TArg::Mut(self as usize as u64, E::C_TYPE)
    }
}
impl<E: CType> IntoArg for *const E {
    fn into_arg(self) -> TArg {
        TArg::Const(self as usize as u64, E::C_TYPE)
    }
}
impl<E: CType> IntoArg for &mut E {
    fn into_arg(self) -> TArg {
        TArg::Mut(self as *mut E as usize as u64, E::C_TYPE)
    }
}
impl<E: CType> IntoArg for &E {
    fn into_arg(self) -> TArg {
        TArg::Const(self as *const E as usize as u64, E::C_TYPE)
    }
}
impl IntoArg for i32 {
    fn into_arg(self) -> TArg {
        TArg::I(self)
    }
}
impl IntoArg for f32 {
    fn into_arg(self) -> TArg {
        TArg::F(self)
    }
}

/// The name of the `T` instantiation of kernel `base`.
fn kname<T: Act>(base: &str) -> String {
    format!("{base}_{}", T::NAME)
}

/// Launches `name` with `args`, after checking each pointer's element type and mutability
/// against the registered signature; panics on any mismatch or launch error.
///
/// # Safety
/// As [`launch`]: the pointers cover what the kernel touches.
unsafe fn run_kernel(l: Launch, name: &str, args: &[TArg]) {
    let k = kernel(name).unwrap_or_else(|| panic!("kernel-emu: no kernel named {name}"));
    assert_eq!(
        args.len(),
        k.params.len(),
        "kernel-emu: {name} takes {} arguments: {k}",
        k.params.len()
    );
    for (i, (a, p)) in args.iter().zip(&k.params).enumerate() {
        let ok = match (*a, *p) {
            (TArg::Mut(_, e), Param::MutPtr { elem }) => e == elem,
            (TArg::Const(_, e), Param::ConstPtr { elem }) => e == elem,
            (TArg::I(_), Param::Int) | (TArg::F(_), Param::Float) => true,
            _ => false,
        };
        assert!(
            ok,
            "kernel-emu: {name} parameter {i} is {p}, the wrapper passes {a:?}"
        );
    }
    let args: Vec<Arg> = args
        .iter()
        .map(|a| match *a {
            TArg::Mut(p, _) | TArg::Const(p, _) => Arg::Ptr(p),
            TArg::I(v) => Arg::I32(v),
            TArg::F(v) => Arg::F32(v),
        })
        .collect();
    // SAFETY: the caller's promise.
    unsafe { launch(name, l.grid, l.block, 0, l.order, &args) }
        .unwrap_or_else(|e| panic!("kernel-emu: {e}"));
}

/// `run!(launch, name, args...)`: [`run_kernel`] with each argument converted by [`IntoArg`].
macro_rules! run {
    ($l:expr, $name:expr, $($a:expr),* $(,)?) => {
        run_kernel($l, &$name, &[$(IntoArg::into_arg($a)),*])
    };
}

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
        run!(
            l,
            kname::<T>("concat_forward"),
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
        run!(
            l,
            kname::<T>("concat_backward"),
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
        run!(
            l,
            kname::<T>("batch_norm_stats"),
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
        run!(
            l,
            kname::<T>("batch_norm_relu_apply"),
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
        run!(
            l,
            kname::<T>("batch_norm_relu_backward_reduce"),
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
        run!(
            l,
            kname::<T>("batch_norm_relu_backward_apply"),
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
        run!(
            l,
            "batch_norm_eval_invstd",
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
    unsafe {
        run!(
            l,
            kname::<T>("relu_forward"),
            y.as_mut_ptr(),
            x.as_ptr(),
            int(x.len(), "n")
        )
    }
}

/// `relu_backward_*`: `dy *= [y > 0]` in place (`y <= 0` zeroes; NaN keeps its gradient).
pub fn relu_backward<T: Act>(l: Launch, dy: &mut [T], y: &[T]) {
    l.check();
    assert_eq!(dy.len(), y.len(), "relu_backward dy and y");
    // SAFETY: both slices hold n values and do not alias.
    unsafe {
        run!(
            l,
            kname::<T>("relu_backward"),
            dy.as_mut_ptr(),
            y.as_ptr(),
            int(y.len(), "n")
        )
    }
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
        run!(
            l,
            kname::<T>("fork_backward"),
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
    unsafe {
        run!(
            l,
            kname::<T>("fork_backward"),
            d,
            d as *const T,
            ptr(0),
            ptr(1),
            ptr(2),
            int(dx.len(), "n")
        )
    }
}

/// `convert_from_f32_*`: `dst = T(src)`, round to nearest even.
pub fn convert_from_f32<T: Act>(l: Launch, dst: &mut [T], src: &[f32]) {
    l.check();
    assert_eq!(dst.len(), src.len(), "convert_from_f32 dst and src");
    // SAFETY: both slices hold n values.
    unsafe {
        run!(
            l,
            kname::<T>("convert_from_f32"),
            dst.as_mut_ptr(),
            src.as_ptr(),
            int(src.len(), "n")
        )
    }
}

/// `convert_to_f32_*`: `dst = f32(src)`.
pub fn convert_to_f32<T: Act>(l: Launch, dst: &mut [f32], src: &[T]) {
    l.check();
    assert_eq!(dst.len(), src.len(), "convert_to_f32 dst and src");
    // SAFETY: both slices hold n values.
    unsafe {
        run!(
            l,
            kname::<T>("convert_to_f32"),
            dst.as_mut_ptr(),
            src.as_ptr(),
            int(src.len(), "n")
        )
    }
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
        run!(
            l,
            kname::<T>("weight_oihw_to_ohwi"),
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
        run!(
            l,
            kname::<T>("add_ohwi_to_oihw"),
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
    unsafe {
        run!(
            l,
            kname::<T>("bias_add"),
            y.as_mut_ptr(),
            b.as_ptr(),
            int(p, "P"),
            int(c, "C")
        )
    }
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
        run!(
            l,
            kname::<T>("bias_grad"),
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
        run!(
            l,
            kname::<T>("avg_pool2d_backward"),
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
        run!(
            l,
            "cross_entropy_forward_backward",
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
        run!(
            l,
            "accumulate_step_metrics",
            sums.as_mut_ptr(),
            &out.loss,
            &out.correct,
            int(n, "n")
        )
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
        run!(
            l,
            kname::<T>("amp_unscale"),
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
    unsafe {
        run!(
            l,
            kname::<f32>("amp_unscale"),
            ptr,
            ptr as *const f32,
            int(grad.len(), "n"),
            &scale,
            found_inf
        )
    }
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
        run!(
            l,
            "sgd_step",
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
        run!(
            l,
            kname::<T>("augment_batch"),
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
