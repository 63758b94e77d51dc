//! Runs the CUDA kernels of `../cuda/*.cu` on the CPU: the kernels of the emulated GPU.
//!
//! `build.rs` compiles the very same sources with the host C++ compiler (`-DINCEPT_EMU`), where
//! `cuda/emu.h` supplies the CUDA built-ins: blocks run one after another (in blockIdx order,
//! or a random one drawn from a seed), the threads of a block run as user-level contexts on
//! the calling OS thread, switched only at barriers (`__syncthreads`, warp shuffles), and warp
//! shuffles exchange values through per-lane slots.
//!
//! Every kernel registers itself in the .cu file that defines it (its signature is written only
//! there): [`kernels`] lists them with their parameters, [`launch`] runs one by name with
//! cuLaunchKernel-style arguments, checked against the registered signature. None of the
//! kernels' arithmetic is written in Rust.
//!
//! [`launch`] takes host addresses and checks nothing of the memory a kernel touches. The
//! emulated GPU of `incept` (`backend::cuda::emu::EmuDevice`) launches the kernels through it
//! behind its `Device::launch`, with device memory (guard bytes, poisoned until written) and a
//! checker of every launch (bounds, reads of unwritten memory, races); that is the path the
//! CUDA backend and its per-kernel tests (`tests/kernels.rs`) take.
//!
//! The emulation's own fp16/bf16 conversions ([`emu_f32_to_f16_bits`] and the others) are
//! exported so that tests can compare them bit for bit with the `half` crate.

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
            i: c_int, j: c_int, kind: *mut c_int, elem: *mut *const c_char, elem_size: *mut c_int,
        ) -> c_int;
        pub fn incept_emu_launch(
            name: *const c_char, grid: *const u32, block: *const u32, shared_bytes: u32,
            order: u64, args: *mut *mut c_void, err: *mut c_char, err_len: usize,
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
    s.to_str().expect("kernel-emu registry: a name that is not UTF-8")
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
            let d = if base(k.name) == b { 0 } else { distance(name, k.name) };
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
    name: &str, grid: [u32; 3], block: [u32; 3], shared_bytes: u32, order: u64, args: &[Arg],
) -> Result<(), String> {
    let k = kernel(name).ok_or_else(|| {
        let near = near_names(name);
        if near.is_empty() {
            format!(
                "no kernel named {name:?} ({} are registered, see kernel_emu::kernels())",
                kernels().len()
            )
        } else {
            format!("no kernel named {name:?}; nearest registered: {}", near.join(", "))
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
            Arg::Ptr(p) => Slot { p: p as usize as *mut c_void },
            Arg::I32(i) => Slot { i },
            Arg::F32(f) => Slot { f },
        })
        .collect();
    let mut ptrs: Vec<*mut c_void> =
        slots.iter_mut().map(|s| s as *mut Slot as *mut c_void).collect();
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

// ---- the emulation's 16-bit conversions --------------------------------------------------------

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
