//! End to end through the `incept` binary on a synthetic dataset in the real CIFAR-10 format:
//! training, run folder contents, eval, report, exact resume (also after Ctrl-C), bad input.

use incept::checkpoint::TensorFile;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;

fn incept() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_incept"));
    c.env("RUST_LOG", "info");
    c
}

fn run(args: &[&str]) -> Output {
    incept().args(args).output().expect("run incept")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(o.status.success(), "incept {args:?} failed:\n{}", text(&o));
    text(&o)
}

/// A fresh scratch folder per test.
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("incept-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// One synthetic dataset shared by the tests (written through the binary).
fn dataset() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = scratch("data");
        ok(&[
            "data",
            "synth",
            "--out",
            d.to_str().unwrap(),
            "--train",
            "1200",
            "--test",
            "400",
            "--seed",
            "5",
        ]);
        d
    })
}

fn train_args<'a>(out: &'a str, exp: &'a str, epochs: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data-dir",
        dataset().to_str().unwrap(),
        "--output",
        out,
        "--experiment",
        exp,
        "--epochs",
        epochs,
        "-b",
        "64",
        "--lr",
        "0.05",
        "--sched",
        "step",
        "--decay-epochs",
        "1",
        "--decay-rate",
        "0.5",
        "--log-interval",
        "1",
        "--seed",
        "3",
    ]
}

/// Every tensor of a safetensors file, as raw bytes by name.
fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let f = TensorFile::open(path).unwrap();
    let st = f.tensors().unwrap();
    let mut v: Vec<(String, Vec<u8>)> =
        st.iter().map(|(n, t)| (n.to_string(), t.data().to_vec())).collect();
    v.sort();
    v
}

fn assert_same_weights(a: &Path, b: &Path) {
    for file in ["last.safetensors", "last.state.safetensors"] {
        let (ta, tb) = (tensors(&a.join(file)), tensors(&b.join(file)));
        assert_eq!(ta.len(), tb.len());
        for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
            assert_eq!(na, nb);
            assert!(va == vb, "{file}: {na} differs between {} and {}", a.display(), b.display());
        }
    }
}

fn summary(run: &Path) -> Vec<Vec<String>> {
    std::fs::read_to_string(run.join("summary.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').map(String::from).collect())
        .collect()
}

#[test]
fn train_eval_report_and_exact_resume() {
    let out = scratch("runs");
    let o = out.to_str().unwrap();
    // Two epochs straight.
    ok(&train_args(o, "straight", "2"));
    let straight = out.join("straight");
    for f in [
        "summary.csv",
        "metrics.jsonl",
        "args.json",
        "last.safetensors",
        "last.state.safetensors",
        "best.safetensors",
    ] {
        assert!(straight.join(f).is_file(), "run folder lacks {f}");
    }
    let rows = summary(&straight);
    assert_eq!(
        rows[0].join(","),
        "epoch,lr,train_loss,train_acc,test_loss,test_acc,img_per_s,seconds"
    );
    assert_eq!(rows.len(), 3, "a row per epoch");
    let test_acc: f64 = rows[2][5].parse().unwrap();
    assert!(
        test_acc > 0.5,
        "test accuracy {test_acc} after 2 epochs is not far above chance (0.1)"
    );
    let jsonl = std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(jsonl.lines().last().unwrap()).unwrap();
    assert_eq!(last["epoch"], 2);
    let args: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(straight.join("args.json")).unwrap())
            .unwrap();
    assert_eq!(args["batch_size"], 64);
    assert_eq!(args["nesterov"], true);

    // eval agrees with the last epoch's test accuracy.
    let ev = ok(&[
        "eval",
        "--checkpoint",
        straight.join("last.safetensors").to_str().unwrap(),
        "--data-dir",
        dataset().to_str().unwrap(),
    ]);
    assert!(
        ev.contains(&format!("accuracy {:.2}%", test_acc * 100.0)),
        "eval says:\n{ev}\nsummary says {test_acc}"
    );
    assert!(ev.contains("confusion matrix") && ev.contains("airplane"), "{ev}");

    // report draws the curves.
    let rep = ok(&["report", straight.to_str().unwrap()]);
    let svg = std::fs::read_to_string(straight.join("curves.svg")).unwrap();
    assert!(rep.contains("curves.svg") && svg.starts_with("<svg") && svg.contains("accuracy"));

    // One epoch, then resume to two: bitwise the same weights, statistics and momentum.
    ok(&train_args(o, "resumed", "1"));
    let resumed = out.join("resumed");
    let mut args = train_args(o, "ignored", "2");
    let ckpt = resumed.join("last.safetensors");
    args.extend(["--resume", ckpt.to_str().unwrap()]);
    ok(&args);
    assert_same_weights(&straight, &resumed);
    assert_eq!(summary(&resumed).len(), 3);

    // Ctrl-C in the middle of a run: exit 130 with a checkpoint; resuming it ends bitwise
    // where the straight run ended.
    let mut child = incept()
        .args(train_args(o, "interrupted", "2"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader};
        let mut lines = Vec::new();
        let mut signalled = false;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if !signalled && line.contains("step=3 ") {
                let pid = child.id().to_string();
                assert!(Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
                signalled = true;
            }
            lines.push(line);
        }
        (child.wait().unwrap(), lines)
    });
    let (status, lines) = reader.join().unwrap();
    assert_eq!(status.code(), Some(130), "exit status after Ctrl-C:\n{}", lines.join("\n"));
    let interrupted = out.join("interrupted");
    let ckpt = interrupted.join("last.safetensors");
    assert!(ckpt.is_file());
    let mut args = train_args(o, "ignored", "2");
    args.extend(["--resume", ckpt.to_str().unwrap()]);
    ok(&args);
    assert_same_weights(&straight, &interrupted);
    // The interrupted epoch's row still covers the whole epoch: same loss and accuracies.
    let (a, b) = (summary(&straight), summary(&interrupted));
    assert_eq!(a.len(), b.len());
    for (ra, rb) in a.iter().zip(&b).skip(1) {
        assert_eq!(ra[..6], rb[..6], "epoch, lr, train/test loss and accuracy");
    }
}

#[test]
fn no_arguments_means_train_with_defaults() {
    // `incept --help` documents it; a bare `incept` in a folder without data would download,
    // so check the parse by asking train for its defaults through --help instead.
    let h = ok(&["train", "--help"]);
    for flag in [
        "--epochs",
        "--batch-size",
        "--lr",
        "--momentum",
        "--weight-decay",
        "--no-nesterov",
        "--sched",
        "--warmup-epochs",
        "--smoothing",
        "--seed",
        "--output",
        "--resume",
        "--log-interval",
        "--device",
        "--workers",
    ] {
        assert!(h.contains(flag), "train --help lacks {flag}");
    }
    assert!(ok(&["--help"]).contains("With no subcommand, `incept` runs `incept train`"));
}

/// Runs incept expecting failure: non-zero exit, no panic, and every `needles` in the message,
/// which it returns.
fn fails(args: &[&str], needles: &[&str]) -> String {
    let o = run(args);
    let t = text(&o);
    assert!(!o.status.success(), "incept {args:?} should fail:\n{t}");
    assert!(
        !t.contains("panicked") && !t.contains("RUST_BACKTRACE"),
        "incept {args:?} panicked:\n{t}"
    );
    for n in needles {
        assert!(t.contains(n), "incept {args:?}: message lacks {n:?}:\n{t}");
    }
    t
}

/// Whether `incept info` finds a usable GPU (it exits 0 only then, in the CUDA build).
fn gpu_present() -> bool {
    cfg!(feature = "cudnn") && run(&["info"]).status.success()
}

#[test]
fn bad_input_is_a_clear_error() {
    let d = dataset().to_str().unwrap();
    let tmp = scratch("bad");
    let out = tmp.to_str().unwrap();
    fails(&["train", "--data-dir", d, "--output", out, "-b", "1"], &["--batch-size"]);
    // A CUDA device that cannot be used is refused before the data is read: the data folder
    // here holds a broken file, and the message must be about the device. The CPU-only build
    // names the missing feature; the CUDA build what is missing (no driver, no GPU, or, on a
    // GPU machine, no device 99).
    let broken = tmp.join("broken-data");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("data_batch_1.bin"), b"not CIFAR").unwrap();
    for device in ["cuda", "cuda:99"] {
        let flag = format!("--device {device}");
        let needles: &[&str] = if cfg!(feature = "cudnn") { &[&flag] } else { &[&flag, "cudnn"] };
        let args =
            ["train", "--data-dir", broken.to_str().unwrap(), "--output", out, "--device", device];
        if cfg!(feature = "cudnn") && device == "cuda" && gpu_present() {
            continue;
        }
        let t = fails(&args, needles);
        assert!(
            !t.contains("data_batch") && !t.contains("broken-data"),
            "incept {args:?} read the data before checking the device:\n{t}"
        );
    }
    // eval and bench likewise check the device first (eval: before the checkpoint and data).
    let broken = broken.to_str().unwrap();
    for args in [
        &[
            "eval",
            "--checkpoint",
            "/nonexistent/best.safetensors",
            "--data-dir",
            broken,
            "--device",
            "cuda:99",
        ][..],
        &["bench", "--device", "cuda:99", "--steps", "1"][..],
    ] {
        let t = fails(args, &["--device cuda:99"]);
        assert!(
            !t.contains("nonexistent") && !t.contains("broken-data"),
            "incept {args:?} read its inputs before checking the device:\n{t}"
        );
    }
    fails(&["train", "--data-dir", d, "--output", out, "--device", "tpu"], &["--device tpu"]);
    fails(&["train", "--data-dir", d, "--output", out, "--lr=-1"], &["--lr"]);
    fails(&["train", "--epochs", "x"], &["--epochs"]);
    // CUDA-only flags on the CPU, and malformed CUDA flags, are refused before anything runs.
    for (flag, needle) in [
        (&["--amp-dtype", "bf16"][..], "--amp-dtype"),
        (&["--amp"][..], "--amp"),
        (&["--host-batches"][..], "--host-batches"),
        (&["--profile-steps", "5..9"][..], "--profile-steps"),
        (&["--streams", "0"][..], "--streams"),
        (&["--no-amp", "--amp-dtype", "f16"][..], "--amp-dtype"),
    ] {
        let mut args = vec!["train", "--data-dir", d, "--output", out];
        args.extend_from_slice(flag);
        fails(&args, &[needle]);
    }
    // A diverging run stops at the first non-finite loss and names the step.
    fails(
        &[
            "train",
            "--data-dir",
            d,
            "--output",
            out,
            "--experiment",
            "nan",
            "--lr",
            "1e30",
            "--sched",
            "step",
            "-b",
            "64",
        ],
        &["the loss became", "at epoch 1 step", "no checkpoint was saved yet"],
    );
    assert!(!tmp.join("nan/last.safetensors").exists());
    fails(
        &["train", "--data-dir", d, "--output", "/proc/incept-cannot-write", "--epochs", "1"],
        &["/proc/incept-cannot-write"],
    );

    // A data folder with a truncated file, and one missing a file.
    let broken = tmp.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in std::fs::read_dir(dataset()).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, broken.join(f.file_name().unwrap())).unwrap();
    }
    let b3 = broken.join("data_batch_3.bin");
    let len = std::fs::metadata(&b3).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&b3).unwrap().set_len(len - 100).unwrap();
    fails(
        &["train", "--data-dir", broken.to_str().unwrap(), "--output", out],
        &["data_batch_3.bin"],
    );
    std::fs::remove_file(&b3).unwrap();
    fails(
        &["train", "--data-dir", broken.to_str().unwrap(), "--output", out],
        &["data_batch_3.bin"],
    );
    fails(&["data", "check", broken.to_str().unwrap()], &["data_batch_3.bin"]);

    // Checkpoints: missing, damaged, of another model, without training state.
    fails(
        &["eval", "--checkpoint", "/nonexistent/m.safetensors", "--data-dir", d],
        &["/nonexistent/m.safetensors"],
    );
    let junk = tmp.join("junk.safetensors");
    std::fs::write(&junk, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":").unwrap();
    fails(
        &["eval", "--checkpoint", junk.to_str().unwrap(), "--data-dir", d],
        &["junk.safetensors"],
    );
    let other = tmp.join("other.safetensors");
    incept::checkpoint::save(
        &other,
        &[("fc.weight".into(), incept::checkpoint::OwnedTensor::f32(vec![2, 2], [0.0; 4]))],
        Default::default(),
    )
    .unwrap();
    fails(
        &["eval", "--checkpoint", other.to_str().unwrap(), "--data-dir", d],
        &["other.safetensors", "block1.0.weight"],
    );
    let mut net: incept::model::net::Net<f32, incept::backend::cpu::Cpu> =
        incept::model::net::Net::new(
            incept::model::ModelSpec::inception_net_small(),
            incept::backend::cpu::Cpu,
            0,
        )
        .unwrap();
    let weights_only = tmp.join("weights.safetensors");
    incept::checkpoint::save_model(&mut net, &weights_only).unwrap();
    fails(
        &["train", "--data-dir", d, "--output", out, "--resume", weights_only.to_str().unwrap()],
        &["no training state", "--initial-checkpoint"],
    );
    fails(&["report", tmp.to_str().unwrap()], &["summary.csv"]);
}

#[test]
fn pytorch_weights_evaluate_and_start_training() {
    // The fixture's param/* tensors are the seed PyTorch model's state_dict, as
    // safetensors.torch.save_file(model.state_dict(), path) writes it (f32, int64 counters).
    let fixture = TensorFile::open(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/seed_inception_small.safetensors"),
    )
    .unwrap();
    let st = fixture.tensors().unwrap();
    let tensors: Vec<(String, incept::checkpoint::OwnedTensor)> = st
        .iter()
        .filter_map(|(n, v)| {
            n.strip_prefix("param/").map(|n| {
                let t = incept::checkpoint::OwnedTensor {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    bytes: v.data().to_vec(),
                };
                (n.to_string(), t)
            })
        })
        .collect();
    let dir = scratch("pytorch");
    let path = dir.join("pytorch.safetensors");
    incept::checkpoint::save(&path, &tensors, Default::default()).unwrap();
    let d = dataset().to_str().unwrap();
    let ev = ok(&["eval", "--checkpoint", path.to_str().unwrap(), "--data-dir", d]);
    assert!(ev.contains("test images 400"), "{ev}");
    let out = dir.to_str().unwrap();
    let p = path.to_str().unwrap();
    ok(&[
        "train",
        "--data-dir",
        d,
        "--output",
        out,
        "--experiment",
        "ft",
        "--epochs",
        "1",
        "-b",
        "100",
        "--initial-checkpoint",
        p,
    ]);
    assert_eq!(summary(&dir.join("ft")).len(), 2);
}

/// `incept info` in a bare environment: every library gets a line, either its version and
/// file or where it looked and what to do; without a usable GPU it says so and exits non-zero,
/// and nothing panics.
#[cfg(feature = "cudnn")]
#[test]
fn info_names_every_library_or_where_it_looked() {
    let empty = scratch("info-empty");
    // A file of the right name that is no library: named with the loader's reason.
    let broken = scratch("info-broken");
    std::fs::write(broken.join("libcudnn.so.9"), b"not an ELF file").unwrap();
    let libs = format!("{}:{}", empty.display(), broken.display());
    let o = bare_env(&empty, "/usr/bin:/bin")
        .env("INCEPT_CUDA_LIBS", &libs)
        .output()
        .expect("run incept");
    let t = text(&o);
    assert!(!t.contains("panicked"), "incept info panicked:\n{t}");
    let cudnn = t.lines().find(|l| l.starts_with("cuDNN: ")).unwrap_or("");
    assert!(
        cudnn.contains("libcudnn.so.9 would not load"),
        "the broken libcudnn.so.9 is not named: {cudnn:?}"
    );
    for lib in ["driver", "cuBLASLt", "cuBLAS", "cuDNN", "NVRTC", "NCCL", "NVTX"] {
        let line = t
            .lines()
            .find(|l| l.starts_with(&format!("{lib}: ")))
            .unwrap_or_else(|| panic!("no {lib} line in incept info:\n{t}"));
        if line.contains("not found") {
            for needle in ["looked for", "[INCEPT_CUDA_LIBS]", "system loader"] {
                assert!(line.contains(needle), "{needle:?} missing from {line:?}");
            }
        }
    }
    if !o.status.success() {
        assert!(t.contains("cuda: not usable"), "no verdict in:\n{t}");
    }
}

/// The CUDA 13 wheels in a virtual environment that is on PATH but not activated (as PyTorch's
/// is on the GPU machines): `incept info` finds each library in the wheels' layout and reads
/// its version. Needs INCEPT_CUDA13_PYTHON, the python of a venv holding nvidia-cublas,
/// nvidia-cuda-nvrtc, nvidia-cudnn-cu13 and nvidia-nccl-cu13 (.ci/run makes one).
#[cfg(feature = "cudnn")]
#[test]
fn info_finds_cuda13_wheels_in_a_venv_that_is_not_activated() {
    let Some(python) = std::env::var_os("INCEPT_CUDA13_PYTHON") else {
        eprintln!("skipped: INCEPT_CUDA13_PYTHON is not set (scripts/cuda-venv.sh makes the venv; see .ci/run)");
        return;
    };
    let bin = Path::new(&python).parent().expect("python in a bin folder");
    let home = scratch("info-home");
    let o =
        bare_env(&home, &format!("{}:/usr/bin:/bin", bin.display())).output().expect("run incept");
    let t = text(&o);
    assert!(!t.contains("panicked"), "incept info panicked:\n{t}");
    assert!(
        !t.contains("cudarc cannot open"),
        "a library was found that cudarc would not open by name:\n{t}"
    );
    for (lib, version, file) in [
        ("cuBLASLt", "13.", "nvidia/cu13/lib/libcublasLt.so.13"),
        ("cuBLAS", "13.", "nvidia/cu13/lib/libcublas.so.13"),
        ("cuDNN", "9.", "nvidia/cudnn/lib/libcudnn.so.9"),
        ("NVRTC", "13.", "nvidia/cu13/lib/libnvrtc.so.13"),
        ("NCCL", "2.", "nvidia/nccl/lib/libnccl.so.2"),
    ] {
        let want = format!("{lib}: {version}");
        let line = t.lines().find(|l| l.starts_with(&want));
        assert!(
            line.is_some_and(|l| l.contains(file)),
            "expected a line starting {want:?} naming {file}:\n{t}"
        );
    }
    // NCCL is called through incept's own bindings: each function they name must resolve in
    // the real library (a misspelt or missing symbol shows here, without a GPU).
    let nccl = t.lines().find(|l| l.starts_with("NCCL: 2.")).unwrap_or_default();
    assert!(nccl.contains("every function data parallelism calls is present"), "{nccl}");
}

/// `incept info` with a minimal environment: no toolkit, virtual or conda environment, and
/// `home` as HOME.
#[cfg(feature = "cudnn")]
fn bare_env(home: &Path, path: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_incept"));
    c.arg("info").env_clear().env("PATH", path).env("HOME", home).stdin(Stdio::null());
    c
}

/// `bench --device emu` models the GPU it cannot time: one step's operations and the bounds.
#[test]
fn bench_on_the_emulated_gpu_prints_a_step_profile() {
    let out =
        ok(&["bench", "--device", "emu", "-b", "8", "--steps", "1", "--warmup", "0", "--no-amp"]);
    for needle in [
        "step profile (emulated device; a model of a GPU, not a measurement)",
        "cudnnConvolutionForward 3×3/2 64→128 @7×7 f32",
        "sgd_step",
        "critical path on the H200 SXM",
        "route: stream 0",
        "H100 SXM5, graph",
        "H200 SXM, eager",
    ] {
        assert!(out.contains(needle), "no {needle:?} in:\n{out}");
    }
}
