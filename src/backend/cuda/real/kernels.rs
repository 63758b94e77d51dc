//! The kernels of `cuda/*.cu` on the real device: every embedded module loaded at open (its
//! cubin for this GPU when there is one, else the PTX, JIT-compiled by the driver), every
//! `.entry` found with its parameter list parsed from the PTX, so that a launch whose
//! arguments do not match the kernel's signature is an error instead of a fault on the GPU.

use super::drv;
use crate::backend::cuda::device::KernelArg;
use anyhow::{anyhow, bail, Result};
use cudarc::driver::{result as cu, sys as cus};
use std::collections::HashMap;
use std::ffi::CString;

/// How `cuLaunchKernel` passes one parameter, from its PTX type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Param {
    /// `.u64`, `.s64`, `.b64`: a device address ([`KernelArg::Ptr`]).
    Ptr,
    /// `.u32`, `.s32`, `.b32`: an `int` ([`KernelArg::I32`]).
    I32,
    /// `.f32`: a `float` ([`KernelArg::F32`]).
    F32,
    /// Anything else (a struct passed by value, a `double`, a `short`), as the PTX spells it:
    /// no [`KernelArg`] matches it.
    Unsupported(String),
}

impl Param {
    fn kind(&self) -> &str {
        match self {
            Param::Ptr => "a pointer (Ptr)",
            Param::I32 => "a 32-bit integer (I32)",
            Param::F32 => "a float (F32)",
            Param::Unsupported(_) => "unsupported",
        }
    }
}

/// One `.entry`: its name and parameters in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub params: Vec<Param>,
}

/// Every `.entry NAME( .param .TYPE ..., ... )` of a PTX module, in order. Comments are
/// skipped; an entry whose parameter list does not close is an error.
pub fn parse_entries(ptx: &str) -> Result<Vec<Entry>> {
    let code: String =
        ptx.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join("\n");
    let mut entries = Vec::new();
    let mut rest = code.as_str();
    while let Some(at) = find_directive(rest, ".entry") {
        let after = &rest[at + ".entry".len()..];
        let open =
            after.find('(').ok_or_else(|| anyhow!("a PTX .entry without a parameter list"))?;
        let name = after[..open].trim();
        if name.is_empty() || name.contains(char::is_whitespace) {
            bail!("a PTX .entry with an unreadable name {name:?}");
        }
        let close = after[open..]
            .find(')')
            .ok_or_else(|| anyhow!("the parameter list of PTX .entry {name} does not close"))?
            + open;
        let params = after[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| parse_param(name, p))
            .collect::<Result<Vec<_>>>()?;
        entries.push(Entry { name: name.to_string(), params });
        rest = &after[close..];
    }
    Ok(entries)
}

/// The offset of `directive` as a whole word (not `.entryfoo`, not inside a longer name).
fn find_directive(s: &str, directive: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = s[from..].find(directive) {
        let at = from + i;
        let before = s[..at].chars().next_back();
        let after = s[at + directive.len()..].chars().next();
        let word = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        if !word(before) && !word(after) {
            return Some(at);
        }
        from = at + directive.len();
    }
    None
}

/// One `.param .TYPE [.ptr .global .align N] NAME` (or `.param .align N .b8 NAME[SIZE]`).
fn parse_param(entry: &str, text: &str) -> Result<Param> {
    let mut tokens = text.split_whitespace();
    if tokens.next() != Some(".param") {
        bail!("PTX .entry {entry}: a parameter that is not a .param: {text:?}");
    }
    let mut ty = tokens
        .next()
        .ok_or_else(|| anyhow!("PTX .entry {entry}: a .param without a type: {text:?}"))?;
    if ty == ".align" {
        tokens.next();
        ty = tokens.next().unwrap_or("?");
    }
    let name = tokens.last().unwrap_or("");
    if name.contains('[') {
        return Ok(Param::Unsupported(format!("{ty} array {name}")));
    }
    Ok(match ty {
        ".u64" | ".s64" | ".b64" => Param::Ptr,
        ".u32" | ".s32" | ".b32" => Param::I32,
        ".f32" => Param::F32,
        other => Param::Unsupported(other.to_string()),
    })
}

/// Checks `args` against `entry`'s parameters: the same number, each of the matching kind.
pub fn check_args(entry: &Entry, args: &[KernelArg]) -> Result<()> {
    let name = &entry.name;
    if args.len() != entry.params.len() {
        bail!(
            "kernel {name} takes {} parameters, the launch passes {}",
            entry.params.len(),
            args.len()
        );
    }
    for (i, (p, a)) in entry.params.iter().zip(args).enumerate() {
        let ok = matches!(
            (p, a),
            (Param::Ptr, KernelArg::Ptr(_))
                | (Param::I32, KernelArg::I32(_))
                | (Param::F32, KernelArg::F32(_))
        );
        if let Param::Unsupported(ty) = p {
            bail!("kernel {name}: parameter {i} is a PTX {ty}, which no KernelArg can pass");
        }
        if !ok {
            bail!("kernel {name}: parameter {i} is {}, the launch passes {a:?}", p.kind());
        }
    }
    Ok(())
}

/// A loaded kernel.
pub struct Kernel {
    pub func: cus::CUfunction,
    pub entry: Entry,
}

/// The loaded modules (unloaded on drop) and their kernels by name.
pub struct Kernels {
    modules: Vec<cus::CUmodule>,
    pub by_name: HashMap<String, Kernel>,
    /// Modules loaded from a cubin (the rest were JIT-compiled from PTX).
    pub from_cubin: usize,
}

// SAFETY: module and function handles are driver objects of the device's context; the driver
// API is thread-safe and they are only used with that context current (every RealDevice
// entry point binds it). They are never mutated after loading.
unsafe impl Send for Kernels {}
unsafe impl Sync for Kernels {}

impl Kernels {
    /// Loads every module of `modules` (name, PTX): the cubin `cubin(name)` gives, if it loads,
    /// else the PTX. The context must be current.
    pub fn load(
        modules: &[(&str, &str)], cubin: impl Fn(&str) -> Option<&'static [u8]>, driver: &str,
    ) -> Result<Kernels> {
        let mut k = Kernels { modules: Vec::new(), by_name: HashMap::new(), from_cubin: 0 };
        for (module, src) in modules {
            let entries =
                parse_entries(src).map_err(|e| anyhow!("the PTX of module {module}: {e}"))?;
            // SAFETY: a cubin is an ELF image cuModuleLoadData reads by its own header; the
            // embedded bytes live for the whole program.
            let from_cubin = cubin(module)
                .and_then(|bin| unsafe { cu::module::load_data(bin.as_ptr().cast()).ok() });
            let m = match from_cubin {
                Some(m) => {
                    k.from_cubin += 1;
                    m
                }
                None => {
                    let text = CString::new(*src)
                        .map_err(|_| anyhow!("the PTX of module {module} contains a NUL byte"))?;
                    // SAFETY: a NUL-terminated PTX text that outlives the call (the driver
                    // copies what it needs).
                    unsafe { cu::module::load_data(text.as_ptr().cast()) }.map_err(|e| {
                        let isa = src.lines().find(|l| l.starts_with(".version")).unwrap_or("?");
                        anyhow!(
                            "cuModuleLoadData: cannot load the {module} kernels ({e}); they are PTX {isa} and the driver supports CUDA {driver}: update the NVIDIA driver, or rebuild with an older CUDA toolkit/NVRTC"
                        )
                    })?
                }
            };
            k.modules.push(m);
            for entry in entries {
                let cname = CString::new(entry.name.as_str())
                    .map_err(|_| anyhow!("kernel name {:?} contains a NUL byte", entry.name))?;
                // SAFETY: `m` was just loaded and is unloaded only on drop.
                let func = unsafe { cu::module::get_function(m, cname) }
                    .map_err(drv(&format!("cuModuleGetFunction({})", entry.name)))?;
                if k.by_name.contains_key(&entry.name) {
                    bail!(
                        "kernel {} is defined by more than one module (again in {module})",
                        entry.name
                    );
                }
                k.by_name.insert(entry.name.clone(), Kernel { func, entry });
            }
        }
        Ok(k)
    }

    pub fn get(&self, name: &str) -> Result<&Kernel> {
        self.by_name.get(name).ok_or_else(|| anyhow!("kernel {name} is not in any loaded module"))
    }
}

impl Drop for Kernels {
    fn drop(&mut self) {
        for m in self.modules.drain(..) {
            // SAFETY: loaded by cuModuleLoadData and unloaded once; the owner binds the
            // context before dropping.
            let _ = unsafe { cu::module::unload(m) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of NVRTC's and nvcc's output, with the variations both emit.
    const PTX: &str = r#"
//
// Generated by NVIDIA NVVM Compiler
// .entry commented_out(.param .f64 x)
.version 8.4
.target sm_80
.address_size 64

	// .globl	relu_forward_f32
.visible .entry relu_forward_f32(
	.param .u64 relu_forward_f32_param_0,
	.param .u64 relu_forward_f32_param_1,
	.param .u32 relu_forward_f32_param_2
)
{
	.reg .pred 	%p<2>;
	ret;
}
	// .globl	sgd_step
.visible .entry sgd_step(
	.param .u64 .ptr .global .align 4 sgd_step_param_0,
	.param .s32 sgd_step_param_1,
	.param .f32 sgd_step_param_2,
	.param .b64 sgd_step_param_3
)
.maxntid 256, 1, 1
{
	ret;
}
.entry no_params()
{
	ret;
}
.visible .entry by_value(
	.param .align 8 .b8 by_value_param_0[16],
	.param .f64 by_value_param_1
)
{
	ret;
}
"#;

    #[test]
    fn ptx_entries_and_their_parameter_kinds() {
        let entries = parse_entries(PTX).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["relu_forward_f32", "sgd_step", "no_params", "by_value"]);
        assert_eq!(entries[0].params, [Param::Ptr, Param::Ptr, Param::I32]);
        assert_eq!(entries[1].params, [Param::Ptr, Param::I32, Param::F32, Param::Ptr]);
        assert!(entries[2].params.is_empty());
        assert_eq!(
            entries[3].params,
            [
                Param::Unsupported(".b8 array by_value_param_0[16]".into()),
                Param::Unsupported(".f64".into())
            ]
        );
    }

    #[test]
    fn a_parameter_list_that_does_not_close_is_an_error() {
        let err = parse_entries(".entry broken(\n.param .u64 p").unwrap_err();
        assert!(err.to_string().contains("broken"), "{err}");
    }

    #[test]
    fn launch_arguments_are_checked_by_count_and_kind() {
        let entries = parse_entries(PTX).unwrap();
        let relu = &entries[0];
        let ok = [KernelArg::Ptr(0), KernelArg::Ptr(16), KernelArg::I32(3)];
        check_args(relu, &ok).unwrap();
        let err = check_args(relu, &ok[..2]).unwrap_err().to_string();
        assert!(
            err.contains("relu_forward_f32") && err.contains("takes 3") && err.contains("2"),
            "{err}"
        );
        let wrong = [KernelArg::Ptr(0), KernelArg::F32(1.0), KernelArg::I32(3)];
        let err = check_args(relu, &wrong).unwrap_err().to_string();
        assert!(err.contains("relu_forward_f32") && err.contains("parameter 1"), "{err}");
        let err = check_args(&entries[3], &[KernelArg::Ptr(0), KernelArg::F32(0.0)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("by_value") && err.contains("parameter 0"), "{err}");
    }

    /// Every kernel this build embeds is found, with a signature the launch check understands.
    #[test]
    fn every_embedded_kernel_takes_only_pointers_ints_and_floats() {
        let mut n = 0;
        let mut names = std::collections::HashSet::new();
        for (module, src) in crate::backend::cuda::driver::ptx::PTX {
            let entries = parse_entries(src).unwrap();
            assert_eq!(entries.len(), src.matches(".entry ").count(), "{module}");
            for e in entries {
                n += 1;
                names.insert(e.name.clone());
                for (i, p) in e.params.iter().enumerate() {
                    assert!(
                        !matches!(p, Param::Unsupported(_)),
                        "{module}: kernel {} parameter {i}: {p:?}",
                        e.name
                    );
                }
            }
        }
        assert!(
            n > 0 || crate::backend::cuda::driver::ptx::PTX.is_empty(),
            "no .entry found in the embedded PTX"
        );
        if !crate::backend::cuda::driver::ptx::PTX.is_empty() {
            for k in kernel_emu::kernels().iter().map(|k| k.name.to_string()) {
                assert!(names.contains(&k), "kernel {k} not parsed from the PTX");
            }
        }
    }
}
