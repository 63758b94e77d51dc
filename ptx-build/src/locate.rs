//! Where the CUDA tools are: a toolkit (`CUDA_HOME`, `CUDA_PATH`, `/usr/local/cuda`), `PATH`,
//! or the NVIDIA pip wheels in the site-packages of `$INCEPT_PYTHON` and `python3`.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn env_path(var: &str) -> Option<PathBuf> {
    env::var_os(var).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// CUDA toolkit roots named by the environment, then the usual install location.
pub fn toolkit_roots() -> Vec<(String, PathBuf)> {
    let mut roots = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(root) = env_path(var) {
            roots.push((format!("${var}"), root));
        }
    }
    roots.push(("default".into(), PathBuf::from("/usr/local/cuda")));
    roots
}

pub fn find_nvcc(tried: &mut Vec<String>) -> Option<PathBuf> {
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

/// `ptxas`: `$INCEPT_PTXAS`, the toolkit's, PATH's, else the pip wheel nvidia-cuda-nvcc-cu12's.
pub fn find_ptxas() -> Option<PathBuf> {
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
        if let Some(p) = env::split_paths(&path).map(|d| d.join("ptxas")).find(|p| p.is_file()) {
            return Some(p);
        }
    }
    site_packages(&mut Vec::new())
        .into_iter()
        .map(|d| d.join("nvidia/cuda_nvcc/bin/ptxas"))
        .find(|p| p.is_file())
}

/// site-packages folders of `$INCEPT_PYTHON` (first) and `python3`, where pip puts the NVIDIA
/// wheels (`nvidia/cuda_nvrtc/lib`, `nvidia/cuda_runtime/include`).
pub fn site_packages(tried: &mut Vec<String>) -> Vec<PathBuf> {
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

/// Library file names of NVRTC in a folder, preferred first.
pub fn nvrtc_files_in(dir: &Path) -> Vec<PathBuf> {
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
