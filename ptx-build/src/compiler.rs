//! The CUDA compiler of the build: `nvcc` from a toolkit, or NVRTC loaded at build time.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::locate::find_nvcc;
use crate::nvrtc::Nvrtc;
use crate::{ptx_isa, Ptx, HOW_TO_GET_A_COMPILER};

pub enum Compiler {
    Nvcc(PathBuf),
    Nvrtc(Nvrtc),
}

impl Compiler {
    /// The compiler to use: `forced` is `INCEPT_PTX_COMPILER` (`nvcc`, `nvrtc`, or empty for
    /// nvcc if found, else NVRTC). The error lists every place looked in and how to get one.
    pub fn find(forced: &str) -> Result<Compiler, String> {
        let mut tried = Vec::new();
        match forced.trim() {
            "" => {
                if let Some(nvcc) = find_nvcc(&mut tried) {
                    return Ok(Compiler::Nvcc(nvcc));
                }
                Nvrtc::find(&mut tried).map(Compiler::Nvrtc)
            }
            "nvcc" => find_nvcc(&mut tried).map(Compiler::Nvcc).ok_or(()),
            "nvrtc" => Nvrtc::find(&mut tried).map(Compiler::Nvrtc),
            other => {
                return Err(format!(
                    "INCEPT_PTX_COMPILER={other:?}: expected `nvcc` or `nvrtc` (or unset)"
                ))
            }
        }
        .map_err(|()| {
            let mut msg = String::from("no CUDA compiler found for cuda/*.cu. Looked for:\n");
            for t in &tried {
                let _ = writeln!(msg, "  - {t}");
            }
            msg + "\n" + HOW_TO_GET_A_COMPILER
        })
    }

    pub fn describe(&self) -> String {
        match self {
            Compiler::Nvcc(path) => format!("nvcc ({})", path.display()),
            Compiler::Nvrtc(n) => {
                format!("NVRTC {}.{} ({})", n.version.0, n.version.1, n.path.display())
            }
        }
    }

    /// Compiles `src` to `out_dir/<stem>.ptx`.
    pub fn compile(
        &self, src: &Path, cuda_dir: &Path, out_dir: &Path, arch: &str,
    ) -> Result<Ptx, String> {
        let stem = src
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| format!("{}: file name is not UTF-8", src.display()))?
            .to_string();
        let out = out_dir.join(format!("{stem}.ptx"));
        let (ptx, log) = match self {
            Compiler::Nvcc(nvcc) => compile_nvcc(nvcc, src, cuda_dir, &out, arch)?,
            Compiler::Nvrtc(nvrtc) => {
                let (ptx, log) = nvrtc.compile(src, cuda_dir, arch)?;
                fs::write(&out, &ptx)
                    .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
                (ptx, log)
            }
        };
        Ok(Ptx { stem, isa: ptx_isa(&ptx), log: log.trim().to_string() })
    }
}

/// Returns (PTX, warnings).
fn compile_nvcc(
    nvcc: &Path, src: &Path, cuda_dir: &Path, out: &Path, arch: &str,
) -> Result<(String, String), String> {
    let output = Command::new(nvcc)
        .arg("-ptx")
        .arg(format!("-arch={arch}"))
        .args(["-std=c++17", "-O3"])
        .arg("-I")
        .arg(cuda_dir)
        .arg(src)
        .arg("-o")
        .arg(out)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", nvcc.display()))?;
    if !output.status.success() {
        return Err(format!(
            "nvcc failed to compile {} ({}):\n{}{}",
            src.display(),
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let ptx = fs::read_to_string(out).map_err(|e| format!("cannot read {}: {e}", out.display()))?;
    let log = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    Ok((ptx, log))
}
