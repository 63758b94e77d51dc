//! The emulated GPU's own guarantees: that its checker catches what it claims to (a missing
//! event wait in the branch scheduler, a kernel writing past its buffer, a read of memory no
//! one wrote, a freed buffer used again), that it follows CUDA's stream and graph rules, and
//! that results do not depend on its scheduling seed. The backend itself is checked against
//! the CPU on this device by tests/gpu.rs.

use incept::backend::cuda::device::{Device, KernelArg, LaunchDims};
use incept::backend::cuda::emu::{EmuDevice, EmuOptions};
use incept::backend::cuda::{DType, Gpu, GpuOptions, StepInputs};
use incept::backend::{Buffers, Sgd};
use incept::model::net::{HostTensor, Net};
use incept::model::ModelSpec;
use rand::{Rng, SeedableRng};

fn device(seed: u64) -> EmuDevice {
    EmuDevice::new(EmuOptions { seed, check: true })
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn relu(dev: &EmuDevice, s: incept::backend::cuda::device::Stream, y: u64, x: u64, n: i32) {
    dev.launch(
        s,
        "relu_forward_f32",
        LaunchDims::linear(1, 256),
        &[KernelArg::Ptr(y), KernelArg::Ptr(x), KernelArg::I32(n)],
    )
    .expect("a well-formed launch is accepted");
}

#[test]
fn a_kernel_runs_by_name_when_the_host_synchronizes() {
    let dev = device(1);
    let s = dev.stream_create().unwrap();
    let x = dev.alloc(s, 16).unwrap();
    let y = dev.alloc(s, 16).unwrap();
    dev.htod(s, x, &f32_bytes(&[-1.0, 2.0, -3.0, 4.0])).unwrap();
    relu(&dev, s, y, x, 4);
    let mut out = [0u8; 16];
    dev.dtoh(s, &mut out, y).unwrap();
    assert_eq!(floats(&out), vec![0.0, 2.0, 0.0, 4.0]);
    assert_eq!(dev.counters().kernels.get("relu_forward_f32"), Some(&1));
}

#[test]
fn a_launch_that_does_not_match_the_kernel_signature_is_refused() {
    let dev = device(1);
    let s = dev.stream_create().unwrap();
    let p = dev.alloc(s, 16).unwrap();
    let dims = LaunchDims::linear(1, 32);
    let err = dev
        .launch(s, "relu_forward_f32", dims, &[KernelArg::Ptr(p), KernelArg::Ptr(p)])
        .unwrap_err()
        .to_string();
    assert!(err.contains("relu_forward_f32") && err.contains("3 parameters"), "{err}");
    let err = dev
        .launch(
            s,
            "relu_forward_f32",
            dims,
            &[KernelArg::Ptr(p), KernelArg::F32(1.0), KernelArg::I32(4)],
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("parameter 1"), "{err}");
    let err = dev.launch(s, "relu_forward_f64", dims, &[]).unwrap_err().to_string();
    assert!(err.contains("relu_forward_f64") && err.contains("not in cuda"), "{err}");
}

#[test]
fn a_kernel_writing_one_element_past_its_buffer_is_caught() {
    let dev = device(1);
    let s = dev.stream_create().unwrap();
    let x = dev.alloc(s, 20).unwrap();
    let y = dev.alloc(s, 16).unwrap();
    dev.htod(s, x, &f32_bytes(&[1.0, 2.0, 3.0, 4.0, 5.0])).unwrap();
    // y holds 4 floats; the kernel is told 5.
    relu(&dev, s, y, x, 5);
    let err = format!("{:#}", dev.synchronize().unwrap_err());
    assert!(
        err.contains("relu_forward_f32")
            && err.contains("outside its buffer")
            && err.contains("16 bytes"),
        "{err}"
    );
}

#[test]
fn reading_memory_no_one_wrote_is_caught() {
    let dev = device(1);
    let s = dev.stream_create().unwrap();
    let x = dev.alloc(s, 16).unwrap();
    let y = dev.alloc(s, 16).unwrap();
    relu(&dev, s, y, x, 4);
    let err = format!("{:#}", dev.synchronize().unwrap_err());
    assert!(
        err.contains("relu_forward_f32")
            && err.contains("never written")
            && err.contains("argument 1"),
        "{err}"
    );
    // And the host reading it back.
    let dev = device(1);
    let s = dev.stream_create().unwrap();
    let x = dev.alloc(s, 16).unwrap();
    let mut out = [0u8; 16];
    let err = format!("{:#}", dev.dtoh(s, &mut out, x).unwrap_err());
    assert!(err.contains("never written"), "{err}");
}

#[test]
fn using_a_freed_buffer_is_caught() {
    let dev = device(1);
    let s = dev.stream_create().unwrap();
    let x = dev.alloc(s, 16).unwrap();
    let y = dev.alloc(s, 16).unwrap();
    dev.memset(s, x, 0, 16).unwrap();
    dev.free(s, x).unwrap();
    relu(&dev, s, y, x, 4);
    let err = format!("{:#}", dev.synchronize().unwrap_err());
    assert!(err.contains("outside every live allocation"), "{err}");
}

#[test]
fn two_streams_without_an_event_race_and_with_one_do_not() {
    for wait in [false, true] {
        let dev = device(7);
        let (a, b) = (dev.stream_create().unwrap(), dev.stream_create().unwrap());
        let e = dev.event_create().unwrap();
        let x = dev.alloc(a, 16).unwrap();
        let y = dev.alloc(a, 16).unwrap();
        dev.memset(a, x, 0, 16).unwrap();
        dev.event_record(e, a).unwrap();
        dev.stream_wait(b, e).unwrap();
        // Stream a writes y; stream b then reads y, ordered only if it waits for a.
        relu(&dev, a, y, x, 4);
        let e2 = dev.event_create().unwrap();
        dev.event_record(e2, a).unwrap();
        if wait {
            dev.stream_wait(b, e2).unwrap();
        }
        let z = dev.alloc(b, 16).unwrap();
        relu(&dev, b, z, y, 4);
        let r = dev.synchronize();
        if wait {
            r.unwrap();
        } else {
            let err = format!("{:#}", r.unwrap_err());
            assert!(
                (err.contains("race") && err.contains("stream 0") && err.contains("stream 1"))
                    || err.contains("never written"),
                "{err}"
            );
        }
    }
}

#[test]
fn capture_rejects_blocking_copies_and_replays_in_an_allowed_order() {
    let dev = device(3);
    let s = dev.stream_create().unwrap();
    let x = dev.alloc(s, 16).unwrap();
    let y = dev.alloc(s, 16).unwrap();
    dev.htod(s, x, &f32_bytes(&[-1.0, 1.0, -2.0, 2.0])).unwrap();
    dev.synchronize().unwrap();
    dev.capture_begin(s).unwrap();
    relu(&dev, s, y, x, 4);
    let mut out = [0u8; 16];
    let err = dev.dtoh(s, &mut out, y).unwrap_err().to_string();
    assert!(err.contains("capture"), "{err}");
    let err = dev.capture_end(s).unwrap_err().to_string();
    assert!(err.contains("invalidated"), "{err}");
    // A clean capture: nothing runs until the graph is launched.
    dev.memset(s, y, 0, 16).unwrap();
    dev.synchronize().unwrap();
    dev.capture_begin(s).unwrap();
    relu(&dev, s, y, x, 4);
    let g = dev.capture_end(s).unwrap();
    dev.dtoh(s, &mut out, y).unwrap();
    assert_eq!(floats(&out), vec![0.0; 4], "captured work must not run at capture");
    dev.graph_launch(g, s).unwrap();
    dev.dtoh(s, &mut out, y).unwrap();
    assert_eq!(floats(&out), vec![0.0, 1.0, 0.0, 2.0]);
}

/// Three training steps of the seed model on the emulated GPU with `opts`, from seed 9.
/// A captured step bakes in the addresses of its step slots (labels, learning rate, batch
/// draws): once a larger batch has moved them, the graph must be refused, not replayed on
/// freed memory.
#[test]
fn a_step_graph_is_refused_once_its_step_slots_have_moved() {
    let gpu = Gpu::emulated(EmuOptions::default(), GpuOptions::default()).unwrap();
    let inputs = |n: usize| {
        let idx: Vec<usize> = (0..n).collect();
        (idx, vec![(0, 0, false); n], vec![1u32; n])
    };
    let (idx, views, labels) = inputs(4);
    let step = StepInputs { indices: &idx, views: &views, labels: &labels, lr: 0.1 };
    gpu.stage_step(&step).unwrap();
    gpu.capture_begin().unwrap();
    let graph = gpu.capture_end(4).unwrap();
    gpu.replay(&graph, &step).expect("a replay on the slots it was captured on runs");
    let (idx8, views8, labels8) = inputs(8);
    let larger = StepInputs { indices: &idx8, views: &views8, labels: &labels8, lr: 0.1 };
    gpu.stage_step(&larger).unwrap();
    let err = gpu.replay(&graph, &step).unwrap_err().to_string();
    assert!(err.contains("reallocated"), "{err}");
}

fn steps(opts: GpuOptions, emu: EmuOptions) -> Result<(Vec<f32>, Vec<f32>), String> {
    let gpu = Gpu::emulated(emu, opts).map_err(|e| format!("{e:#}"))?;
    let mut net =
        Net::new(ModelSpec::inception_net_small(), gpu, 9).map_err(|e| format!("{e:#}"))?;
    net.schedule = incept::schedule::BranchSchedule::Sequential;
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(400);
    let n = 8;
    let x: Vec<f32> = (0..n * 32 * 32 * 3).map(|_| r.random_range(-2.0..2.0)).collect();
    let labels: Vec<u32> = (0..n).map(|_| r.random_range(0..10)).collect();
    let opt = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 5e-4, nesterov: true };
    let mut losses = Vec::new();
    for _ in 0..3 {
        let (loss, _) = net.train_step(&x, &labels, &opt, 0.0).map_err(|e| format!("{e:#}"))?;
        losses.push(loss as f32);
    }
    let state = net
        .state()
        .into_iter()
        .flat_map(|(_, t)| match t {
            HostTensor::Float(v) => v,
            HostTensor::Int(c) => vec![c as f32],
        })
        .collect();
    Ok((losses, state))
}

#[test]
fn a_missing_event_wait_in_the_branch_scheduler_is_reported_as_a_race() {
    let base =
        GpuOptions { activations: DType::F32, deterministic: true, streams: 4, skip_wait: None };
    steps(base, EmuOptions::default()).expect("the scheduler as written has no race");
    // Leave out one of the first block's fork waits: a branch stream no longer waits for the
    // block's input to be written.
    let broken = GpuOptions { skip_wait: Some(1), ..base };
    // Whatever order the device picks, the missing wait is caught: as a read of memory the
    // unordered write has not reached yet, or as a race once the write has run first.
    for seed in [1, 2, 3] {
        let err = steps(broken, EmuOptions { seed, check: true })
            .expect_err("a missing wait must be caught");
        assert!(
            err.contains("race") || err.contains("missing event wait"),
            "seed {seed}: expected a race report, got: {err}"
        );
    }
    // In issue order the main stream's write runs first: a race naming both streams.
    let err = steps(broken, EmuOptions { seed: 0, check: true }).expect_err("caught");
    println!("{err}");
    assert!(
        err.contains("race") && err.contains("stream 0") && err.contains("with no event"),
        "expected a race between the main and a branch stream, got: {err}"
    );
}

#[test]
fn results_do_not_depend_on_the_scheduling_seed_or_the_stream_count() {
    let opts = |streams| GpuOptions {
        activations: DType::F32,
        deterministic: true,
        streams,
        skip_wait: None,
    };
    let a = steps(opts(4), EmuOptions { seed: 1, check: true }).unwrap();
    let b = steps(opts(4), EmuOptions { seed: 2, check: true }).unwrap();
    let c = steps(opts(1), EmuOptions { seed: 0, check: true }).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&a.0), bits(&b.0), "losses differ between seeds 1 and 2");
    assert!(bits(&a.1) == bits(&b.1), "state differs between seeds 1 and 2");
    assert_eq!(bits(&a.0), bits(&c.0), "losses differ between 4 streams and 1");
    assert!(bits(&a.1) == bits(&c.1), "state differs between 4 streams and 1");
}

#[test]
fn batches_rendered_on_the_device_equal_those_built_on_the_host() {
    use incept::data::{write_synthetic, Augment, Cifar10, Split};
    use incept::stepper::{DeviceFeed, Feed, HostFeed};
    let dir = tempfile::tempdir().unwrap();
    write_synthetic(dir.path(), 40, 10, 5).unwrap();
    let set = Cifar10::open(dir.path(), Split::Train).unwrap();
    let aug = Augment { crop: true, flip: true };
    let gpu = Gpu::emulated(EmuOptions::default(), GpuOptions::default()).unwrap();
    let mut device = DeviceFeed::new(&gpu, &set, aug, 3).unwrap();
    let mut host = HostFeed::new(&set, aug, 3);
    let idx: Vec<usize> = (0..40).rev().step_by(3).collect();
    let (mut ld, mut lh) = (Vec::new(), Vec::new());
    let d = gpu.download(&device.batch(&gpu, &idx, 2, 7, &mut ld));
    let h = gpu.download(&host.batch(&gpu, &idx, 2, 7, &mut lh));
    assert_eq!(ld, lh);
    let first = d.iter().zip(&h).position(|(a, b)| a.to_bits() != b.to_bits());
    assert!(
        first.is_none(),
        "first difference at {first:?}: device {:?} host {:?}",
        first.map(|i| d[i]),
        first.map(|i| h[i])
    );
}

/// A CUDA graph capture that fails has counted a step that never ran: putting the counters
/// back must restore every BatchNorm's count, those inside the Inception branches included.
#[test]
fn step_counters_put_back_restore_every_batch_norm_count() {
    use incept::backend::cpu::Cpu;
    let mut net = Net::new(ModelSpec::inception_net_small(), Cpu, 1).unwrap();
    let counts = |net: &mut Net<f32, Cpu>| -> Vec<i64> {
        net.state()
            .into_iter()
            .filter_map(|(_, t)| match t {
                HostTensor::Int(c) => Some(c),
                HostTensor::Float(_) => None,
            })
            .collect()
    };
    let x = vec![0.5f32; 2 * 32 * 32 * 3];
    let opt = Sgd { lr: 0.01, momentum: 0.9, weight_decay: 0.0, nesterov: false };
    net.train_step(&x, &[1, 2], &opt, 0.0).unwrap();
    let saved = net.step_counters();
    let before = counts(&mut net);
    net.train_step(&x, &[1, 2], &opt, 0.0).unwrap();
    assert_ne!(counts(&mut net), before);
    net.set_step_counters(&saved);
    assert_eq!(counts(&mut net), before);
    assert!(before.len() > 2 && before.iter().all(|&c| c == 1), "{before:?}");
}

/// The step profile of `incept bench --device emu` (batch 8, fp32) with `streams` and graph on
/// or off.
fn profiled_step(streams: usize, graph: bool) -> incept::backend::cuda::emu::profile::Profile {
    let cuda = incept::backend::select::CudaArgs {
        no_amp: true,
        streams,
        no_cuda_graph: !graph,
        ..Default::default()
    };
    let opts = incept::bench::BenchOpts {
        batch: 8,
        warmup: 0,
        steps: 1,
        schedule: incept::schedule::BranchSchedule::Concurrent,
    };
    let r = incept::bench::bench_cuda(&opts, &incept::backend::select::DeviceFlag::Emu, &cuda)
        .expect("bench on the emulated GPU");
    r.profile.expect("the emulated device records a step profile")
}

#[test]
fn the_step_profile_counts_what_the_model_computes_and_follows_the_streams() {
    use incept::backend::cuda::emu::profile::{OpKind, H100_SXM, H200_SXM, NODE_GAP_US};
    let n = 8;
    let spec = ModelSpec::inception_net_small();
    // Each convolution: forward, backward filter and (but for the first, whose input needs no
    // gradient) backward data, each 2·N·K·P·Q·C·R·S; its forward writes N·K·P·Q floats.
    let (mut flops, mut outputs) = (0.0f64, 0u64);
    for (i, (_, s, c)) in spec.convolutions(n).unwrap().into_iter().enumerate() {
        let (p, q) = (c.out_side(s.h), c.out_side(s.w));
        let one = 2.0 * (n * c.cout * p * q) as f64 * (c.cin * c.k * c.k) as f64;
        flops += if i == 0 { 2.0 } else { 3.0 } * one;
        outputs += (n * c.cout * p * q * 4) as u64;
    }
    for (streams, graph) in [(4, true), (1, false)] {
        let p = profiled_step(streams, graph);
        let convs: Vec<_> = p.work().filter(|o| o.name.starts_with("cudnnConvolution")).collect();
        let got: f64 = convs.iter().map(|o| o.work.flops).sum();
        assert!(
            (got - flops).abs() <= 1e-9 * flops,
            "streams {streams}: convolution FLOPs {got} against the model's {flops}"
        );
        let written: u64 = convs
            .iter()
            .filter(|o| o.name.starts_with("cudnnConvolutionForward"))
            .map(|o| o.work.written)
            .sum();
        assert_eq!(written, outputs, "streams {streams}: forward outputs' bytes");
        // SGD rewrites every parameter and its momentum: the kernels' counted writes (bytes
        // that changed) are all of them but the few whose update rounds away.
        let sgd: u64 = p.work().filter(|o| o.name == "sgd_step").map(|o| o.work.written).sum();
        let all = 2 * 4 * spec.param_count() as u64;
        assert!(
            sgd <= all && sgd as f64 >= 0.99 * all as f64,
            "sgd_step wrote {sgd} bytes of {all}"
        );
        assert_eq!(p.ops.iter().any(|o| o.in_graph), graph, "graph nodes recorded as such");
        let (critical, path) = p.critical_path(&H200_SXM);
        let serial: f64 = p.work().map(|o| H200_SXM.op_us(&o.work) + NODE_GAP_US).sum();
        let on_path: std::collections::BTreeSet<u32> =
            path.iter().map(|&i| p.ops[i].stream).collect();
        if streams == 1 {
            // One stream: the step is a chain, and its critical path is all of it.
            assert!(p.work().all(|o| o.stream == 0 || o.kind == OpKind::Marker));
            assert!((critical - serial).abs() <= 1e-9 * serial, "{critical} vs {serial}");
        } else {
            // The branches overlap: the path is shorter than the sum, and runs through the
            // branch streams as well as the main one.
            assert!(critical < 0.9 * serial, "{critical} vs {serial}");
            assert!(on_path.len() > 1, "the critical path stays on {on_path:?}");
        }
        for graph in [true, false] {
            let (h100, h200) = (p.bound(&H100_SXM, graph), p.bound(&H200_SXM, graph));
            assert!(h200.us() <= h100.us() && h200.us() >= h200.critical_us);
        }
        assert!(p.bound(&H200_SXM, false).us() >= p.bound(&H200_SXM, true).us());
    }
}
