//! A step profile from the emulated device, and from it a lower bound of the step's time on a
//! named GPU: the yardstick for GPU performance work where no GPU is at hand.
//!
//! While recording, every operation the device executes becomes a node: its name and stream,
//! the bytes it reads and writes, its floating-point operations, and the nodes it depends on
//! (the previous operation of its stream, the event record a wait joins, a graph's captured
//! edges). The nodes form the step's dependency graph; the longest path through it, with each
//! node costed by the roofline of a GPU (max of its arithmetic at the peak rate of its kind
//! and its traffic at the memory bandwidth, plus a minimum gap between dependent operations),
//! is the critical path. The bound is the largest of the critical path, the whole step's
//! traffic at the memory bandwidth, its arithmetic at each peak rate, and the host's cost of
//! issuing the work (one launch per operation eagerly, one graph launch with CUDA graphs).
//!
//! This is a model, not a measurement. What it counts:
//! - library calls (cuDNN, cuBLAS): every operand's full extent from the call's descriptors
//!   (workspace excluded: how much of it an algorithm touches is not known), and the direct
//!   convolution's or GEMM's 2·multiply-adds, at the tensor-core peak for 16-bit data and at
//!   the FP32 peak for strict fp32;
//! - kernels: the bytes their mutable arguments changed (a store of the value already there is
//!   invisible, so this is at most what they wrote), and for each const argument the smaller of
//!   what it can reach (its address to the end of its buffer) and the elements the launch
//!   wrote: exact for the elementwise kernels and for concat slices, an undercount for the
//!   reductions (shown with the reachable extent beside it). Kernel arithmetic is not counted:
//!   every project kernel does a few operations per byte, far below any GPU's ridge point;
//! - copies and memsets: their bytes (host→device over PCIe).
//!
//! Every count errs low, so the bound stays a bound; how far below a real step it lies is what
//! a GPU run will tell (caches, occupancy, tails of waves and cuDNN's own kernels are not
//! modelled; neither is the host's work between steps).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write;

use crate::backend::cuda::device::{ConvProblem, DType, DnnCall, Gemm, MathType, PoolDesc};

/// What kind of operation a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    Kernel,
    Library,
    /// A memset or a device→device copy.
    Memory,
    /// A host→device copy (over PCIe).
    Upload,
    /// An event record or wait, a stream-ordered allocation or free, the end of a replayed
    /// graph: ordering only, no work.
    Marker,
}

/// Which peak an operation's arithmetic runs at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Math {
    #[default]
    None,
    /// CUDA cores, fp32 FMA.
    Fp32,
    /// Tensor cores on fp32 data (TF32).
    Tf32,
    /// Tensor cores on fp16/bf16 data, fp32 accumulation.
    Tensor16,
}

/// The work of one operation.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Traffic {
    /// Bytes read from device memory (a lower count; see the module's comment).
    pub read: u64,
    /// For kernels: what the const arguments can reach (an upper count of their reads).
    pub reach: u64,
    pub written: u64,
    /// Bytes over PCIe (host→device copies).
    pub host: u64,
    pub flops: f64,
    pub math: Math,
}

/// One executed operation of the recorded step.
#[derive(Clone, Debug)]
pub struct ProfOp {
    pub name: String,
    pub kind: OpKind,
    pub stream: u32,
    /// A node of a replayed CUDA graph.
    pub in_graph: bool,
    pub work: Traffic,
    /// Earlier nodes this one waits for.
    pub deps: Vec<usize>,
}

/// The recording in progress: nodes in execution order (a topological order, since the device
/// only runs what its dependencies allow).
#[derive(Debug, Default)]
pub struct Recorder {
    ops: Vec<ProfOp>,
    /// Per stream, its latest node.
    last: HashMap<u32, usize>,
    /// Queued operation id → node (for the event waits that name a record).
    by_id: HashMap<u64, usize>,
}

impl Recorder {
    fn push(&mut self, op: ProfOp) -> usize {
        self.ops.push(op);
        self.ops.len() - 1
    }

    /// An operation queued on `stream` (with the device's operation id), after that stream's
    /// previous one and, for an event wait, after the record `waits_for`.
    pub fn top(
        &mut self, id: u64, stream: u32, (name, kind): (String, OpKind), work: Traffic,
        waits_for: Option<u64>,
    ) -> usize {
        let mut deps: Vec<usize> = self.last.get(&stream).copied().into_iter().collect();
        deps.extend(waits_for.and_then(|w| self.by_id.get(&w).copied()));
        let n = self.push(ProfOp { name, kind, stream, in_graph: false, work, deps });
        self.last.insert(stream, n);
        self.by_id.insert(id, n);
        n
    }

    /// The node before a graph launched on `stream` runs (what its entry nodes wait for).
    pub fn graph_entry(&self, stream: u32) -> Option<usize> {
        self.last.get(&stream).copied()
    }

    /// A node of a replayed graph: `deps` are nodes of this recording.
    pub fn node(
        &mut self, stream: u32, (name, kind): (String, OpKind), work: Traffic, deps: Vec<usize>,
    ) -> usize {
        self.push(ProfOp { name, kind, stream, in_graph: true, work, deps })
    }

    /// The end of a graph launched on `stream` (queued operation `id`): later work of the
    /// stream waits for all of `nodes`.
    pub fn graph_exit(&mut self, id: u64, stream: u32, nodes: Vec<usize>) {
        let n = self.push(ProfOp {
            name: "graph end".into(),
            kind: OpKind::Marker,
            stream,
            in_graph: false,
            work: Traffic::default(),
            deps: nodes,
        });
        self.last.insert(stream, n);
        self.by_id.insert(id, n);
    }

    pub fn finish(self) -> Profile {
        Profile { ops: self.ops }
    }
}

// ---------------------------------------------------------------------------------------------
// What library calls compute

/// 2·N·K·P·Q·C·R·S: the multiply-adds of the direct convolution, the same in all three
/// directions (backward data and filter are correlations of the same extents).
pub fn conv_flops(p: &ConvProblem) -> f64 {
    let [n, k, oh, ow] = p.y.dims;
    let [_, c, r, s] = p.w.dims;
    2.0 * (n * k * oh * ow) as f64 * (c * r * s) as f64
}

/// The peak a convolution runs at: tensor cores for 16-bit data, FP32 FMA for strict fp32 (a
/// fp32 call allowed tensor ops would use TF32).
pub fn conv_math(p: &ConvProblem) -> Math {
    match (p.x.dtype, p.conv.math) {
        (DType::F16 | DType::Bf16, _) => Math::Tensor16,
        (DType::F32, MathType::Fma) => Math::Fp32,
        (DType::F32, _) => Math::Tf32,
    }
}

fn pool_flops(pool: &PoolDesc, outputs: usize) -> f64 {
    (pool.window[0] * pool.window[1] * outputs) as f64
}

/// A cuDNN call's arithmetic and its peak.
pub fn dnn_flops(call: &DnnCall) -> (f64, Math) {
    match call {
        DnnCall::Conv(c) => (conv_flops(&c.problem), conv_math(&c.problem)),
        DnnCall::AddTensor(a) => (a.c.len() as f64, Math::Fp32),
        DnnCall::PoolForward(f) => (pool_flops(&f.pool, f.y.len()), Math::Fp32),
        DnnCall::PoolBackward(b) => (pool_flops(&b.pool, b.y.len()), Math::Fp32),
    }
}

/// `cublasSgemm` without TF32 (the handle's default math): 2·m·n·k on CUDA cores.
pub fn gemm_flops(g: &Gemm) -> (f64, Math) {
    (2.0 * (g.m * g.n * g.k) as f64, Math::Fp32)
}

// ---------------------------------------------------------------------------------------------
// The GPUs and the cost model

/// A GPU's peaks, dense (no 2:4 sparsity), from its vendor's datasheet.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuSpec {
    pub name: &'static str,
    pub fp32_tflops: f64,
    pub tf32_tflops: f64,
    pub f16_tflops: f64,
    /// HBM bandwidth.
    pub mem_tb_s: f64,
    /// Host→device bandwidth (PCIe Gen5 x16, one direction).
    pub pcie_gb_s: f64,
}

/// NVIDIA H100 SXM5 datasheet: FP32 67 TFLOPS; TF32 989 and FP16/BF16 1,979 tensor TFLOPS
/// *with sparsity*, i.e. 494.5 and 989.5 dense; HBM3 3.35 TB/s; PCIe Gen5 128 GB/s (both
/// directions together).
pub const H100_SXM: GpuSpec = GpuSpec {
    name: "H100 SXM5",
    fp32_tflops: 67.0,
    tf32_tflops: 494.5,
    f16_tflops: 989.5,
    mem_tb_s: 3.35,
    pcie_gb_s: 64.0,
};

/// NVIDIA H200 SXM datasheet: the same compute as the H100 SXM5 (FP32 67, TF32 989*, FP16/BF16
/// 1,979* TFLOPS, * with sparsity); HBM3e 4.8 TB/s; PCIe Gen5 128 GB/s.
pub const H200_SXM: GpuSpec = GpuSpec {
    name: "H200 SXM",
    fp32_tflops: 67.0,
    tf32_tflops: 494.5,
    f16_tflops: 989.5,
    mem_tb_s: 4.8,
    pcie_gb_s: 64.0,
};

pub const GPUS: [GpuSpec; 2] = [H100_SXM, H200_SXM];

/// The host's cost of one eager kernel launch or library call, µs. Measured: a raw
/// `cuLaunchKernel` at about 3.0 µs (meta-pytorch/tritonbench#1017, GB200) and an asynchronous
/// enqueue at 2.6–2.8 µs per launch (ahrefs/ocannl#488, CUDA 13); cuDNN's calls cost more.
/// The low end, rounded down, so the bound stays a bound.
pub const EAGER_ISSUE_US: f64 = 2.5;
/// The host's cost of one graph launch, µs: about 15 µs fixed in the same ocannl measurement;
/// rounded down.
pub const GRAPH_LAUNCH_US: f64 = 10.0;
/// The least gap between two dependent operations on the device, µs: about 0.58 µs per node of
/// a replayed chain of empty kernels (ahrefs/ocannl#488); rounded down. Eager launches have at
/// least this gap too.
pub const NODE_GAP_US: f64 = 0.5;

impl GpuSpec {
    /// The roofline time of one operation, µs: its arithmetic at its peak or its traffic at the
    /// bandwidth, whichever is longer.
    pub fn op_us(&self, w: &Traffic) -> f64 {
        let peak = match w.math {
            Math::None => f64::INFINITY,
            Math::Fp32 => self.fp32_tflops,
            Math::Tf32 => self.tf32_tflops,
            Math::Tensor16 => self.f16_tflops,
        };
        let compute = w.flops / (peak * 1e6);
        let memory = (w.read + w.written) as f64 / (self.mem_tb_s * 1e6);
        let host = w.host as f64 / (self.pcie_gb_s * 1e3);
        compute.max(memory).max(host)
    }
}

/// The lower bound of one step on one GPU, issued eagerly or as a CUDA graph, with each of the
/// limits it is the largest of (µs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bound {
    pub gpu: GpuSpec,
    pub graph: bool,
    pub critical_us: f64,
    pub memory_us: f64,
    /// Arithmetic at the tensor-core peaks (16-bit and TF32).
    pub tensor_us: f64,
    /// Arithmetic on the CUDA cores.
    pub fp32_us: f64,
    pub issue_us: f64,
}

impl Bound {
    pub fn us(&self) -> f64 {
        self.critical_us
            .max(self.memory_us)
            .max(self.tensor_us)
            .max(self.fp32_us)
            .max(self.issue_us)
    }
    /// Which limit binds.
    pub fn binding(&self) -> &'static str {
        let t = self.us();
        if t == self.critical_us {
            "critical path"
        } else if t == self.memory_us {
            "memory"
        } else if t == self.issue_us {
            "launch issue"
        } else if t == self.tensor_us {
            "tensor cores"
        } else {
            "fp32 cores"
        }
    }
}

/// A recorded step.
#[derive(Clone, Debug, Default)]
pub struct Profile {
    pub ops: Vec<ProfOp>,
}

/// One row of the profile's table: the operations of one name, and the streams they ran on.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Group {
    pub streams: BTreeSet<u32>,
    pub calls: usize,
    pub work: Traffic,
    pub us: f64,
}

impl Profile {
    /// The operations that do work (markers left out).
    pub fn work(&self) -> impl Iterator<Item = &ProfOp> {
        self.ops.iter().filter(|o| o.kind != OpKind::Marker)
    }

    /// Kernel launches and library calls (what the host issues one by one when eager).
    pub fn launches(&self) -> usize {
        self.work().count()
    }

    /// The step's work summed over all operations.
    pub fn total(&self) -> Traffic {
        let mut t = Traffic::default();
        for o in self.work() {
            t.read += o.work.read;
            t.reach += o.work.reach;
            t.written += o.work.written;
            t.host += o.work.host;
            t.flops += o.work.flops;
        }
        t
    }

    /// The arithmetic of each kind of peak.
    fn flops_of(&self, math: &[Math]) -> f64 {
        // A fold from +0.0: an empty float sum is −0.0, which would print as such.
        self.work().filter(|o| math.contains(&o.work.math)).fold(0.0, |a, o| a + o.work.flops)
    }

    /// The longest path through the dependency graph on `gpu`: its length (µs) and its nodes
    /// from first to last. Each node costs its roofline time, plus the least gap between
    /// dependent operations for a node that does work.
    pub fn critical_path(&self, gpu: &GpuSpec) -> (f64, Vec<usize>) {
        let n = self.ops.len();
        let mut finish = vec![0.0f64; n];
        let mut from: Vec<Option<usize>> = vec![None; n];
        for (i, o) in self.ops.iter().enumerate() {
            let mut start = 0.0;
            for &d in &o.deps {
                if from[i].is_none() || finish[d] > start {
                    start = finish[d];
                    from[i] = Some(d);
                }
            }
            let cost =
                if o.kind == OpKind::Marker { 0.0 } else { gpu.op_us(&o.work) + NODE_GAP_US };
            finish[i] = start + cost;
        }
        let Some(mut at) = (0..n).max_by(|&a, &b| finish[a].total_cmp(&finish[b])) else {
            return (0.0, Vec::new());
        };
        let length = finish[at];
        let mut path = vec![at];
        while let Some(p) = from[at] {
            path.push(p);
            at = p;
        }
        path.reverse();
        (length, path)
    }

    /// The lower bound of the step on `gpu`, eager or replayed as a graph.
    pub fn bound(&self, gpu: &GpuSpec, graph: bool) -> Bound {
        let total = self.total();
        let tensor = self.flops_of(&[Math::Tensor16]) / (gpu.f16_tflops * 1e6)
            + self.flops_of(&[Math::Tf32]) / (gpu.tf32_tflops * 1e6);
        Bound {
            gpu: *gpu,
            graph,
            critical_us: self.critical_path(gpu).0,
            memory_us: (total.read + total.written) as f64 / (gpu.mem_tb_s * 1e6)
                + total.host as f64 / (gpu.pcie_gb_s * 1e3),
            tensor_us: tensor,
            fp32_us: self.flops_of(&[Math::Fp32]) / (gpu.fp32_tflops * 1e6),
            issue_us: if graph { GRAPH_LAUNCH_US } else { self.launches() as f64 * EAGER_ISSUE_US },
        }
    }

    /// The operations grouped by name, with their time on `gpu`.
    pub fn groups(&self, gpu: &GpuSpec) -> BTreeMap<String, Group> {
        let mut out: BTreeMap<String, Group> = BTreeMap::new();
        for o in self.work() {
            let g = out.entry(o.name.clone()).or_default();
            g.streams.insert(o.stream);
            g.calls += 1;
            g.work.read += o.work.read;
            g.work.reach += o.work.reach;
            g.work.written += o.work.written;
            g.work.host += o.work.host;
            g.work.flops += o.work.flops;
            g.us += gpu.op_us(&o.work);
        }
        out
    }

    /// The profile as text: every kind of operation by stream, the critical path, and the
    /// bounds on each GPU of [`GPUS`], eager and graphed.
    pub fn report(&self, batch: usize) -> String {
        let mut out = String::new();
        self.write_totals(&mut out);
        self.write_table(&mut out, &H200_SXM);
        self.write_critical_path(&mut out, &H200_SXM);
        self.write_bounds(&mut out, batch);
        out
    }

    /// The step's launches and its traffic and arithmetic in all.
    fn write_totals(&self, out: &mut String) {
        let total = self.total();
        let graphed = self.ops.iter().any(|o| o.in_graph);
        let _ = writeln!(
            out,
            "step profile (emulated device; a model of a GPU, not a measurement): {} launches and library calls, {}",
            self.launches(),
            if graphed {
                "replayed as a CUDA graph"
            } else {
                "issued eagerly"
            }
        );
        let kernels_read: u64 =
            self.work().filter(|o| o.kind == OpKind::Kernel).map(|o| o.work.read).sum();
        let _ = writeln!(
            out,
            "  read ≥ {:.1} MB (kernels ≥ {:.1} MB of the {:.1} MB their inputs can reach), written {:.1} MB, host→device {:.2} MB, {:.2} GFLOP",
            total.read as f64 / 1e6,
            kernels_read as f64 / 1e6,
            total.reach as f64 / 1e6,
            total.written as f64 / 1e6,
            total.host as f64 / 1e6,
            total.flops / 1e9
        );
    }

    /// A row per kind of operation, the costliest on `gpu` first.
    fn write_table(&self, out: &mut String, gpu: &GpuSpec) {
        let mut rows: Vec<_> = self.groups(gpu).into_iter().collect();
        rows.sort_by(|a, b| b.1.us.total_cmp(&a.1.us).then(a.0.cmp(&b.0)));
        let _ = writeln!(
            out,
            "\n{:<54} {:>9} {:>5} {:>8} {:>8} {:>8} {:>7} {:>8}",
            "operation", "streams", "calls", "read MB", "reach MB", "write MB", "GFLOP", "H200 µs"
        );
        for (name, g) in &rows {
            let streams: Vec<String> = g.streams.iter().map(u32::to_string).collect();
            let _ = writeln!(
                out,
                "{:<54} {:>9} {:>5} {:>8.2} {:>8} {:>8.2} {:>7.3} {:>8.2}",
                name,
                streams.join(","),
                g.calls,
                g.work.read as f64 / 1e6,
                if g.work.reach > 0 {
                    format!("{:.2}", g.work.reach as f64 / 1e6)
                } else {
                    "-".into()
                },
                g.work.written as f64 / 1e6,
                g.work.flops / 1e9,
                g.us
            );
        }
    }

    /// The critical path on `gpu`: its length, its route through the streams, its heaviest
    /// operations.
    fn write_critical_path(&self, out: &mut String, gpu: &GpuSpec) {
        let (length, path) = self.critical_path(gpu);
        let on_path: Vec<&ProfOp> =
            path.iter().map(|&i| &self.ops[i]).filter(|o| o.kind != OpKind::Marker).collect();
        let _ = writeln!(
            out,
            "\ncritical path on the {}: {length:.1} µs over {} operations (each costs its roofline time + {NODE_GAP_US} µs)",
            gpu.name,
            on_path.len()
        );
        // Runs of consecutive operations on one stream, so the path reads as a route through
        // the streams.
        let mut runs: Vec<(u32, usize, f64)> = Vec::new();
        for o in &on_path {
            let us = gpu.op_us(&o.work) + NODE_GAP_US;
            match runs.last_mut() {
                Some(r) if r.0 == o.stream => {
                    r.1 += 1;
                    r.2 += us;
                }
                _ => runs.push((o.stream, 1, us)),
            }
        }
        let route: Vec<String> =
            runs.iter().map(|(s, n, us)| format!("stream {s} ×{n} ({us:.0} µs)")).collect();
        let _ = writeln!(out, "  route: {}", route.join(" → "));
        let mut heavy: Vec<&&ProfOp> = on_path.iter().collect();
        heavy.sort_by(|a, b| gpu.op_us(&b.work).total_cmp(&gpu.op_us(&a.work)));
        for o in heavy.iter().take(8) {
            let _ =
                writeln!(out, "  {:>7.1} µs  {} (stream {})", gpu.op_us(&o.work), o.name, o.stream);
        }
    }

    /// The lower bounds on every GPU of [`GPUS`], graphed and eager.
    fn write_bounds(&self, out: &mut String, batch: usize) {
        let _ = writeln!(
            out,
            "\nlower bound of one training step of batch {batch} (µs; the largest limit binds):"
        );
        let _ = writeln!(
            out,
            "{:<22} {:>9} {:>8} {:>8} {:>8} {:>8} {:>9} {:>10}  binding",
            "GPU", "critical", "memory", "tensor", "fp32", "issue", "bound", "img/s ≤"
        );
        for gpu in &GPUS {
            for graph in [true, false] {
                let b = self.bound(gpu, graph);
                let _ = writeln!(
                    out,
                    "{:<22} {:>9.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>9.1} {:>10.0}  {}",
                    format!("{}, {}", gpu.name, if graph { "graph" } else { "eager" }),
                    b.critical_us,
                    b.memory_us,
                    b.tensor_us,
                    b.fp32_us,
                    b.issue_us,
                    b.us(),
                    batch as f64 / (b.us() * 1e-6),
                    b.binding()
                );
            }
        }
        let _ = writeln!(
            out,
            "  peaks: NVIDIA H100/H200 SXM datasheets, dense; launch costs {EAGER_ISSUE_US} µs eager, {GRAPH_LAUNCH_US} µs per graph, {NODE_GAP_US} µs between dependent operations (README, \"The step profile\")"
        );
    }

    /// The bounds as JSON (for the bench's `--json`).
    pub fn bounds_json(&self) -> serde_json::Value {
        let mut rows = Vec::new();
        for gpu in &GPUS {
            for graph in [true, false] {
                let b = self.bound(gpu, graph);
                rows.push(serde_json::json!({
                    "gpu": gpu.name,
                    "graph": graph,
                    "critical_us": b.critical_us,
                    "memory_us": b.memory_us,
                    "tensor_us": b.tensor_us,
                    "fp32_us": b.fp32_us,
                    "issue_us": b.issue_us,
                    "bound_us": b.us(),
                    "binding": b.binding(),
                }));
            }
        }
        let t = self.total();
        serde_json::json!({
            "launches": self.launches(),
            "read_bytes": t.read,
            "reach_bytes": t.reach,
            "written_bytes": t.written,
            "host_bytes": t.host,
            "flops": t.flops,
            "bounds": rows,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(stream: u32, bytes: u64, deps: Vec<usize>) -> ProfOp {
        ProfOp {
            name: format!("k{stream}"),
            kind: OpKind::Kernel,
            stream,
            in_graph: false,
            work: Traffic { written: bytes, ..Traffic::default() },
            deps,
        }
    }

    /// 4.8 MB at 4.8 TB/s: one microsecond on the H200.
    const US: u64 = 4_800_000;

    #[test]
    fn the_critical_path_is_the_longest_chain_and_a_fork_runs_in_parallel() {
        // 0 (10 µs) → {1 (30 µs), 2 (10 µs)} → 3 (10 µs): the path is 0, 1, 3.
        let p = Profile {
            ops: vec![
                op(0, 10 * US, vec![]),
                op(1, 30 * US, vec![0]),
                op(2, 10 * US, vec![0]),
                op(0, 10 * US, vec![1, 2]),
            ],
        };
        let (len, path) = p.critical_path(&H200_SXM);
        assert_eq!(path, vec![0, 1, 3]);
        assert!((len - (50.0 + 3.0 * NODE_GAP_US)).abs() < 1e-9, "{len}");
        let b = p.bound(&H200_SXM, true);
        // Traffic: 60 µs in all, more than the path (51.5 µs with its gaps) and the graph's
        // launch: the memory binds.
        assert!((b.memory_us - 60.0).abs() < 1e-9);
        assert!((b.critical_us - len).abs() < 1e-9);
        assert_eq!(b.issue_us, GRAPH_LAUNCH_US);
        assert_eq!(b.binding(), "memory");
        assert_eq!(b.us(), b.memory_us);
        // Eagerly the host issues four launches.
        assert_eq!(p.bound(&H200_SXM, false).issue_us, 4.0 * EAGER_ISSUE_US);
        // Without the fork's traffic the chain binds.
        let chain = Profile { ops: p.ops[..2].to_vec() };
        assert_eq!(chain.bound(&H200_SXM, true).binding(), "critical path");
    }

    #[test]
    fn markers_cost_nothing_but_carry_the_order() {
        let mut m = op(0, 0, vec![0]);
        m.kind = OpKind::Marker;
        let p = Profile { ops: vec![op(0, US, vec![]), m, op(1, US, vec![1])] };
        let (len, path) = p.critical_path(&H200_SXM);
        assert_eq!(path, vec![0, 1, 2]);
        assert!((len - 2.0 * (1.0 + NODE_GAP_US)).abs() < 1e-9);
        assert_eq!(p.launches(), 2);
    }

    #[test]
    fn arithmetic_runs_at_the_peak_of_its_kind() {
        let w = Traffic { flops: 989.5e6, math: Math::Tensor16, ..Traffic::default() };
        assert!((H200_SXM.op_us(&w) - 1.0).abs() < 1e-9);
        let w = Traffic { math: Math::Fp32, ..w };
        assert!((H200_SXM.op_us(&w) - 989.5 / 67.0).abs() < 1e-9);
        // The same bytes take longer on the H100's slower memory.
        let w = Traffic { read: US, ..Traffic::default() };
        assert!(H100_SXM.op_us(&w) > H200_SXM.op_us(&w));
    }
}
