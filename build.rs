//! With the `cudnn` feature, compiles every `cuda/*.cu` to PTX in OUT_DIR (`<stem>.ptx`) and
//! writes `OUT_DIR/kernels.rs`, which the CUDA backend includes:
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
//! Where `ptxas` is found (CUDA toolkit, or the pip wheel `nvidia-cuda-nvcc-cu12`), each PTX is
//! also assembled for the real GPUs of `INCEPT_CUBIN_ARCHS` (default `sm_80 sm_90`): the
//! backend loads the cubin matching the GPU, which needs no JIT at start-up and no driver that
//! knows the PTX's ISA version, and falls back to the PTX for other GPUs.
//!
//! Without the feature it does nothing and needs nothing.
//!
//! Compiler: `nvcc` (CUDA toolkit) if found, else NVRTC loaded at build time with libloading:
//! from a toolkit, or from the pip wheels `nvidia-cuda-nvrtc-cu12` + `nvidia-cuda-runtime-cu12`
//! (headers) in the site-packages of `$INCEPT_PYTHON` or `python3`. Environment:
//!
//! | variable | meaning |
//! | --- | --- |
//! | `INCEPT_CUDA_ARCH` | virtual architecture, default `compute_80` (PTX that JITs on sm_80+) |
//! | `INCEPT_PTX_COMPILER` | `nvcc` or `nvrtc` to force one (default: nvcc if found) |
//! | `INCEPT_NVRTC` | path of a libnvrtc.so (or its folder) to use |
//! | `INCEPT_PYTHON` | interpreter (e.g. a venv's) whose site-packages hold the NVIDIA wheels |
//! | `CUDA_HOME`, `CUDA_PATH` | CUDA toolkit root (`bin/nvcc`, `lib64/libnvrtc.so`, `include/`) |
//! | `INCEPT_CUBIN_ARCHS` | real architectures to assemble cubins for (default `sm_80 sm_90`; empty: none) |
//! | `INCEPT_PTXAS` | the `ptxas` to use |

use std::env;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{self, Command};

const ENV_VARS: &[&str] = &[
    "INCEPT_CUDA_ARCH",
    "INCEPT_PTX_COMPILER",
    "INCEPT_NVRTC",
    "INCEPT_PYTHON",
    "CUDA_HOME",
    "CUDA_PATH",
    "PATH",
    "INCEPT_CUBIN_ARCHS",
    "INCEPT_PTXAS",
];

const HOW_TO_GET_A_COMPILER: &str = "\
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

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDNN").is_none() {
        return;
    }
    for var in ENV_VARS {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if let Err(msg) = build_kernels() {
        eprintln!("\nerror: {msg}\n");
        process::exit(1);
    }
    build_nvtx();
}

/// Compiles cuda/nvtx.c against NVIDIA's header-only NVTX 3 (the CUDA toolkit's
/// `include/nvtx3`, or the `nvidia-nvtx` wheel's) and sets `cfg(incept_nvtx)`; without the
/// headers the binary is built without profiler ranges, and `incept info` says so.
fn build_nvtx() {
    println!("cargo:rustc-check-cfg=cfg(incept_nvtx)");
    println!("cargo:rerun-if-changed=cuda/nvtx.c");
    let mut dirs: Vec<PathBuf> = toolkit_roots()
        .into_iter()
        .map(|(_, root)| root.join("include"))
        .collect();
    for site in site_packages(&mut Vec::new()) {
        for sub in [
            "nvidia/nvtx/include",
            "nvidia/cu13/include",
            "nvidia/cuda_runtime/include",
        ] {
            dirs.push(site.join(sub));
        }
    }
    let Some(dir) = dirs
        .into_iter()
        .find(|d| d.join("nvtx3/nvToolsExt.h").is_file())
    else {
        println!(
            "cargo:warning=incept: NVTX 3 headers (nvtx3/nvToolsExt.h) not found under $CUDA_HOME/include or the nvidia-nvtx wheel: building without profiler ranges"
        );
        return;
    };
    cc::Build::new()
        .file("cuda/nvtx.c")
        .include(&dir)
        .warnings(false)
        .compile("incept_nvtx");
    // NVTX 3 loads the profiler's injection library with dlopen.
    println!("cargo:rustc-link-lib=dl");
    println!("cargo:rustc-cfg=incept_nvtx");
    println!("cargo:warning=incept: NVTX 3 ranges from {}", dir.display());
}

/// One compiled kernel file.
struct Ptx {
    stem: String,
    isa: String,
    /// The compiler's warnings (empty when clean).
    log: String,
}

fn build_kernels() -> Result<(), String> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").map_err(|e| e.to_string())?);
    let out_dir = PathBuf::from(env::var("OUT_DIR").map_err(|e| e.to_string())?);
    let cuda_dir = manifest.join("cuda");
    let arch = target_arch()?;

    println!("cargo:rerun-if-changed={}", cuda_dir.display());
    let mut sources = Vec::new();
    if cuda_dir.is_dir() {
        let entries = fs::read_dir(&cuda_dir)
            .map_err(|e| format!("cannot list {}: {e}", cuda_dir.display()))?;
        for entry in entries {
            let path = entry.map_err(|e| e.to_string())?.path();
            if path.is_file() {
                println!("cargo:rerun-if-changed={}", path.display());
                if path.extension().is_some_and(|ext| ext == "cu") {
                    sources.push(path);
                }
            }
        }
    }
    sources.sort();

    let compiler = if sources.is_empty() {
        None
    } else {
        Some(Compiler::find()?)
    };
    let mut compiled = Vec::new();
    if let Some(compiler) = &compiler {
        // Files compile independently: use a thread each (NVRTC programs are thread-safe).
        let results: Vec<Result<Ptx, String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = sources
                .iter()
                .map(|src| scope.spawn(|| compiler.compile(src, &cuda_dir, &out_dir, &arch)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err("compiler thread panicked".into()))
                })
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
    }
    remove_stale_ptx(&out_dir, &compiled);
    // Warnings of a successful compile, shown by cargo (at most 20 lines a file).
    for ptx in &compiled {
        for line in ptx.log.lines().filter(|l| !l.trim().is_empty()).take(20) {
            println!("cargo:warning=cuda/{}.cu: {line}", ptx.stem);
        }
    }

    let mut isas: Vec<&str> = compiled.iter().map(|p| p.isa.as_str()).collect();
    isas.sort();
    isas.dedup();
    let isa = isas.join(",");
    let compiler_name = compiler
        .as_ref()
        .map_or("none".to_string(), Compiler::describe);
    let cubins = assemble_cubins(&out_dir, &compiled)?;
    write_kernels_rs(&out_dir, &compiled, &isa, &arch, &compiler_name, &cubins)?;
    if compiled.is_empty() {
        println!("cargo:warning=incept: no cuda/*.cu to compile; the PTX table is empty");
    } else {
        println!(
            "cargo:warning=incept: {} cuda/*.cu -> PTX ISA {isa} for {arch} with {compiler_name}",
            compiled.len()
        );
    }
    Ok(())
}

/// `INCEPT_CUDA_ARCH` as a virtual architecture: `compute_80` (default), also `sm_80` or `80`.
fn target_arch() -> Result<String, String> {
    let raw = env::var("INCEPT_CUDA_ARCH").unwrap_or_default();
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok("compute_80".into());
    }
    let digits = raw
        .strip_prefix("compute_")
        .or_else(|| raw.strip_prefix("sm_"))
        .unwrap_or(raw);
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
fn remove_stale_ptx(out_dir: &Path, compiled: &[Ptx]) {
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

/// `ptxas`: `$INCEPT_PTXAS`, the toolkit's, PATH's, else the pip wheel nvidia-cuda-nvcc-cu12's.
fn find_ptxas() -> Option<PathBuf> {
    if let Some(p) = env_path("INCEPT_PTXAS") {
        return Some(p);
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env_path(var) {
            let p = root.join("bin/ptxas");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let usr = PathBuf::from("/usr/local/cuda/bin/ptxas");
    if usr.is_file() {
        return Some(usr);
    }
    if let Some(path) = env::var_os("PATH") {
        if let Some(p) = env::split_paths(&path)
            .map(|d| d.join("ptxas"))
            .find(|p| p.is_file())
        {
            return Some(p);
        }
    }
    site_packages(&mut Vec::new())
        .into_iter()
        .map(|d| d.join("nvidia/cuda_nvcc/bin/ptxas"))
        .find(|p| p.is_file())
}

/// One assembled cubin: module, architecture (80 for sm_80), file in OUT_DIR.
struct Cubin {
    stem: String,
    sm: u32,
    file: String,
}

/// Assembles every PTX for the architectures of `INCEPT_CUBIN_ARCHS` with ptxas, if there is
/// one. Without ptxas there are no cubins (the PTX alone works on every GPU the driver can
/// JIT for); a ptxas that fails is an error, since the PTX would fail the same way.
fn assemble_cubins(out_dir: &Path, compiled: &[Ptx]) -> Result<Vec<Cubin>, String> {
    for entry in fs::read_dir(out_dir).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|e| e == "cubin") {
            let _ = fs::remove_file(entry.path());
        }
    }
    let archs = env::var("INCEPT_CUBIN_ARCHS").unwrap_or_else(|_| "sm_80 sm_90".into());
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
    let jobs: Vec<(String, u32)> = compiled
        .iter()
        .flat_map(|p| sms.iter().map(move |&sm| (p.stem.clone(), sm)))
        .collect();
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
                    Ok(Cubin {
                        stem: stem.clone(),
                        sm: *sm,
                        file,
                    })
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("ptxas thread panicked".into()))
            })
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

fn write_kernels_rs(
    out_dir: &Path,
    compiled: &[Ptx],
    isa: &str,
    arch: &str,
    compiler: &str,
    cubins: &[Cubin],
) -> Result<(), String> {
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
    let path = out_dir.join("kernels.rs");
    fs::write(&path, rs).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// CUDA release (cuDriverGetVersion format) that introduced a PTX ISA version: ISA 7.x came with
/// CUDA 11.x, 8.0-8.5 with 12.0-12.5, 8.6 with 12.7, 8.7 with 12.8, 8.8 with 12.9, 9.0 with 13.0.
fn min_driver_for_isa(isa: &str) -> i32 {
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
fn ptx_isa(ptx: &str) -> String {
    ptx.lines()
        .find_map(|l| l.trim().strip_prefix(".version"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

enum Compiler {
    Nvcc(PathBuf),
    Nvrtc(Nvrtc),
}

impl Compiler {
    fn find() -> Result<Compiler, String> {
        let forced = env::var("INCEPT_PTX_COMPILER").unwrap_or_default();
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

    fn describe(&self) -> String {
        match self {
            Compiler::Nvcc(path) => format!("nvcc ({})", path.display()),
            Compiler::Nvrtc(n) => format!(
                "NVRTC {}.{} ({})",
                n.version.0,
                n.version.1,
                n.path.display()
            ),
        }
    }

    /// Compiles `src` to `out_dir/<stem>.ptx`.
    fn compile(
        &self,
        src: &Path,
        cuda_dir: &Path,
        out_dir: &Path,
        arch: &str,
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
        Ok(Ptx {
            stem,
            isa: ptx_isa(&ptx),
            log: log.trim().to_string(),
        })
    }
}

/// An error with its sources ("dlopen failed: libnvrtc.so: cannot open shared object file").
fn chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg = format!("{msg}: {s}");
        source = s.source();
    }
    msg
}

fn env_path(var: &str) -> Option<PathBuf> {
    env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// CUDA toolkit roots named by the environment, then the usual install location.
fn toolkit_roots() -> Vec<(String, PathBuf)> {
    let mut roots = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env_path(var) {
            roots.push((format!("${var}"), root));
        }
    }
    roots.push(("default".into(), PathBuf::from("/usr/local/cuda")));
    roots
}

fn find_nvcc(tried: &mut Vec<String>) -> Option<PathBuf> {
    for (origin, root) in toolkit_roots() {
        let nvcc = root.join("bin/nvcc");
        if nvcc.is_file() {
            return Some(nvcc);
        }
        tried.push(format!("nvcc: {} ({origin})", nvcc.display()));
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let nvcc = dir.join("nvcc");
            if nvcc.is_file() {
                return Some(nvcc);
            }
        }
    }
    tried.push("nvcc: on PATH".into());
    None
}

/// Returns (PTX, warnings).
fn compile_nvcc(
    nvcc: &Path,
    src: &Path,
    cuda_dir: &Path,
    out: &Path,
    arch: &str,
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

/// site-packages folders of `$INCEPT_PYTHON` (first) and `python3`, where pip puts the NVIDIA
/// wheels (`nvidia/cuda_nvrtc/lib`, `nvidia/cuda_runtime/include`).
fn site_packages(tried: &mut Vec<String>) -> Vec<PathBuf> {
    const SCRIPT: &str = "import site, sys\n\
        d = []\n\
        try: d += site.getsitepackages()\n\
        except Exception: pass\n\
        try: d.append(site.getusersitepackages())\n\
        except Exception: pass\n\
        d += [p for p in sys.path if p.endswith(('site-packages', 'dist-packages'))]\n\
        print('\\n'.join(d))";
    let mut pythons = Vec::new();
    if let Some(py) = env_path("INCEPT_PYTHON") {
        pythons.push(py);
    }
    pythons.push(PathBuf::from("python3"));
    let mut dirs: Vec<PathBuf> = Vec::new();
    for py in pythons {
        match Command::new(&py).args(["-c", SCRIPT]).output() {
            Ok(out) if out.status.success() => {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    let dir = PathBuf::from(line.trim());
                    if !line.trim().is_empty() && dir.is_dir() && !dirs.contains(&dir) {
                        dirs.push(dir);
                    }
                }
            }
            Ok(out) => tried.push(format!(
                "python {}: failed ({}): {}",
                py.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            )),
            Err(e) => tried.push(format!("python {}: cannot run it: {e}", py.display())),
        }
    }
    dirs
}

type NvrtcProgram = *mut c_void;

/// libnvrtc, loaded at build time.
struct Nvrtc {
    lib: libloading::Library,
    path: PathBuf,
    version: (c_int, c_int),
    /// The folder holding cuda_fp16.h / cuda_bf16.h (none if not found).
    includes: Vec<PathBuf>,
}

/// Library file names of NVRTC in a folder, preferred first.
fn nvrtc_files_in(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = ["libnvrtc.so", "libnvrtc.so.12"]
        .iter()
        .map(|n| dir.join(n))
        .filter(|p| p.is_file())
        .collect();
    if let Ok(entries) = fs::read_dir(dir) {
        let mut others: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("libnvrtc.so."))
            })
            .filter(|p| !found.contains(p))
            .collect();
        others.sort();
        found.extend(others);
    }
    found
}

impl Nvrtc {
    fn find(tried: &mut Vec<String>) -> Result<Nvrtc, ()> {
        // (library, where it came from, folders to look for headers in first)
        let mut candidates: Vec<(PathBuf, String, Vec<PathBuf>)> = Vec::new();
        if let Some(explicit) = env_path("INCEPT_NVRTC") {
            let files = if explicit.is_dir() {
                nvrtc_files_in(&explicit)
            } else {
                vec![explicit.clone()]
            };
            if files.is_empty() || !files[0].exists() {
                tried.push(format!(
                    "INCEPT_NVRTC={}: no libnvrtc there",
                    explicit.display()
                ));
                return Err(());
            }
            let lib = files[0].clone();
            return match Nvrtc::load(&lib, Vec::new()) {
                Ok(n) => Ok(n),
                Err(e) => {
                    tried.push(format!("INCEPT_NVRTC={}: {e}", lib.display()));
                    Err(())
                }
            };
        }
        for (origin, root) in toolkit_roots() {
            let mut any = false;
            for sub in [
                "lib64",
                "lib",
                "targets/x86_64-linux/lib",
                "targets/sbsa-linux/lib",
            ] {
                for lib in nvrtc_files_in(&root.join(sub)) {
                    any = true;
                    candidates.push((lib, origin.clone(), vec![root.join("include")]));
                }
            }
            if !any {
                tried.push(format!("libnvrtc: {}/lib64 ({origin})", root.display()));
            }
        }
        let sites = site_packages(tried);
        let mut any_wheel = false;
        for site in &sites {
            let nv = site.join("nvidia");
            // cuda_nvrtc: CUDA 12 wheels; cu13: the CUDA 13 wheels' merged layout.
            for (lib_dir, inc) in [
                (nv.join("cuda_nvrtc/lib"), nv.join("cuda_runtime/include")),
                (nv.join("cu13/lib"), nv.join("cu13/include")),
            ] {
                for lib in nvrtc_files_in(&lib_dir) {
                    any_wheel = true;
                    candidates.push((
                        lib,
                        format!("pip wheel in {}", site.display()),
                        vec![inc.clone()],
                    ));
                }
            }
        }
        if !any_wheel {
            let shown: Vec<String> = sites.iter().map(|s| s.display().to_string()).collect();
            tried.push(format!(
                "libnvrtc from the pip wheel nvidia-cuda-nvrtc-cu12 (nvidia/cuda_nvrtc/lib) in the site-packages of $INCEPT_PYTHON{} and python3: [{}]",
                env::var("INCEPT_PYTHON").map(|p| format!(" ({p})")).unwrap_or_else(|_| " (unset)".into()),
                shown.join(", ")
            ));
        }
        // Last: the dynamic loader's own search (ldconfig, LD_LIBRARY_PATH), e.g. Debian's
        // libnvrtc12 package.
        for name in ["libnvrtc.so", "libnvrtc.so.12"] {
            candidates.push((
                PathBuf::from(name),
                "system library path".into(),
                Vec::new(),
            ));
        }

        for (lib, origin, include_first) in candidates {
            match Nvrtc::load(&lib, include_first) {
                Ok(n) => return Ok(n),
                Err(e) => tried.push(format!("{} ({origin}): {e}", lib.display())),
            }
        }
        Err(())
    }

    fn load(path: &Path, include_first: Vec<PathBuf>) -> Result<Nvrtc, String> {
        // SAFETY: loading libnvrtc runs only its initialisers; it is a plain C library.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| chain(&e))?;
        let mut version = (0, 0);
        // SAFETY: signature of nvrtcVersion from nvrtc.h.
        unsafe {
            let f = lib
                .get::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int>("nvrtcVersion")
                .map_err(|e| chain(&e))?;
            let rc = f(&mut version.0, &mut version.1);
            if rc != 0 {
                return Err(format!("nvrtcVersion returned {rc}"));
            }
        }
        // The folder holding cuda_fp16.h / cuda_bf16.h. Headers of another CUDA version than
        // NVRTC's may not compile, so the ones installed beside this NVRTC come first.
        let mut header_dirs = include_first;
        if let Some(root) = path.parent().and_then(Path::parent) {
            // A toolkit: lib64/libnvrtc.so and include/.
            header_dirs.push(root.join("include"));
            // The wheels: nvidia/cuda_nvrtc/lib and nvidia/cuda_runtime/include.
            if let Some(nvidia) = root.parent() {
                header_dirs.push(nvidia.join("cuda_runtime/include"));
            }
        }
        for (_, root) in toolkit_roots() {
            header_dirs.push(root.join("include"));
        }
        let has_fp16 = |dir: &PathBuf| dir.join("cuda_fp16.h").is_file();
        if !header_dirs.iter().any(has_fp16) {
            let mut ignored = Vec::new();
            for site in site_packages(&mut ignored) {
                header_dirs.push(site.join("nvidia/cuda_runtime/include"));
            }
        }
        header_dirs.push(PathBuf::from("/usr/include"));
        let includes: Vec<PathBuf> = header_dirs.into_iter().find(has_fp16).into_iter().collect();
        Ok(Nvrtc {
            path: path.to_path_buf(),
            lib,
            version,
            includes,
        })
    }

    /// # Safety
    /// `T` must be the C signature of `name` in nvrtc.h.
    unsafe fn sym<T>(&self, name: &str) -> Result<libloading::Symbol<'_, T>, String> {
        self.lib
            .get::<T>(name)
            .map_err(|e| format!("{}: no symbol {name}: {}", self.path.display(), chain(&e)))
    }

    /// Returns (PTX, compile log: warnings).
    fn compile(&self, src: &Path, cuda_dir: &Path, arch: &str) -> Result<(String, String), String> {
        let text =
            fs::read_to_string(src).map_err(|e| format!("cannot read {}: {e}", src.display()))?;
        let source =
            CString::new(text).map_err(|_| format!("{}: contains a NUL byte", src.display()))?;
        let name = CString::new(
            src.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .as_bytes(),
        )
        .map_err(|e| e.to_string())?;
        let mut options = vec![
            format!("--gpu-architecture={arch}"),
            "-std=c++17".to_string(),
            "-default-device".to_string(),
            format!("-I{}", cuda_dir.display()),
        ];
        for inc in &self.includes {
            options.push(format!("-I{}", inc.display()));
        }
        let options: Vec<CString> = options
            .into_iter()
            .map(|o| CString::new(o).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let option_ptrs: Vec<*const c_char> = options.iter().map(|o| o.as_ptr()).collect();

        type CreateFn = unsafe extern "C" fn(
            *mut NvrtcProgram,
            *const c_char,
            *const c_char,
            c_int,
            *const *const c_char,
            *const *const c_char,
        ) -> c_int;
        type CompileFn = unsafe extern "C" fn(NvrtcProgram, c_int, *const *const c_char) -> c_int;
        type SizeFn = unsafe extern "C" fn(NvrtcProgram, *mut usize) -> c_int;
        type GetFn = unsafe extern "C" fn(NvrtcProgram, *mut c_char) -> c_int;
        type DestroyFn = unsafe extern "C" fn(*mut NvrtcProgram) -> c_int;
        type ErrStrFn = unsafe extern "C" fn(c_int) -> *const c_char;

        // SAFETY: the signatures are those of nvrtc.h (CUDA 11-13); every buffer passed is sized
        // by the matching *Size call, and the program is destroyed on every path.
        unsafe {
            let create = self.sym::<CreateFn>("nvrtcCreateProgram")?;
            let compile = self.sym::<CompileFn>("nvrtcCompileProgram")?;
            let ptx_size = self.sym::<SizeFn>("nvrtcGetPTXSize")?;
            let get_ptx = self.sym::<GetFn>("nvrtcGetPTX")?;
            let log_size = self.sym::<SizeFn>("nvrtcGetProgramLogSize")?;
            let get_log = self.sym::<GetFn>("nvrtcGetProgramLog")?;
            let destroy = self.sym::<DestroyFn>("nvrtcDestroyProgram")?;
            let err_str = self.sym::<ErrStrFn>("nvrtcGetErrorString")?;
            let describe = |rc: c_int| {
                let s = err_str(rc);
                if s.is_null() {
                    format!("NVRTC error {rc}")
                } else {
                    CStr::from_ptr(s).to_string_lossy().into_owned()
                }
            };

            let mut prog: NvrtcProgram = std::ptr::null_mut();
            let rc = create(
                &mut prog,
                source.as_ptr(),
                name.as_ptr(),
                0,
                std::ptr::null(),
                std::ptr::null(),
            );
            if rc != 0 {
                return Err(format!(
                    "nvrtcCreateProgram for {}: {}",
                    src.display(),
                    describe(rc)
                ));
            }
            let read = |size_fn: &SizeFn, get_fn: &GetFn| -> Result<Vec<u8>, String> {
                let mut n = 0usize;
                let rc = size_fn(prog, &mut n);
                if rc != 0 {
                    return Err(describe(rc));
                }
                let mut buf = vec![0u8; n.max(1)];
                let rc = get_fn(prog, buf.as_mut_ptr().cast());
                if rc != 0 {
                    return Err(describe(rc));
                }
                let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
                buf.truncate(end);
                Ok(buf)
            };
            let rc = compile(prog, option_ptrs.len() as c_int, option_ptrs.as_ptr());
            let log = read(&log_size, &get_log)
                .map(|l| String::from_utf8_lossy(&l).into_owned())
                .unwrap_or_default();
            let result = if rc != 0 {
                let mut msg = format!(
                    "NVRTC {}.{} failed to compile {} ({}), options {:?}:\n{}",
                    self.version.0,
                    self.version.1,
                    src.display(),
                    describe(rc),
                    options,
                    log.trim_end()
                );
                if self.includes.is_empty() && log.contains("cuda_") {
                    msg.push_str(
                        "\n(no folder with cuda_fp16.h was found: pip install nvidia-cuda-runtime-cu12 \
                         beside nvidia-cuda-nvrtc-cu12, or set CUDA_HOME to a CUDA toolkit)",
                    );
                }
                Err(msg)
            } else {
                read(&ptx_size, &get_ptx)
                    .map(|p| (String::from_utf8_lossy(&p).into_owned(), log))
                    .map_err(|e| format!("nvrtcGetPTX for {}: {e}", src.display()))
            };
            destroy(&mut prog);
            result
        }
    }
}
