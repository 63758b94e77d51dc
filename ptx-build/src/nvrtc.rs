//! NVRTC, loaded from a toolkit or the `nvidia-cuda-nvrtc` wheel with libloading, compiling one
//! `.cu` file to PTX.

use std::env;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fs;
use std::path::{Path, PathBuf};

use crate::locate::{env_path, nvrtc_files_in, site_packages, toolkit_roots};

type NvrtcProgram = *mut c_void;

/// libnvrtc, loaded at build time.
pub struct Nvrtc {
    lib: libloading::Library,
    pub path: PathBuf,
    pub version: (c_int, c_int),
    /// The folder holding cuda_fp16.h / cuda_bf16.h (none if not found).
    includes: Vec<PathBuf>,
}

impl Nvrtc {
    pub fn find(tried: &mut Vec<String>) -> Result<Nvrtc, ()> {
        // (library, where it came from, folders to look for headers in first)
        let mut candidates: Vec<(PathBuf, String, Vec<PathBuf>)> = Vec::new();
        if let Some(explicit) = env_path("INCEPT_NVRTC") {
            let files =
                if explicit.is_dir() { nvrtc_files_in(&explicit) } else { vec![explicit.clone()] };
            if files.is_empty() || !files[0].exists() {
                tried.push(format!("INCEPT_NVRTC={}: no libnvrtc there", explicit.display()));
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
            for sub in ["lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"] {
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
            candidates.push((PathBuf::from(name), "system library path".into(), Vec::new()));
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
        Ok(Nvrtc { path: path.to_path_buf(), lib, version, includes })
    }

    /// # Safety
    /// `T` must be the C signature of `name` in nvrtc.h.
    unsafe fn sym<T>(&self, name: &str) -> Result<libloading::Symbol<'_, T>, String> {
        self.lib
            .get::<T>(name)
            .map_err(|e| format!("{}: no symbol {name}: {}", self.path.display(), chain(&e)))
    }

    /// Returns (PTX, compile log: warnings).
    pub fn compile(
        &self, src: &Path, cuda_dir: &Path, arch: &str,
    ) -> Result<(String, String), String> {
        let text =
            fs::read_to_string(src).map_err(|e| format!("cannot read {}: {e}", src.display()))?;
        let source =
            CString::new(text).map_err(|_| format!("{}: contains a NUL byte", src.display()))?;
        let name = CString::new(src.file_name().unwrap_or_default().to_string_lossy().as_bytes())
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
                return Err(format!("nvrtcCreateProgram for {}: {}", src.display(), describe(rc)));
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
