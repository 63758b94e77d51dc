//! Finding NVIDIA's libraries wherever a machine has them, opening them before cudarc does, and
//! saying what was found (`incept info`).
//!
//! cudarc opens each library by file name (`dlopen("libcublas.so.13")`), which finds only what
//! the system loader's path holds, and panics when nothing opens. GPU machines often have the
//! libraries elsewhere: as the Python wheels of a virtual environment that is not activated
//! (PyTorch's), under `CUDA_HOME`, in conda. This module looks in all those places, opens the
//! files it finds by full path with `RTLD_GLOBAL`, and so makes cudarc's later by-name lookups
//! succeed: the loader hands back an object already loaded under the same soname instead of
//! searching the disk again.
//!
//! cudarc takes the names it tries from its CUDA version feature; built for CUDA 13
//! (`cuda-13000`) they include both `libX.so.13` and `libX.so.12`, so the CUDA 13 and the
//! CUDA 12 library sets both open. NCCL's `libnccl.so.2` is not among cudarc's names, so NCCL is
//! only ever used through the handle opened here.

use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
use std::ffi::c_int;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The libraries the CUDA backend uses or reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lib {
    Driver,
    CublasLt,
    Cublas,
    Cudnn,
    Nvrtc,
    Nccl,
}

impl Lib {
    /// In the order they are opened: cuBLASLt before cuBLAS and cuDNN, which load it by name.
    /// (NVTX is no library here: NVTX 3 is compiled in, see `nvtx.rs`.)
    pub const ALL: [Lib; 6] =
        [Lib::Driver, Lib::CublasLt, Lib::Cublas, Lib::Cudnn, Lib::Nvrtc, Lib::Nccl];

    pub fn name(self) -> &'static str {
        match self {
            Lib::Driver => "driver",
            Lib::CublasLt => "cuBLASLt",
            Lib::Cublas => "cuBLAS",
            Lib::Cudnn => "cuDNN",
            Lib::Nvrtc => "NVRTC",
            Lib::Nccl => "NCCL",
        }
    }

    /// File names, preferred first: CUDA 13's, then CUDA 12's.
    pub fn files(self) -> &'static [&'static str] {
        match self {
            Lib::Driver => &["libcuda.so.1"],
            Lib::CublasLt => &["libcublasLt.so.13", "libcublasLt.so.12"],
            Lib::Cublas => &["libcublas.so.13", "libcublas.so.12"],
            Lib::Cudnn => &["libcudnn.so.9"],
            Lib::Nvrtc => &["libnvrtc.so.13", "libnvrtc.so.12"],
            Lib::Nccl => &["libnccl.so.2"],
        }
    }

    /// Folders under `site-packages/nvidia/` of the wheels that ship it: CUDA 13 puts the
    /// toolkit's libraries together in `cu13/lib`, CUDA 12 gave each its own package.
    fn wheel_dirs(self) -> &'static [&'static str] {
        match self {
            Lib::Driver => &[],
            Lib::CublasLt | Lib::Cublas => &["cu13/lib", "cublas/lib"],
            Lib::Cudnn => &["cudnn/lib"],
            Lib::Nvrtc => &["cu13/lib", "cuda_nvrtc/lib"],
            Lib::Nccl => &["nccl/lib"],
        }
    }

    /// Companion files that the library opens by name at run time (cuDNN 9's engine
    /// libraries, NVRTC's builtins), opened from the same folder so those lookups succeed
    /// wherever the folder is.
    fn companions(self) -> &'static str {
        match self {
            Lib::Cudnn => "libcudnn_",
            Lib::Nvrtc => "libnvrtc-builtins",
            _ => "",
        }
    }

    /// What to do when it is missing.
    fn hint(self) -> &'static str {
        match self {
            Lib::Driver => "install the NVIDIA driver (libcuda.so.1 comes with it), or use --device cpu",
            Lib::CublasLt | Lib::Cublas => "pip install nvidia-cublas (CUDA 13) or nvidia-cublas-cu12, or point INCEPT_CUDA_LIBS at its lib folder",
            Lib::Cudnn => "pip install nvidia-cudnn-cu13 (or -cu12), or point INCEPT_CUDA_LIBS or CUDNN_PATH at it",
            Lib::Nvrtc => "pip install nvidia-cuda-nvrtc (CUDA 13) or nvidia-cuda-nvrtc-cu12",
            Lib::Nccl => "pip install nvidia-nccl-cu13 (or -cu12); needed only for several GPUs",
        }
    }
}

/// A folder searched, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Place {
    pub dir: PathBuf,
    /// Where the folder came from: `INCEPT_CUDA_LIBS`, `CUDA_HOME`, `python3 (/usr/bin/python3)`…
    pub source: String,
}

/// What became of one library.
#[derive(Debug)]
pub struct Found {
    pub lib: Lib,
    /// The file opened, if any.
    pub file: Option<PathBuf>,
    /// Its version, e.g. `13.0.0`, where the library reports one.
    pub version: Option<String>,
    /// Files that were there but would not open, with the loader's reason.
    pub refused: Vec<String>,
    /// The library's handle, kept open for the life of the process.
    handle: Option<Library>,
}

impl Found {
    /// A symbol of the opened library.
    ///
    /// # Safety
    /// `T` must be the symbol's true type.
    pub unsafe fn symbol<T: Copy>(&self, name: &[u8]) -> Option<T> {
        let lib = self.handle.as_ref()?;
        // SAFETY: the caller gives the symbol's type; the handle lives as long as `self`.
        unsafe { lib.get::<T>(name).ok().map(|s| *s) }
    }

    /// One line for `incept info`: the file and version, or where it looked and what to do.
    pub fn describe(&self, places: &[Place]) -> String {
        match &self.file {
            Some(f) => format!(
                "{}: {} ({})",
                self.lib.name(),
                self.version.as_deref().unwrap_or("version unknown"),
                f.display()
            ),
            None => {
                let mut s = format!(
                    "{}: not found ({}); looked for {} in {}",
                    self.lib.name(),
                    self.lib.hint(),
                    self.lib.files().join(", "),
                    looked(self.lib, places)
                );
                for r in &self.refused {
                    s.push_str(&format!("; {r}"));
                }
                s
            }
        }
    }
}

/// Every place searched for `lib` (for Python environments, the wheel folders, whether or not
/// they exist), then the system loader's own path.
fn looked(lib: Lib, places: &[Place]) -> String {
    let mut v: Vec<String> = places
        .iter()
        .filter_map(|p| {
            if !is_site_packages(&p.dir) {
                return Some(format!("{} [{}]", p.dir.display(), p.source));
            }
            let wheels = lib.wheel_dirs();
            (!wheels.is_empty()).then(|| {
                format!("{}/nvidia/{{{}}} [{}]", p.dir.display(), wheels.join(","), p.source)
            })
        })
        .collect();
    v.push("the system loader's path (LD_LIBRARY_PATH, ld.so.cache, /lib, /usr/lib)".into());
    v.join(", ")
}

fn is_site_packages(dir: &Path) -> bool {
    dir.ends_with("site-packages") || dir.ends_with("dist-packages")
}

/// The folders of `place` that may hold `lib`: the folder itself, and for a Python
/// `site-packages` the wheels' folders under `nvidia/`.
fn candidate_dirs(lib: Lib, place: &Place) -> Vec<(PathBuf, String)> {
    if is_site_packages(&place.dir) {
        lib.wheel_dirs()
            .iter()
            .map(|w| (place.dir.join("nvidia").join(w), place.source.clone()))
            .filter(|(d, _)| d.is_dir())
            .collect()
    } else if place.dir.is_dir() {
        vec![(place.dir.clone(), place.source.clone())]
    } else {
        Vec::new()
    }
}

/// The folders searched, most specific first: an explicit `INCEPT_CUDA_LIBS`, then the user's
/// `LD_LIBRARY_PATH`, the toolkit (`CUDA_HOME`, `CUDA_PATH`, `CUDNN_PATH`), Python
/// environments (the active virtual or conda one, then every `python3` on `PATH`, asked where
/// its packages live), conda, and the usual install folders.
pub fn places() -> Vec<Place> {
    let mut v = Vec::new();
    let mut push = |dir: PathBuf, source: &str| {
        if dir.as_os_str().is_empty() || v.iter().any(|p: &Place| p.dir == dir) {
            return;
        }
        v.push(Place { dir, source: source.to_string() });
    };
    for var in ["INCEPT_CUDA_LIBS", "LD_LIBRARY_PATH"] {
        if let Some(list) = std::env::var_os(var) {
            for d in std::env::split_paths(&list) {
                push(d, var);
            }
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDNN_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let home = PathBuf::from(home);
            for sub in ["lib64", "lib", "targets/x86_64-linux/lib"] {
                push(home.join(sub), var);
            }
        }
    }
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(prefix) = std::env::var_os(var) {
            let prefix = PathBuf::from(prefix);
            if var == "CONDA_PREFIX" {
                push(prefix.join("lib"), var);
            }
            for sp in site_packages_under(&prefix) {
                push(sp, var);
            }
        }
    }
    for (python, sites) in python_site_packages() {
        let source = format!("python {}", python.display());
        for sp in sites {
            push(sp, &source);
        }
    }
    let mut prefixes = vec![PathBuf::from("/opt/conda"), PathBuf::from("/usr/local")];
    if let Some(home) = std::env::var_os("HOME") {
        let home = PathBuf::from(home);
        for d in ["miniconda3", "miniforge3", "anaconda3", ".local"] {
            prefixes.push(home.join(d));
        }
    }
    for prefix in prefixes {
        push(prefix.join("lib"), "conda/local install");
        for sp in site_packages_under(&prefix) {
            push(sp, "conda/local install");
        }
    }
    for d in [
        "/usr/local/cuda/lib64",
        "/usr/local/cuda/targets/x86_64-linux/lib",
        "/usr/local/nvidia/lib64",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/wsl/lib",
    ] {
        push(PathBuf::from(d), "standard location");
    }
    v.retain(|p| p.dir.is_dir());
    v
}

/// `PREFIX/lib/python3.*/{site,dist}-packages`.
fn site_packages_under(prefix: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(prefix.join("lib")) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .flat_map(|e| ["site-packages", "dist-packages"].into_iter().map(move |s| e.path().join(s)))
        .filter(|p| p.is_dir())
        .collect();
    out.sort();
    out
}

/// Every `python3` on `PATH` with the package folders it reports. Asking the interpreter
/// finds a virtual environment that is on `PATH` without being activated (`VIRTUAL_ENV`
/// unset), as on machines where PyTorch lives in one.
fn python_site_packages() -> Vec<(PathBuf, Vec<PathBuf>)> {
    let Some(path) = std::env::var_os("PATH") else {
        return Vec::new();
    };
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for dir in std::env::split_paths(&path) {
        let py = dir.join("python3");
        if !py.is_file() || seen.contains(&py) {
            continue;
        }
        seen.push(py.clone());
        const ASK: &str =
            "import site; print('\\n'.join(site.getsitepackages() + [site.getusersitepackages()]))";
        if let Some(text) = run_briefly(&py, &["-c", ASK]) {
            let sites = text.lines().map(PathBuf::from).filter(|p| p.is_dir()).collect();
            out.push((py, sites));
        }
    }
    out
}

/// Runs `program args` and returns its output, or nothing if it fails or takes over 5 s (a
/// broken interpreter must not hang the start of training).
fn run_briefly(program: &Path, args: &[&str]) -> Option<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if start.elapsed() > Duration::from_secs(5) => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    let mut text = String::new();
    use std::io::Read;
    child.stdout.take()?.read_to_string(&mut text).ok()?;
    Some(text)
}

/// Opens `path` for the rest of the process, its symbols visible to later by-name lookups.
fn open(path: &Path) -> Result<Library, String> {
    // SAFETY: NVIDIA's libraries, whose initialisers have no preconditions.
    unsafe { Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| e.to_string())
}

/// Opens every companion file of `lib` in `dir`. They depend on each other, so files that
/// fail are retried until a round opens nothing new; what still fails is left to the
/// library to report when it needs it.
fn open_companions(lib: Lib, dir: &Path) {
    let prefix = lib.companions();
    if prefix.is_empty() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut pending: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with(prefix) && name.contains(".so")
        })
        .collect();
    pending.sort();
    loop {
        let before = pending.len();
        pending.retain(|p| match open(p) {
            Ok(l) => {
                // Loaded for good: cuDNN looks its engines up by name at any time.
                std::mem::forget(l);
                false
            }
            Err(_) => true,
        });
        if pending.is_empty() || pending.len() == before {
            break;
        }
    }
}

/// Finds and opens `lib`: the first of its files in the first of `places` that holds one,
/// else whatever the system loader finds by name.
fn find(lib: Lib, places: &[Place]) -> Found {
    let mut found = Found { lib, file: None, version: None, refused: Vec::new(), handle: None };
    for place in places {
        for (dir, _) in candidate_dirs(lib, place) {
            for name in lib.files() {
                let path = dir.join(name);
                if !path.exists() {
                    continue;
                }
                match open(&path) {
                    Ok(h) => {
                        open_companions(lib, &dir);
                        found.file = Some(path);
                        found.handle = Some(h);
                        found.version = version(&found);
                        return found;
                    }
                    Err(e) => found.refused.push(format!("{} would not load: {e}", path.display())),
                }
            }
        }
    }
    for name in lib.files() {
        // SAFETY: as in `open`.
        if let Ok(h) = unsafe { Library::open(Some(*name), RTLD_NOW | RTLD_GLOBAL) } {
            found.file = Some(loaded_path(name).unwrap_or_else(|| PathBuf::from(name)));
            found.handle = Some(h);
            found.version = version(&found);
            if let Some(dir) = found.file.as_ref().and_then(|f| f.parent()) {
                open_companions(lib, dir);
            }
            return found;
        }
    }
    found
}

/// Where the loader found `name`, from the process's memory map.
fn loaded_path(name: &str) -> Option<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| Path::new(p).file_name().is_some_and(|f| f.to_string_lossy() == name))
        .map(PathBuf::from)
}

/// `12.8.3` from a `major·10000 + minor·100 + patch` number, cuDNN 9's, NCCL's and
/// cuBLASLt's encoding.
fn dotted(v: usize) -> String {
    format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
}

/// The version the library reports about itself.
fn version(f: &Found) -> Option<String> {
    // SAFETY: each signature is the one NVIDIA's headers declare for that symbol.
    unsafe {
        match f.lib {
            Lib::Driver => {
                let get: unsafe extern "C" fn(*mut c_int) -> c_int =
                    f.symbol(b"cuDriverGetVersion\0")?;
                let mut v = 0;
                (get(&mut v) == 0).then(|| {
                    let release = std::fs::read_to_string("/sys/module/nvidia/version")
                        .map(|r| format!(", kernel module {}", r.trim()))
                        .unwrap_or_default();
                    format!("CUDA {}.{}{release}", v / 1000, v % 1000 / 10)
                })
            }
            Lib::Cublas => {
                let get: unsafe extern "C" fn(c_int, *mut c_int) -> c_int =
                    f.symbol(b"cublasGetProperty\0")?;
                let mut parts = [0; 3];
                for (kind, part) in parts.iter_mut().enumerate() {
                    if get(kind as c_int, part) != 0 {
                        return None;
                    }
                }
                Some(format!("{}.{}.{}", parts[0], parts[1], parts[2]))
            }
            Lib::CublasLt => {
                let get: unsafe extern "C" fn() -> usize = f.symbol(b"cublasLtGetVersion\0")?;
                Some(dotted(get()))
            }
            Lib::Cudnn => {
                let get: unsafe extern "C" fn() -> usize = f.symbol(b"cudnnGetVersion\0")?;
                Some(dotted(get()))
            }
            Lib::Nvrtc => {
                let get: unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int =
                    f.symbol(b"nvrtcVersion\0")?;
                let (mut major, mut minor) = (0, 0);
                (get(&mut major, &mut minor) == 0).then(|| format!("{major}.{minor}"))
            }
            Lib::Nccl => {
                let get: unsafe extern "C" fn(*mut c_int) -> c_int =
                    f.symbol(b"ncclGetVersion\0")?;
                let mut v = 0;
                (get(&mut v) == 0).then(|| dotted(v as usize))
            }
        }
    }
}

/// The search, done once per process: the places searched and what became of each library.
pub struct Libraries {
    pub places: Vec<Place>,
    pub found: Vec<Found>,
}

impl Libraries {
    pub fn get(&self, lib: Lib) -> &Found {
        // ALL holds every variant, so `found` has one entry per variant.
        self.found.iter().find(|f| f.lib == lib).expect("every library has an entry")
    }

    /// `Ok` if `lib` was opened, else an error saying where it looked and what to do.
    pub fn require(&self, lib: Lib) -> anyhow::Result<&Found> {
        let f = self.get(lib);
        if f.file.is_some() {
            Ok(f)
        } else {
            anyhow::bail!("{}", f.describe(&self.places))
        }
    }
}

/// Searches for and opens every library (once per process).
pub fn libraries() -> &'static Libraries {
    static LIBS: OnceLock<Libraries> = OnceLock::new();
    LIBS.get_or_init(|| {
        let places = places();
        let found = Lib::ALL.iter().map(|&lib| find(lib, &places)).collect();
        Libraries { places, found }
    })
}

/// A raw function of a library opened here, for what cudarc does not wrap (NCCL).
///
/// # Safety
/// `T` must be the symbol's true type.
pub unsafe fn function<T: Copy>(lib: Lib, name: &[u8]) -> Option<T> {
    // SAFETY: passed on to the caller.
    unsafe { libraries().get(lib).symbol(name) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_decode_as_nvidia_encodes_them() {
        assert_eq!(dotted(91300), "9.13.0");
        assert_eq!(dotted(22707), "2.27.7");
        assert_eq!(dotted(130000), "13.0.0");
    }

    #[test]
    fn cuda13_wheels_are_searched_where_they_install() {
        let root = std::env::temp_dir().join(format!("incept-libs-{}", std::process::id()));
        let sp = root.join("lib/python3.12/site-packages");
        for d in ["nvidia/cu13/lib", "nvidia/cudnn/lib", "nvidia/nccl/lib"] {
            std::fs::create_dir_all(sp.join(d)).unwrap();
        }
        let place = Place { dir: sp.clone(), source: "python /x/bin/python3".into() };
        let dirs = |lib| {
            candidate_dirs(lib, &place)
                .into_iter()
                .map(|(d, _)| d.strip_prefix(&sp).unwrap().display().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(dirs(Lib::Cublas), ["nvidia/cu13/lib"]);
        assert_eq!(dirs(Lib::Nvrtc), ["nvidia/cu13/lib"]);
        assert_eq!(dirs(Lib::Cudnn), ["nvidia/cudnn/lib"]);
        assert_eq!(dirs(Lib::Nccl), ["nvidia/nccl/lib"]);
        assert!(dirs(Lib::Driver).is_empty(), "the driver never comes as a wheel");
        assert_eq!(site_packages_under(&root), vec![sp]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_missing_library_says_where_it_looked_and_what_to_do() {
        let dir = std::env::temp_dir().join(format!("incept-libs-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let places = [Place { dir: dir.clone(), source: "INCEPT_CUDA_LIBS".into() }];
        let f = Found { lib: Lib::Cudnn, file: None, version: None, refused: vec![], handle: None };
        let d = f.describe(&places);
        for needle in [
            "cuDNN: not found",
            "libcudnn.so.9",
            "nvidia-cudnn-cu13",
            "[INCEPT_CUDA_LIBS]",
            "system loader",
        ] {
            assert!(d.contains(needle), "{needle:?} missing from: {d}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
