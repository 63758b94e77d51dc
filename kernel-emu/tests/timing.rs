//! Wall-clock timings of the emulation itself (ignored by default; run with
//! `cargo test --release --manifest-path kernel-emu/Cargo.toml --test timing -- --ignored --nocapture`):
//! kernels launched by name on host buffers with [`launch`], without the emulated device's
//! memory model and checker, to see what a launch costs in the emulation alone.

use kernel_emu::{launch, Arg};
use std::time::Instant;

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}
extern "C" {
    fn clock_gettime(clock: i32, t: *mut Timespec) -> i32;
}

/// CPU time of the calling thread, in ms (the launches run on it): on a loaded machine the
/// wall clock says more about the neighbours than about the emulation.
fn thread_cpu_ms() -> f64 {
    let mut t = Timespec { sec: 0, nsec: 0 };
    // SAFETY: CLOCK_THREAD_CPUTIME_ID (3) on Linux, a valid timespec to fill.
    let rc = unsafe { clock_gettime(3, &mut t) };
    assert_eq!(rc, 0);
    t.sec as f64 * 1e3 + t.nsec as f64 * 1e-6
}

fn time<F: FnMut()>(what: &str, reps: u32, mut f: F) {
    f(); // warm up (stacks, pages)
    let (t, c) = (Instant::now(), thread_cpu_ms());
    for _ in 0..reps {
        f();
    }
    let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
    let cpu = (thread_cpu_ms() - c) / reps as f64;
    println!("{what}: {ms:.2} ms wall, {cpu:.2} ms CPU per launch ({reps} launches)");
}

/// The host address of a buffer, as a kernel pointer argument.
fn ptr<T>(v: &[T]) -> Arg {
    Arg::Ptr(v.as_ptr() as usize as u64)
}

fn ptr_mut<T>(v: &mut [T]) -> Arg {
    Arg::Ptr(v.as_mut_ptr() as usize as u64)
}

#[test]
#[ignore]
fn timing() {
    // A grid-stride elementwise kernel over 1M elements, grid 4096 x 256.
    let n = 1 << 20;
    let x: Vec<f32> = (0..n).map(|i| (i as f32 - 5e5) * 1e-3).collect();
    let mut y = vec![0.0f32; n];
    time("relu_forward_f32 n=2^20 grid 4096x256", 3, || {
        let args = [ptr_mut(&mut y), ptr(&x), Arg::I32(n as i32)];
        // SAFETY: y and x hold n floats each, all the kernel touches; distinct buffers.
        unsafe { launch("relu_forward_f32", [4096, 1, 1], [256, 1, 1], 0, 0, &args) }
            .expect("relu_forward_f32");
    });
    assert!(y.iter().zip(&x).all(|(y, x)| *y == x.max(0.0)));

    // The BN statistics reduction, P = 16·16·16, C = 64, with the backend's geometry on an
    // H100/H200 (block (32, 16), grid (2, 32)); no running statistics (null).
    let (p, c, g) = (16 * 16 * 16, 64, 32);
    let x: Vec<f32> = (0..p * c).map(|i| ((i * 7919) % 1000) as f32 * 1e-3).collect();
    let (mut mean, mut invstd) = (vec![0.0f32; c], vec![0.0f32; c]);
    let mut workspace = vec![0.0f64; 2 * g * c];
    let mut counters = vec![0i32; c / 32];
    time("batch_norm_stats_f32 P=4096 C=64 grid (2,32) block (32,16)", 3, || {
        let args = [
            ptr_mut(&mut mean),
            ptr_mut(&mut invstd),
            Arg::Ptr(0),
            Arg::Ptr(0),
            ptr_mut(&mut workspace),
            ptr_mut(&mut counters),
            ptr(&x),
            Arg::I32(p as i32),
            Arg::I32(c as i32),
            Arg::F32(1e-5),
            Arg::F32(0.1),
        ];
        // SAFETY: C means and invstds, 2·G·C workspace doubles, grid.x zeroed counters
        // (the last block resets them), P·C inputs: all the kernel indexes.
        unsafe { launch("batch_norm_stats_f32", [2, g as u32, 1], [32, 16, 1], 0, 0, &args) }
            .expect("batch_norm_stats_f32");
    });
    assert!(counters.iter().all(|&v| v == 0), "counters {counters:?}");
    assert!((mean[0] - x.iter().step_by(c).sum::<f32>() / p as f32).abs() < 1e-3);
}
