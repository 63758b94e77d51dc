//! The branch scheduler: running the four branches of each Inception block concurrently must
//! give bitwise the same activations, loss, gradients and trained weights as running them in
//! order.

use incept::backend::cpu::Cpu;
use incept::backend::Sgd;
use incept::model::net::{HostTensor, Net};
use incept::model::ModelSpec;
use incept::schedule::{run_branches, BranchSchedule};
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

struct Outcome {
    acts: Vec<Vec<u32>>,
    losses: Vec<u64>,
    grads: Vec<(String, Vec<u32>)>,
    state: Vec<(String, Vec<u32>)>,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn train(schedule: BranchSchedule) -> Outcome {
    let spec = ModelSpec::inception_net_small();
    let mut net: Net<f32, Cpu> = Net::new(spec, Cpu, 7).unwrap();
    net.schedule = schedule;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let n = 6;
    let x: Vec<f32> = (0..n * 32 * 32 * 3).map(|_| rng.random_range(-2.0..2.0)).collect();
    let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..10)).collect();
    let opt = Sgd { lr: 0.05, momentum: 0.9, weight_decay: 5e-4, nesterov: true };
    let mut losses = Vec::new();
    let mut grads = Vec::new();
    for step in 0..3 {
        let (loss, _) = net.train_step(&x, &labels, &opt, 0.1).unwrap();
        losses.push(loss.to_bits());
        if step == 0 {
            grads = net.grads().into_iter().map(|(k, g)| (k, bits(&g))).collect();
        }
    }
    let logits = net.forward(&x, n, true).unwrap();
    let mut acts = vec![bits(&logits)];
    for name in ["block3.0", "block3.0.branch4_conv", "block4.0", "block4"] {
        acts.push(bits(&net.activation(name).unwrap().0));
    }
    let state = net
        .state()
        .into_iter()
        .map(|(info, t)| {
            let v = match t {
                HostTensor::Float(v) => bits(&v),
                HostTensor::Int(c) => vec![c as u32],
            };
            (info.name, v)
        })
        .collect();
    Outcome { acts, losses, grads, state }
}

fn first_difference(a: &[(String, Vec<u32>)], b: &[(String, Vec<u32>)]) -> Option<String> {
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        assert_eq!(na, nb);
        if let Some(i) = va.iter().zip(vb).position(|(x, y)| x != y) {
            return Some(format!(
                "{na}[{i}]: sequential {} vs concurrent {}",
                f32::from_bits(va[i]),
                f32::from_bits(vb[i])
            ));
        }
    }
    None
}

#[test]
fn concurrent_branches_are_bitwise_equal_to_sequential() {
    // Run on a pool with more threads than this machine's cores, so branches really overlap.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
    let seq = pool.install(|| train(BranchSchedule::Sequential));
    let conc = pool.install(|| train(BranchSchedule::Concurrent));
    assert_eq!(seq.losses, conc.losses, "losses differ");
    for (i, (a, b)) in seq.acts.iter().zip(&conc.acts).enumerate() {
        assert!(a == b, "activation {i} differs");
    }
    let params = ModelSpec::inception_net_small()
        .tensors()
        .iter()
        .filter(|t| t.kind == incept::model::TensorKind::Param)
        .count();
    assert_eq!(seq.grads.len(), params, "every parameter has a gradient");
    if let Some(d) = first_difference(&seq.grads, &conc.grads) {
        panic!("gradients differ: {d}");
    }
    if let Some(d) = first_difference(&seq.state, &conc.state) {
        panic!("trained state differs: {d}");
    }
    // And a different thread count gives the same bits too.
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let single = one.install(|| train(BranchSchedule::Concurrent));
    assert_eq!(seq.losses, single.losses, "1 thread vs 4 threads");
    assert!(first_difference(&seq.state, &single.state).is_none());
}

#[test]
fn concurrent_schedule_overlaps_branches() {
    // Each branch waits until all four have started: only possible if they run at once.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(4).build().unwrap();
    let started = AtomicUsize::new(0);
    let mut branches = [0u8; 4];
    let overlapped = pool.install(|| {
        run_branches(BranchSchedule::Concurrent, &mut branches, |_, _| {
            started.fetch_add(1, Ordering::SeqCst);
            let deadline = Instant::now() + Duration::from_secs(10);
            while started.load(Ordering::SeqCst) < 4 && Instant::now() < deadline {
                std::hint::spin_loop();
            }
            started.load(Ordering::SeqCst) == 4
        })
    });
    assert_eq!(overlapped, vec![true; 4], "branches did not run concurrently");

    // The sequential schedule runs them in order, one at a time.
    let order = std::sync::Mutex::new(Vec::new());
    run_branches(BranchSchedule::Sequential, &mut branches, |i, _| order.lock().unwrap().push(i));
    assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3]);
}
