//! The plan of a training step as a backend sees it: for every Inception block the network
//! announces the fork (`branches_begin`), tags each branch's ops with the branch
//! (`branch(Some(i))`), returns to the main line (`branch(None)`) and announces the join
//! (`branches_end`) before the concat; the backward mirrors it, and the block's input gradient
//! (the sum of the branch contributions) comes after the join. A GPU backend turns exactly these
//! calls into stream waits and events, so the dependencies are checked here on a recorded plan,
//! on the CPU. A backend that routes ops by these calls gets them from one thread, in order,
//! whatever branch schedule the network was given.

use incept::backend::cpu::Cpu;
use incept::backend::ops::*;
use incept::backend::{
    Affine, BatchNormCfg, BatchNormSync, BatchStats, Conv2d, MaxPool2d, Nhwc, RunningStats, Sgd,
};
use incept::model::net::Net;
use incept::model::{Layer, ModelSpec};
use incept::schedule::BranchSchedule;
use std::sync::Mutex;

#[derive(Clone, Debug, PartialEq)]
enum Ev {
    Begin(usize),
    Branch(Option<usize>),
    End(usize),
    Op(&'static str),
}

/// The CPU reference, recording every call in order.
struct Recorder {
    log: Mutex<Vec<Ev>>,
}

impl Recorder {
    fn push(&self, e: Ev) {
        self.log.lock().unwrap().push(e);
    }
    fn op(&self, name: &'static str) {
        self.push(Ev::Op(name));
    }
}

type Buf = Vec<f64>;

impl Buffers<f64> for Recorder {
    type Buf = Buf;
    fn zeros(&self, len: usize) -> Buf {
        Buffers::<f64>::zeros(&Cpu, len)
    }
    fn upload(&self, data: &[f64]) -> Buf {
        Cpu.upload(data)
    }
    fn download(&self, buf: &Buf) -> Vec<f64> {
        Cpu.download(buf)
    }
    fn fill_zero(&self, buf: &mut Buf) {
        Cpu.fill_zero(buf)
    }
}

impl Backend<f64> for Recorder {
    /// Like the CUDA backend: the branch calls route the ops that follow, so they must come
    /// from one thread, in order.
    fn issues_from_one_thread(&self) -> bool {
        true
    }
    fn branches_begin(&self, n: usize) {
        self.push(Ev::Begin(n));
    }
    fn branch(&self, i: Option<usize>) {
        self.push(Ev::Branch(i));
    }
    fn branches_end(&self, n: usize) {
        self.push(Ev::End(n));
    }
}

impl ConvOps<f64> for Recorder {
    fn conv2d_forward(&self, y: &mut Buf, x: &Buf, w: &Buf, b: &Buf, xs: Nhwc, conv: &Conv2d) {
        self.op("conv2d_forward");
        Cpu.conv2d_forward(y, x, w, b, xs, conv)
    }
    fn conv2d_backward(
        &self, dx: Option<&mut Buf>, dw: &mut Buf, db: &mut Buf, dy: &Buf, x: &Buf, w: &Buf,
        xs: Nhwc, conv: &Conv2d,
    ) {
        self.op("conv2d_backward");
        Cpu.conv2d_backward(dx, dw, db, dy, x, w, xs, conv)
    }
    fn linear_forward(
        &self, y: &mut Buf, x: &Buf, w: &Buf, b: &Buf, n: usize, fin: usize, fout: usize,
    ) {
        self.op("linear_forward");
        Cpu.linear_forward(y, x, w, b, n, fin, fout)
    }
    fn linear_backward(
        &self, dx: Option<&mut Buf>, dw: &mut Buf, db: &mut Buf, dy: &Buf, x: &Buf, w: &Buf,
        n: usize, fin: usize, fout: usize,
    ) {
        self.op("linear_backward");
        Cpu.linear_backward(dx, dw, db, dy, x, w, n, fin, fout)
    }
}

impl BatchNormOps<f64> for Recorder {
    fn batch_norm_forward_train(
        &self, y: &mut Buf, x: &Buf, affine: Affine<&Buf>, running: RunningStats<&mut Buf>,
        batch: BatchStats<&mut Buf>, xs: Nhwc, cfg: &BatchNormCfg, relu: bool,
        sync: Option<&dyn BatchNormSync>,
    ) -> anyhow::Result<()> {
        self.op("batch_norm_forward_train");
        Cpu.batch_norm_forward_train(y, x, affine, running, batch, xs, cfg, relu, sync)
    }
    fn batch_norm_forward_eval(
        &self, y: &mut Buf, x: &Buf, affine: Affine<&Buf>, running: RunningStats<&Buf>, xs: Nhwc,
        cfg: &BatchNormCfg, relu: bool,
    ) {
        self.op("batch_norm_forward_eval");
        Cpu.batch_norm_forward_eval(y, x, affine, running, xs, cfg, relu)
    }
    fn batch_norm_backward(
        &self, dx: &mut Buf, daffine: Affine<&mut Buf>, dy: &Buf, relu_out: Option<&Buf>, x: &Buf,
        gamma: &Buf, batch: BatchStats<&Buf>, xs: Nhwc, sync: Option<&dyn BatchNormSync>,
    ) {
        self.op("batch_norm_backward");
        Cpu.batch_norm_backward(dx, daffine, dy, relu_out, x, gamma, batch, xs, sync)
    }
}

impl ElementwiseOps<f64> for Recorder {
    fn relu_forward(&self, y: &mut Buf, x: &Buf) {
        self.op("relu_forward");
        Cpu.relu_forward(y, x)
    }
    fn relu_backward(&self, dy: &mut Buf, y: &Buf) {
        self.op("relu_backward");
        Cpu.relu_backward(dy, y)
    }
}

impl PoolOps<f64> for Recorder {
    fn max_pool2d_forward(&self, y: &mut Buf, x: &Buf, xs: Nhwc, pool: &MaxPool2d) {
        self.op("max_pool2d_forward");
        Cpu.max_pool2d_forward(y, x, xs, pool)
    }
    fn max_pool2d_backward(
        &self, dx: &mut Buf, dy: &Buf, x: &Buf, y: &Buf, xs: Nhwc, pool: &MaxPool2d,
    ) {
        self.op("max_pool2d_backward");
        Cpu.max_pool2d_backward(dx, dy, x, y, xs, pool)
    }
    fn avg_pool2d_forward(&self, y: &mut Buf, x: &Buf, xs: Nhwc) {
        self.op("avg_pool2d_forward");
        Cpu.avg_pool2d_forward(y, x, xs)
    }
    fn avg_pool2d_backward(&self, dx: &mut Buf, dy: &Buf, xs: Nhwc) {
        self.op("avg_pool2d_backward");
        Cpu.avg_pool2d_backward(dx, dy, xs)
    }
}

impl ConcatOps<f64> for Recorder {
    fn fork_backward(&self, dx: &mut Buf, parts: &[&Buf]) {
        self.op("fork_backward");
        Cpu.fork_backward(dx, parts)
    }
    fn concat_forward(&self, y: &mut Buf, parts: &[&Buf], channels: &[usize]) {
        self.op("concat_forward");
        Cpu.concat_forward(y, parts, channels)
    }
    fn concat_backward(&self, dparts: &mut [&mut Buf], dy: &Buf, channels: &[usize]) {
        self.op("concat_backward");
        Cpu.concat_backward(dparts, dy, channels)
    }
}

impl LossOps<f64> for Recorder {
    fn cross_entropy_forward(
        &self, probs: &mut Buf, logits: &Buf, labels: &[u32], k: usize, smoothing: f64,
    ) -> f64 {
        self.op("cross_entropy_forward");
        Cpu.cross_entropy_forward(probs, logits, labels, k, smoothing)
    }
    fn cross_entropy_backward(
        &self, dlogits: &mut Buf, probs: &Buf, labels: &[u32], k: usize, smoothing: f64,
    ) {
        self.op("cross_entropy_backward");
        Cpu.cross_entropy_backward(dlogits, probs, labels, k, smoothing)
    }
}

impl OptimOps<f64> for Recorder {
    fn sgd_step(
        &self, param: &mut Buf, grad: &Buf, momentum_buf: &mut Buf, first_step: bool, opt: &Sgd,
    ) {
        self.op("sgd_step");
        Cpu.sgd_step(param, grad, momentum_buf, first_step, opt)
    }
}

/// Ops per branch of each Inception block, in network order: one per layer, except that a
/// ReLU right after a BatchNorm runs inside the BatchNorm's op.
fn blocks(layers: &[Layer], out: &mut Vec<Vec<usize>>) {
    let ops = |layers: &[Layer]| {
        let fused = layers
            .windows(2)
            .filter(|w| matches!(w, [Layer::BatchNorm { .. }, Layer::Relu { .. }]))
            .count();
        layers.len() - fused
    };
    for l in layers {
        if let Layer::Inception { branches, .. } = l {
            out.push(branches.iter().map(|b| ops(&b.layers)).collect());
        }
    }
}

/// One block's region of the log, from its `Begin` to its `End`: every op is inside a branch,
/// the branches come in order, each with `ops[i]` ops, and the main line is restored before
/// the join. Returns the index after `End`.
fn check_region(log: &[Ev], at: usize, ops: &[usize], what: &str) -> usize {
    let n = ops.len();
    assert_eq!(log[at], Ev::Begin(n), "{what}: the fork at event {at}");
    let mut i = at + 1;
    for (b, &count) in ops.iter().enumerate() {
        assert_eq!(
            log[i],
            Ev::Branch(Some(b)),
            "{what}: branch {b} must start at event {i}, after the fork and branch {}'s ops: {:?}",
            b.saturating_sub(1),
            &log[at..(i + 3).min(log.len())]
        );
        i += 1;
        let start = i;
        while matches!(log[i], Ev::Op(_)) {
            i += 1;
        }
        assert_eq!(
            i - start,
            count,
            "{what}: branch {b} issued {:?}, expected {count} ops (its layers, a ReLU fused into its BatchNorm)",
            &log[start..i]
        );
    }
    assert_eq!(log[i], Ev::Branch(None), "{what}: back on the main line before the join");
    assert_eq!(log[i + 1], Ev::End(n), "{what}: the join");
    i + 2
}

#[test]
fn every_inception_block_forks_and_joins_in_forward_and_backward() {
    let spec = ModelSpec::inception_net_small();
    let mut per_block = Vec::new();
    blocks(&spec.layers, &mut per_block);
    assert!(per_block.len() >= 2, "the seed model has Inception blocks: {per_block:?}");
    let rec = Recorder { log: Mutex::new(Vec::new()) };
    let mut net: Net<f64, Recorder> = Net::new(spec, rec, 1).unwrap();
    // Asked for concurrent branches, the network must still issue them in order to a
    // backend that needs one issuing thread (the checks below would see them interleaved).
    net.schedule = BranchSchedule::Concurrent;
    let n = 2;
    let x: Vec<f64> = (0..n * 32 * 32 * 3).map(|i| ((i * 37 % 101) as f64 - 50.0) / 50.0).collect();
    net.forward(&x, n, true).unwrap();
    net.loss(&[3, 7], 0.0).unwrap();
    net.backward().unwrap();
    let log = net.backend().log.lock().unwrap().clone();

    // Forward: every block in network order, each followed by its concat; nothing of the
    // block's own runs outside its fork..join.
    let mut i = 0;
    let mut forward_blocks = 0;
    let backward_from =
        log.iter().position(|e| *e == Ev::Op("cross_entropy_forward")).expect("the loss");
    while i < backward_from {
        match &log[i] {
            Ev::Begin(_) => {
                let ops = &per_block[forward_blocks];
                i = check_region(&log, i, ops, &format!("forward block {forward_blocks}"));
                assert_eq!(
                    log[i],
                    Ev::Op("concat_forward"),
                    "forward block {forward_blocks}: the concat follows the join"
                );
                forward_blocks += 1;
            }
            Ev::Branch(_) | Ev::End(_) => panic!("event {i} {:?} outside a block", log[i]),
            Ev::Op(_) => i += 1,
        }
    }
    assert_eq!(forward_blocks, per_block.len(), "forward blocks");

    // Backward: the blocks in reverse, each: split the joined gradient, fork, branches (the
    // reverse of their layers), join, then the sum of the branch gradients.
    let mut backward_blocks = 0;
    while i < log.len() {
        match &log[i] {
            Ev::Begin(_) => {
                let k = per_block.len() - 1 - backward_blocks;
                assert_eq!(
                    log[i - 1],
                    Ev::Op("concat_backward"),
                    "backward block {k}: the split precedes the fork"
                );
                let ops = &per_block[k];
                i = check_region(&log, i, ops, &format!("backward block {k}"));
                assert_eq!(
                    log.get(i),
                    Some(&Ev::Op("fork_backward")),
                    "backward block {k}: the branch gradients are summed after the join"
                );
                backward_blocks += 1;
            }
            Ev::Branch(_) | Ev::End(_) => panic!("event {i} {:?} outside a block", log[i]),
            Ev::Op(_) => i += 1,
        }
    }
    assert_eq!(backward_blocks, per_block.len(), "backward blocks");
}
