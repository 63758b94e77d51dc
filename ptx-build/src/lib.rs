//! Compiles the CUDA kernels of a crate (`cuda/*.cu`) to PTX and cubins, for its build script:
//! the compiler (nvcc, or NVRTC loaded at build time from a toolkit or the NVIDIA pip wheels),
//! `ptxas` for the cubins, and the generated `kernels.rs` that embeds them:
//!
//! ```ignore
//! pub const PTX: &[(&str, &str)] = &[("concat", include_str!(...)), ...]; // (module, PTX)
//! pub const PTX_ISA: &str = "8.7";        // `.version` line of the PTX
//! pub const PTX_MIN_DRIVER: i32 = 12080;  // oldest driver (cuDriverGetVersion) that loads it
//! pub const PTX_ARCH: &str = "compute_80";
//! pub const PTX_COMPILER: &str = "NVRTC 12.8 (/path/libnvrtc.so.12)";
//! pub const CUBIN: &[(&str, u32, &[u8])] = &[("concat", 80, include_bytes!(...)), ...];
//! ```
//!
//! Functions that are given their settings (architectures, the forced compiler) rather than
//! reading the environment, so the build script says what it reads. Progress and warnings are
//! printed as `cargo:warning=` lines.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

mod compiler;
pub mod locate;
mod nvrtc;

pub use compiler::Compiler;
use locate::find_ptxas;

pub const HOW_TO_GET_A_COMPILER: &str = "\
The `cudnn` feature compiles cuda/*.cu to PTX at build time and needs one of:
  - the CUDA toolkit (nvcc, or lib64/libnvrtc.so + include/): set CUDA_HOME to its root
    (e.g. CUDA_HOME=/usr/local/cuda), or put nvcc on PATH;
  - NVRTC from PyPI, no toolkit needed:
        python3 -m venv /tmp/incept-cuda-venv
        /tmp/incept-cuda-venv/bin/pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12
        export INCEPT_PYTHON=/tmp/incept-cuda-venv/bin/python
    (INCEPT_PYTHON is needed when pip installed into a venv). `scripts/cuda-venv.sh` does all
    three with the versions CI uses (12.4: a newer NVRTC emits PTX that needs a newer driver);
  - or INCEPT_NVRTC=/path/to/libnvrtc.so.12.
Build without `--features cudnn` for the CPU-only binary, which needs none of this.";

/// One compiled kernel file.
#[derive(Debug)]
pub struct Ptx {
    pub stem: String,
    pub isa: String,
    /// The compiler's warnings (empty when clean).
    pub log: String,
}

/// Compiles every source to `out_dir/<stem>.ptx`, a thread each (NVRTC programs are
/// thread-safe); all the failures together in one error.
pub fn compile_all(
    compiler: &Compiler, sources: &[PathBuf], cuda_dir: &Path, out_dir: &Path, arch: &str,
) -> Result<Vec<Ptx>, String> {
    let mut compiled = Vec::new();
    // Files compile independently: use a thread each (NVRTC programs are thread-safe).
    let results: Vec<Result<Ptx, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = sources
            .iter()
            .map(|src| scope.spawn(|| compiler.compile(src, cuda_dir, out_dir, arch)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("compiler thread panicked".into())))
            .collect()
    });
    let mut errors = Vec::new();
    for result in results {
        match result {
            Ok(ptx) => compiled.push(ptx),
            Err(e) => errors.push(e),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("\n\n"));
    }
    Ok(compiled)
}

/// `INCEPT_CUDA_ARCH` as a virtual architecture: `compute_80` (default), also `sm_80` or `80`.
pub fn target_arch(raw: &str) -> Result<String, String> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok("compute_80".into());
    }
    let digits = raw.strip_prefix("compute_").or_else(|| raw.strip_prefix("sm_")).unwrap_or(raw);
    let numeric_len = digits.chars().take_while(char::is_ascii_digit).count();
    let suffix = &digits[numeric_len..];
    if numeric_len < 2 || !(suffix.is_empty() || suffix == "a" || suffix == "f") {
        return Err(format!(
            "INCEPT_CUDA_ARCH={raw:?} is not a CUDA architecture: use e.g. compute_80, compute_90, sm_80 or 80"
        ));
    }
    Ok(format!("compute_{digits}"))
}

/// Deletes `*.ptx` left in OUT_DIR by a `.cu` file that no longer exists, so that nothing
/// (scripts/ptx-check.sh) mistakes it for a current kernel.
pub fn remove_stale_ptx(out_dir: &Path, compiled: &[Ptx]) {
    let Ok(entries) = fs::read_dir(out_dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
        if path.extension().is_some_and(|e| e == "ptx") && !compiled.iter().any(|p| p.stem == stem)
        {
            let _ = fs::remove_file(&path);
        }
    }
}

/// One assembled cubin: module, architecture (80 for sm_80), file in OUT_DIR.
#[derive(Debug)]
pub struct Cubin {
    pub stem: String,
    pub sm: u32,
    pub file: String,
}

/// Assembles every PTX for the architectures of `INCEPT_CUBIN_ARCHS` with ptxas, if there is
/// one. Without ptxas there are no cubins (the PTX alone works on every GPU the driver can
/// JIT for); a ptxas that fails is an error, since the PTX would fail the same way.
pub fn assemble_cubins(
    out_dir: &Path, compiled: &[Ptx], archs: &str,
) -> Result<Vec<Cubin>, String> {
    for entry in fs::read_dir(out_dir).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|e| e == "cubin") {
            let _ = fs::remove_file(entry.path());
        }
    }
    let mut sms = Vec::new();
    for a in archs.split_whitespace() {
        let sm: u32 = a
            .trim_start_matches("sm_")
            .parse()
            .map_err(|_| format!("INCEPT_CUBIN_ARCHS: {a:?} is not an architecture like sm_90"))?;
        sms.push(sm);
    }
    if sms.is_empty() || compiled.is_empty() {
        return Ok(Vec::new());
    }
    let Some(ptxas) = find_ptxas() else {
        println!("cargo:warning=incept: no ptxas found (CUDA toolkit, or pip install nvidia-cuda-nvcc-cu12): PTX only, JIT-compiled by the driver at start-up");
        return Ok(Vec::new());
    };
    let jobs: Vec<(String, u32)> =
        compiled.iter().flat_map(|p| sms.iter().map(move |&sm| (p.stem.clone(), sm))).collect();
    let results: Vec<Result<Cubin, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = jobs
            .iter()
            .map(|(stem, sm)| {
                let ptxas = &ptxas;
                scope.spawn(move || {
                    let file = format!("{stem}.sm_{sm}.cubin");
                    let out = Command::new(ptxas)
                        .arg(format!("-arch=sm_{sm}"))
                        .arg("-O3")
                        .arg("-o")
                        .arg(out_dir.join(&file))
                        .arg(out_dir.join(format!("{stem}.ptx")))
                        .output()
                        .map_err(|e| format!("cannot run {}: {e}", ptxas.display()))?;
                    if !out.status.success() {
                        return Err(format!(
                            "{} -arch=sm_{sm} {stem}.ptx failed:\n{}",
                            ptxas.display(),
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                    Ok(Cubin { stem: stem.clone(), sm: *sm, file })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("ptxas thread panicked".into())))
            .collect()
    });
    let cubins = results.into_iter().collect::<Result<Vec<_>, _>>()?;
    println!(
        "cargo:warning=incept: {} cubins for {} with {}",
        cubins.len(),
        archs.trim(),
        ptxas.display()
    );
    Ok(cubins)
}

/// The text of `OUT_DIR/kernels.rs` (see the crate's documentation).
pub fn kernels_rs(
    compiled: &[Ptx], isa: &str, arch: &str, compiler: &str, cubins: &[Cubin],
) -> String {
    let mut rs = String::new();
    let _ = writeln!(
        rs,
        "// Generated by build.rs: cuda/*.cu compiled to PTX ISA {isa} for {arch} with {compiler}."
    );
    rs.push_str("\n/// (module name = file stem of cuda/<name>.cu, PTX text), sorted by name.\n");
    rs.push_str("#[allow(dead_code)]\npub const PTX: &[(&str, &str)] = &[\n");
    for ptx in compiled {
        let _ = writeln!(
            rs,
            "    ({:?}, include_str!(concat!(env!(\"OUT_DIR\"), {:?}))),",
            ptx.stem,
            format!("/{}.ptx", ptx.stem)
        );
    }
    rs.push_str("];\n");
    rs.push_str(
        "\n/// (module, real architecture as 10·major + minor, cubin) assembled by ptxas from the PTX.\n",
    );
    rs.push_str("#[allow(dead_code)]\npub const CUBIN: &[(&str, u32, &[u8])] = &[\n");
    for c in cubins {
        let _ = writeln!(
            rs,
            "    ({:?}, {}, include_bytes!(concat!(env!(\"OUT_DIR\"), {:?}))),",
            c.stem,
            c.sm,
            format!("/{}", c.file)
        );
    }
    rs.push_str("];\n");
    let _ = write!(
        rs,
        "\n/// PTX ISA version (the `.version` line) of the embedded PTX. A driver older than the\n\
         /// CUDA release that introduced it rejects the module (CUDA_ERROR_UNSUPPORTED_PTX_VERSION).\n\
         #[allow(dead_code)]\npub const PTX_ISA: &str = {isa:?};\n\
         \n/// Oldest driver that loads the PTX, as cuDriverGetVersion reports it (12080 = CUDA 12.8);\n\
         /// 0 if unknown.\n\
         #[allow(dead_code)]\npub const PTX_MIN_DRIVER: i32 = {};\n\
         \n/// Virtual architecture the PTX was generated for (JIT-compiled for this GPU and newer).\n\
         #[allow(dead_code)]\npub const PTX_ARCH: &str = {arch:?};\n\
         \n/// The compiler build.rs used.\n\
         #[allow(dead_code)]\npub const PTX_COMPILER: &str = {compiler:?};\n",
        min_driver_for_isa(isa)
    );
    rs
}

/// CUDA release (cuDriverGetVersion format) that introduced a PTX ISA version: ISA 7.x came with
/// CUDA 11.x, 8.0-8.5 with 12.0-12.5, 8.6 with 12.7, 8.7 with 12.8, 8.8 with 12.9, 9.0 with 13.0.
pub fn min_driver_for_isa(isa: &str) -> i32 {
    let Some((major, minor)) = isa.split_once('.') else {
        return 0;
    };
    let (Ok(major), Ok(minor)) = (major.parse::<i32>(), minor.parse::<i32>()) else {
        return 0;
    };
    match (major, minor) {
        (7, m) => 11000 + 10 * m,
        (8, m @ 0..=5) => 12000 + 10 * m,
        (8, m) => 12010 + 10 * m,
        (9, m) => 13000 + 10 * m,
        _ => 0,
    }
}

/// The `.version` line's value in a PTX text.
pub fn ptx_isa(ptx: &str) -> String {
    ptx.lines()
        .find_map(|l| l.trim().strip_prefix(".version"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn architectures_are_read_in_every_spelling_and_nonsense_is_refused() {
        assert_eq!(target_arch("").unwrap(), "compute_80");
        for raw in ["compute_90", "sm_90", "90", " 90 "] {
            assert_eq!(target_arch(raw).unwrap(), "compute_90", "{raw:?}");
        }
        assert_eq!(target_arch("sm_90a").unwrap(), "compute_90a");
        for bad in ["9", "sm_x", "compute_90b", "hopper"] {
            let err = target_arch(bad).unwrap_err();
            assert!(err.contains("INCEPT_CUDA_ARCH") && err.contains(bad.trim()), "{err}");
        }
    }

    #[test]
    fn the_ptx_isa_gives_the_oldest_driver_that_loads_it() {
        let ptx = "//\n// Generated by NVIDIA NVVM Compiler\n.version 8.4\n.target sm_80\n";
        assert_eq!(ptx_isa(ptx), "8.4");
        assert_eq!(ptx_isa(".target sm_80"), "unknown");
        assert_eq!(min_driver_for_isa("8.4"), 12040);
        assert_eq!(min_driver_for_isa("8.7"), 12080);
        assert_eq!(min_driver_for_isa("9.0"), 13000);
        assert_eq!(min_driver_for_isa("7.8"), 11080);
        assert_eq!(min_driver_for_isa("unknown"), 0);
        assert_eq!(min_driver_for_isa("8.4,8.7"), 0, "mixed ISAs have no single answer");
    }

    #[test]
    fn kernels_rs_embeds_every_ptx_and_cubin() {
        let ptx = |stem: &str| Ptx { stem: stem.into(), isa: "8.4".into(), log: String::new() };
        let cubin = Cubin { stem: "pool".into(), sm: 90, file: "pool.sm_90.cubin".into() };
        let rs = kernels_rs(
            &[ptx("concat"), ptx("pool")],
            "8.4",
            "compute_80",
            "nvcc (/x/nvcc)",
            &[cubin],
        );
        for needle in [
            r#"("concat", include_str!(concat!(env!("OUT_DIR"), "/concat.ptx")))"#,
            r#"("pool", include_str!(concat!(env!("OUT_DIR"), "/pool.ptx")))"#,
            r#"("pool", 90, include_bytes!(concat!(env!("OUT_DIR"), "/pool.sm_90.cubin")))"#,
            r#"pub const PTX_ISA: &str = "8.4";"#,
            "pub const PTX_MIN_DRIVER: i32 = 12040;",
            r#"pub const PTX_ARCH: &str = "compute_80";"#,
            r#"pub const PTX_COMPILER: &str = "nvcc (/x/nvcc)";"#,
        ] {
            assert!(rs.contains(needle), "no {needle} in\n{rs}");
        }
    }

    #[test]
    fn a_bad_cubin_architecture_is_an_error_and_none_means_no_cubins() {
        let dir = std::env::temp_dir().join(format!("ptx-build-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let compiled = [Ptx { stem: "concat".into(), isa: "8.4".into(), log: String::new() }];
        let err = assemble_cubins(&dir, &compiled, "sm_90 hopper").unwrap_err();
        assert!(err.contains("INCEPT_CUBIN_ARCHS") && err.contains("hopper"), "{err}");
        assert!(assemble_cubins(&dir, &compiled, " ").unwrap().is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_unknown_forced_compiler_is_refused_by_name() {
        let err = Compiler::find("clang").err().unwrap();
        assert!(err.contains("INCEPT_PTX_COMPILER") && err.contains("clang"), "{err}");
    }

    #[test]
    fn nvrtc_libraries_in_a_folder_come_unversioned_first() {
        let dir = std::env::temp_dir().join(format!("ptx-build-nvrtc-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for f in ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so", "libother.so"] {
            fs::write(dir.join(f), b"").unwrap();
        }
        let found: Vec<String> = locate::nvrtc_files_in(&dir)
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(found, ["libnvrtc.so", "libnvrtc.so.12", "libnvrtc.so.13"]);
        let _ = fs::remove_dir_all(&dir);
    }
}
