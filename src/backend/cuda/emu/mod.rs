//! The emulated GPU (`--device emu`): the [`Device`] of the seam, on the CPU.
//!
//! - **Kernels** are the `cuda/*.cu` sources compiled for the host (the `kernel-emu` crate),
//!   launched by name with the argument list the backend built, checked against the
//!   signature each kernel registered from its own source.
//! - **cuDNN and cuBLAS** calls are executed by [`mod@reference`], which honours every field of
//!   the call and rejects what the library would reject.
//! - **Execution model**: work is queued per stream and runs only when the host must see it
//!   (a stream, event or device synchronization, a blocking copy), one operation at a time, in
//!   an order drawn (from a seed) among all the orders the dependencies allow: stream order,
//!   event record → wait, and inside a graph the edges of its capture. Hidden ordering
//!   assumptions show as different bits between seeds, and the checker names them.
//! - **Graphs**: capture records nodes instead of running them, with the same dependencies;
//!   what cannot be captured (a blocking copy, a synchronization) fails the capture;
//!   replay runs the nodes in an allowed order.
//! - **The checker** ([`check`]): conflicting accesses with no happens-before path between
//!   them (vector clocks over streams, events and the host) are races naming both operations,
//!   their streams and the buffer; fresh memory is poisoned (0xFF bytes: NaN in every float
//!   type, −1 as an int) and a kernel or call reading a buffer no one wrote is an error;
//!   guard bytes around each allocation catch writes past either end; an address outside
//!   every live allocation (including a freed one) is an error.
//!
//! What it does not model: timing and concurrency inside the device (operations run one at a
//! time, each to completion, so a race can change the result only through the order chosen;
//! the checker finds it whatever the order), the relaxed memory model between concurrent
//! kernels, and warp-level lockstep (see `cuda/emu.h` for the model inside a kernel).

pub mod check;
mod exec;
mod graph;
mod memory;
pub mod profile;
pub mod reference;

use super::device::{
    AlgoPerf, ConvDirection, ConvProblem, Device, DeviceInfo, DnnCall, Event, Gemm, Graph,
    KernelArg, LaunchDims, Stream,
};
use anyhow::{anyhow, bail, Result};
use check::{Checker, Clock, Who};
use graph::{Capture, GraphState, Node};
use memory::{Alloc, GUARD};
use profile::{OpKind, Profile, Recorder, Traffic};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

/// How the emulated device runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EmuOptions {
    /// Seeds the order in which ready operations (and a kernel's blocks) run; 0 runs them in
    /// issue order, stream by stream, blocks in blockIdx order.
    pub seed: u64,
    /// The race, uninitialised-read and bounds checker (off only to measure its cost).
    pub check: bool,
}

impl EmuOptions {
    /// The defaults, with the scheduling seed from `INCEPT_EMU_SEED` if set.
    pub fn from_env() -> Result<EmuOptions> {
        let mut o = EmuOptions::default();
        if let Ok(v) = std::env::var("INCEPT_EMU_SEED") {
            o.seed = v.trim().parse().map_err(|_| {
                anyhow!("INCEPT_EMU_SEED={v:?}: expected a non-negative integer (0: issue order)")
            })?;
        }
        Ok(o)
    }
}

impl Default for EmuOptions {
    fn default() -> Self {
        EmuOptions { seed: 1, check: true }
    }
}

/// What the emulated device counts, for coverage and the step profile.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Launches per kernel name.
    pub kernels: BTreeMap<String, u64>,
    /// Calls per library function (`cudnnConvolutionForward`, `cublasSgemm`, …).
    pub library: BTreeMap<String, u64>,
}

/// What every emulated device of this process ran, for the coverage test.
static TOTAL: Mutex<Option<Counters>> = Mutex::new(None);

/// The sum of [`EmuDevice::counters`] over every emulated device of this process so far.
pub fn total_counters() -> Counters {
    TOTAL.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default()
}

/// Every kernel the emulation can launch: all `__global__` functions of `cuda/*.cu`.
pub fn kernel_names() -> Vec<String> {
    kernel_emu::kernels().iter().map(|k| k.name.to_string()).collect()
}

/// Counts one run of `name` in `pick(counters)` of the device and of the process.
fn count(own: &mut Counters, pick: fn(&mut Counters) -> &mut BTreeMap<String, u64>, name: &str) {
    *pick(own).entry(name.to_string()).or_default() += 1;
    let mut total = TOTAL.lock().unwrap_or_else(|p| p.into_inner());
    *pick(total.get_or_insert_with(Counters::default)).entry(name.to_string()).or_default() += 1;
}

/// A queued operation.
#[derive(Clone, Debug)]
enum Op {
    Launch {
        name: String,
        dims: LaunchDims,
        args: Vec<KernelArg>,
    },
    Dnn(DnnCall),
    Gemm(Gemm),
    Memset {
        ptr: u64,
        value: u8,
        bytes: usize,
    },
    Htod {
        dst: u64,
        data: Vec<u8>,
    },
    Dtod {
        dst: u64,
        src: u64,
        bytes: usize,
    },
    /// A stream-ordered allocation becoming usable (inside a graph: re-poisoned).
    Alloc {
        ptr: u64,
    },
    Free {
        ptr: u64,
    },
    /// An event's recorded point (no work).
    Record,
    /// Waits for the operation with this id (an event's record).
    Wait(u64),
    /// A whole graph, replayed on this stream.
    Graph(u32),
}

impl Op {
    fn label(&self) -> String {
        match self {
            Op::Launch { name, .. } => format!("kernel {name}"),
            Op::Dnn(c) => c.name().to_string(),
            Op::Gemm(_) => "cublasSgemm".into(),
            Op::Memset { .. } => "memset".into(),
            Op::Htod { .. } => "copy host→device".into(),
            Op::Dtod { .. } => "copy device→device".into(),
            Op::Alloc { .. } => "stream-ordered allocation".into(),
            Op::Free { .. } => "stream-ordered free".into(),
            Op::Record => "event record".into(),
            Op::Wait(_) => "event wait".into(),
            Op::Graph(g) => format!("graph {g}"),
        }
    }

    /// The name and kind of the operation in a step profile: kernels by name, convolutions with
    /// their shape (so each layer has its own row).
    fn profile_name(&self) -> (String, OpKind) {
        match self {
            Op::Launch { name, .. } => (name.clone(), OpKind::Kernel),
            Op::Dnn(call @ DnnCall::Conv(c)) => {
                let p = &c.problem;
                let [_, k, oh, ow] = p.y.dims;
                let [_, ch, r, s] = p.w.dims;
                let stride = if p.conv.stride == [1, 1] {
                    String::new()
                } else {
                    format!("/{}", p.conv.stride[0])
                };
                let name = format!(
                    "{} {r}×{s}{stride} {ch}→{k} @{oh}×{ow} {}",
                    call.name(),
                    p.x.dtype.suffix()
                );
                (name, OpKind::Library)
            }
            Op::Dnn(c) => (c.name().to_string(), OpKind::Library),
            Op::Gemm(_) => ("cublasSgemm".into(), OpKind::Library),
            Op::Memset { .. } => ("memset".into(), OpKind::Memory),
            Op::Dtod { .. } => ("copy device→device".into(), OpKind::Memory),
            Op::Htod { .. } => ("copy host→device".into(), OpKind::Upload),
            _ => (self.label(), OpKind::Marker),
        }
    }
}

/// An operation with what orders it.
#[derive(Clone, Debug)]
struct Queued {
    id: u64,
    stream: Stream,
    op: Op,
    /// Its place in the happens-before order.
    clock: Clock,
}

/// An event: the operation that marks its recorded point, and the clock there.
#[derive(Clone, Debug, Default)]
struct EventState {
    op: Option<u64>,
    clock: Clock,
    /// Recorded inside a capture: the node it marks.
    captured: Option<usize>,
}

struct State {
    allocs: BTreeMap<u64, Alloc>,
    streams: Vec<VecDeque<Queued>>,
    /// Each stream's clock: what its next operation happens after.
    clocks: Vec<Clock>,
    /// What the host has seen finish (joined into every operation it issues).
    host: Clock,
    events: Vec<EventState>,
    graphs: HashMap<u32, GraphState>,
    next_graph: u32,
    capture: Option<Capture>,
    done: std::collections::HashSet<u64>,
    next_id: u64,
    rng: u64,
    checker: Checker,
    counters: Counters,
    /// Launches so far, to seed each kernel's block order.
    launches: u64,
    ranges: Vec<String>,
    /// A step profile being recorded.
    profile: Option<Recorder>,
}

/// The emulated GPU.
pub struct EmuDevice {
    opts: EmuOptions,
    state: Mutex<State>,
    /// Kernel name → its parameters, as the kernel's source declares them.
    kernels: HashMap<String, Vec<kernel_emu::Param>>,
}

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl EmuDevice {
    pub fn new(opts: EmuOptions) -> EmuDevice {
        let kernels =
            kernel_emu::kernels().iter().map(|k| (k.name.to_string(), k.params.clone())).collect();
        EmuDevice {
            opts,
            kernels,
            state: Mutex::new(State {
                allocs: BTreeMap::new(),
                streams: Vec::new(),
                clocks: Vec::new(),
                host: Clock::default(),
                events: Vec::new(),
                graphs: HashMap::new(),
                next_graph: 0,
                capture: None,
                done: Default::default(),
                next_id: 1,
                rng: opts.seed,
                checker: Checker::new(opts.check),
                counters: Counters::default(),
                launches: 0,
                ranges: Vec::new(),
                profile: None,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What ran so far (kernels by name, library calls by function).
    pub fn counters(&self) -> Counters {
        self.state().counters.clone()
    }

    /// Starts recording a step profile: every operation executed from now on (so synchronize
    /// first, or work queued earlier is counted too).
    pub fn profile_begin(&self) {
        self.state().profile = Some(Recorder::default());
    }

    /// Ends the recording (synchronize first, or queued work is left out).
    pub fn profile_end(&self) -> Profile {
        self.state().profile.take().map(Recorder::finish).unwrap_or_default()
    }

    /// Runs the queued work until `stream`'s queue is empty (and whatever it waits for);
    /// returns the stream's index.
    fn drain(&self, st: &mut State, stream: Stream) -> Result<usize> {
        let s = stream_index(st, stream)?;
        self.run(st, &|st| st.streams[s].is_empty())?;
        Ok(s)
    }

    /// Queues `op` on `stream` (or records it into the capture).
    fn enqueue(&self, st: &mut State, stream: Stream, op: Op) -> Result<()> {
        let s = stream_index(st, stream)?;
        if let Some(cap) = st.capture.as_mut() {
            if cap.last.contains_key(&stream) {
                let mut deps: Vec<usize> = cap.last[&stream].into_iter().collect();
                deps.extend(cap.pending.remove(&stream).unwrap_or_default());
                let clock = cap.clocks.entry(stream).or_default();
                clock.tick(stream.0);
                let clock = clock.clone();
                cap.graph.nodes.push(Node { op, stream, deps, clock });
                let n = cap.graph.nodes.len() - 1;
                cap.last.insert(stream, Some(n));
                return Ok(());
            }
        }
        let host = st.host.clone();
        let clock = &mut st.clocks[s];
        clock.join(&host);
        clock.tick(stream.0);
        let clock = clock.clone();
        let id = st.next_id;
        st.next_id += 1;
        st.streams[s].push_back(Queued { id, stream, op, clock });
        Ok(())
    }

    /// Whether `stream` is being captured.
    fn capturing(st: &State, stream: Stream) -> bool {
        st.capture.as_ref().is_some_and(|c| c.last.contains_key(&stream))
    }

    /// Fails the open capture if `stream` is in it: `what` cannot be captured.
    fn capture_illegal(st: &mut State, stream: Stream, what: &str) -> Result<()> {
        if Self::capturing(st, stream) {
            let msg = format!("{what} on stream {} during a CUDA graph capture", stream.0);
            if let Some(c) = st.capture.as_mut() {
                c.invalid.get_or_insert(msg.clone());
            }
            bail!("{msg} (cudaErrorStreamCaptureUnsupported)");
        }
        Ok(())
    }

    /// Runs queued work until `until` says stop (or nothing is left), choosing among the ready
    /// operations by the seeded order.
    fn run(&self, st: &mut State, until: &dyn Fn(&State) -> bool) -> Result<()> {
        loop {
            if until(st) {
                return Ok(());
            }
            let ready: Vec<usize> = (0..st.streams.len())
                .filter(|&s| {
                    st.streams[s].front().is_some_and(|q| match q.op {
                        Op::Wait(id) => st.done.contains(&id),
                        _ => true,
                    })
                })
                .collect();
            if ready.is_empty() {
                if st.streams.iter().all(|q| q.is_empty()) {
                    return Ok(());
                }
                bail!("emulated device deadlock: every stream waits for an event that is never reached");
            }
            let pick = if self.opts.seed == 0 {
                ready[0]
            } else {
                ready[(splitmix(&mut st.rng) % ready.len() as u64) as usize]
            };
            let q = st.streams[pick].pop_front().expect("ready stream has work");
            let who = Who::op(q.id, q.stream, q.clock.clone(), q.op.label());
            let result = self.execute(st, &q.op, &who);
            st.done.insert(q.id);
            let work = result?;
            if let Some(p) = st.profile.as_mut() {
                let waits_for = match q.op {
                    Op::Wait(id) => Some(id),
                    _ => None,
                };
                // A replayed graph recorded its own nodes.
                if !matches!(q.op, Op::Graph(_)) {
                    p.top(q.id, q.stream.0, q.op.profile_name(), work, waits_for);
                }
            }
        }
    }
}

/// With `INCEPT_EMU_COUNTS` set to a file, each emulated device appends what it ran to it when
/// dropped (`kernel NAME N` and `library NAME N` lines): the coverage test collects the work of
/// the training runs it starts as separate processes.
impl Drop for EmuDevice {
    fn drop(&mut self) {
        let Some(path) = std::env::var_os("INCEPT_EMU_COUNTS") else {
            return;
        };
        let c = self.counters();
        let mut text = String::new();
        for (kind, map) in [("kernel", &c.kernels), ("library", &c.library)] {
            for (name, n) in map {
                text.push_str(&format!("{kind} {name} {n}\n"));
            }
        }
        use std::io::Write;
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()));
        if let Err(e) = written {
            tracing::warn!("INCEPT_EMU_COUNTS={}: {e}", path.to_string_lossy());
        }
    }
}

impl Device for EmuDevice {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            name: "emulated GPU (the CUDA backend on the CPU)".into(),
            compute_capability: (9, 0),
            // Few multiprocessors: the reduction kernels size their grids by it, and a small
            // grid keeps the emulated step fast while still running several blocks.
            multiprocessors: 4,
            total_memory: 16 << 30,
        }
    }

    fn mem_info(&self) -> Option<(usize, usize)> {
        let used: usize = self.state().allocs.values().map(|a| a.bytes).sum();
        let total = self.info().total_memory;
        Some((total.saturating_sub(used), total))
    }

    fn stream_create(&self) -> Result<Stream> {
        let mut st = self.state();
        st.streams.push(VecDeque::new());
        st.clocks.push(Clock::default());
        Ok(Stream(st.streams.len() as u32 - 1))
    }

    fn event_create(&self) -> Result<Event> {
        let mut st = self.state();
        st.events.push(EventState::default());
        Ok(Event(st.events.len() as u32 - 1))
    }

    fn event_record(&self, event: Event, stream: Stream) -> Result<()> {
        let mut st = self.state();
        let e = event.0 as usize;
        if e >= st.events.len() {
            bail!("event {} does not exist", event.0);
        }
        if Self::capturing(&st, stream) {
            let cap = st.capture.as_mut().expect("capturing");
            let node = cap.last.get(&stream).copied().flatten();
            let clock = cap.clocks.get(&stream).cloned().unwrap_or_default();
            st.events[e] = EventState { op: None, clock, captured: node.or(Some(usize::MAX)) };
            return Ok(());
        }
        self.enqueue(&mut st, stream, Op::Record)?;
        let q = st.streams[stream.0 as usize].back().expect("just queued").clone();
        st.events[e] = EventState { op: Some(q.id), clock: q.clock, captured: None };
        Ok(())
    }

    fn stream_wait(&self, stream: Stream, event: Event) -> Result<()> {
        let mut st = self.state();
        let ev = event_state(&st, event)?;
        if let Some(node) = ev.captured {
            // Waiting on a captured event pulls `stream` into the capture.
            let Some(cap) = st.capture.as_mut() else {
                bail!("waiting on an event recorded in a capture that has ended");
            };
            cap.last.entry(stream).or_insert(None);
            let clock = cap.clocks.entry(stream).or_default();
            clock.join(&ev.clock);
            if node != usize::MAX {
                cap.pending.entry(stream).or_default().push(node);
            }
            return Ok(());
        }
        if Self::capturing(&st, stream) {
            // An event recorded outside the capture: the graph cannot depend on it.
            return Self::capture_illegal(
                &mut st,
                stream,
                "waiting on an event recorded outside the capture",
            );
        }
        let s = stream_index(&st, stream)?;
        st.clocks[s].join(&ev.clock);
        if let Some(id) = ev.op {
            if !st.done.contains(&id) {
                self.enqueue(&mut st, stream, Op::Wait(id))?;
            }
        }
        Ok(())
    }

    fn event_query(&self, event: Event) -> Result<bool> {
        let mut st = self.state();
        let ev = event_state(&st, event)?;
        let Some(id) = ev.op else { return Ok(true) };
        // Work runs when the host looks: the event's point is reached now.
        self.run(&mut st, &|s| s.done.contains(&id))?;
        st.host.join(&ev.clock);
        Ok(true)
    }

    fn stream_synchronize(&self, stream: Stream) -> Result<()> {
        let mut st = self.state();
        Self::capture_illegal(&mut st, stream, "a stream synchronization")?;
        let s = self.drain(&mut st, stream)?;
        let c = st.clocks[s].clone();
        st.host.join(&c);
        let host = st.host.clone();
        st.checker.settle(&host);
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        let mut st = self.state();
        if st.capture.is_some() {
            let origin = st.capture.as_ref().map(|c| c.origin).expect("capturing");
            return Self::capture_illegal(&mut st, origin, "a device synchronization");
        }
        self.run(&mut st, &|_| false)?;
        let clocks = st.clocks.clone();
        for c in &clocks {
            st.host.join(c);
        }
        let host = st.host.clone();
        st.checker.settle(&host);
        Ok(())
    }

    fn alloc(&self, stream: Stream, bytes: usize) -> Result<u64> {
        let mut st = self.state();
        let mut a = Alloc::new(bytes);
        let ptr = a.base();
        if let Some(cap) = st.capture.as_mut().filter(|c| c.last.contains_key(&stream)) {
            a.graph = Some(u32::MAX);
            cap.allocs.push(ptr);
        }
        st.allocs.insert(ptr, a);
        self.enqueue(&mut st, stream, Op::Alloc { ptr })?;
        Ok(ptr)
    }

    fn free(&self, stream: Stream, ptr: u64) -> Result<()> {
        let mut st = self.state();
        if !st.allocs.contains_key(&ptr) {
            bail!("freeing {ptr:#x}, which was never allocated (or freed twice)");
        }
        self.enqueue(&mut st, stream, Op::Free { ptr })
    }

    fn memset(&self, stream: Stream, ptr: u64, value: u8, bytes: usize) -> Result<()> {
        let mut st = self.state();
        self.enqueue(&mut st, stream, Op::Memset { ptr, value, bytes })
    }

    fn htod(&self, stream: Stream, dst: u64, src: &[u8]) -> Result<()> {
        let mut st = self.state();
        Self::capture_illegal(&mut st, stream, "a copy from pageable host memory")?;
        self.enqueue(&mut st, stream, Op::Htod { dst, data: src.to_vec() })
    }

    fn dtoh(&self, stream: Stream, dst: &mut [u8], src: u64) -> Result<()> {
        let mut st = self.state();
        Self::capture_illegal(&mut st, stream, "a blocking copy to the host")?;
        let s = self.drain(&mut st, stream)?;
        // The copy itself is an operation of the stream: it reads what the stream's work
        // (and whatever that waited for) wrote, and nothing else may be writing it.
        let host = st.host.clone();
        st.clocks[s].join(&host);
        st.clocks[s].tick(stream.0);
        let id = st.next_id;
        st.next_id += 1;
        let who = Who::op(id, stream, st.clocks[s].clone(), "copy device→host".into());
        let base = self.region(&st, &who, src, dst.len(), "copy device→host")?;
        st.checker.read(&who, base, src, dst.len(), "its source")?;
        // SAFETY: the region lies inside a live allocation.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        let c = st.clocks[s].clone();
        st.host.join(&c);
        Ok(())
    }

    fn dtod(&self, stream: Stream, dst: u64, src: u64, bytes: usize) -> Result<()> {
        let mut st = self.state();
        self.enqueue(&mut st, stream, Op::Dtod { dst, src, bytes })
    }

    fn launch(
        &self, stream: Stream, name: &str, dims: LaunchDims, args: &[KernelArg],
    ) -> Result<()> {
        self.check_args(name, dims, args)?;
        let mut st = self.state();
        self.enqueue(
            &mut st,
            stream,
            Op::Launch { name: name.to_string(), dims, args: args.to_vec() },
        )
    }

    fn conv_algorithms(
        &self, _stream: Stream, problem: &ConvProblem, dir: ConvDirection, measure: bool,
    ) -> Result<Vec<AlgoPerf>> {
        Ok(reference::conv_algorithms(problem, dir, measure))
    }

    fn dnn(&self, stream: Stream, call: &DnnCall) -> Result<()> {
        reference::validate_dnn(call)?;
        let mut st = self.state();
        self.enqueue(&mut st, stream, Op::Dnn(*call))
    }

    fn gemm(&self, stream: Stream, gemm: &Gemm) -> Result<()> {
        reference::validate_gemm(gemm)?;
        let mut st = self.state();
        self.enqueue(&mut st, stream, Op::Gemm(*gemm))
    }

    fn cuda_stream(&self, _: Stream) -> Result<Option<usize>> {
        Ok(None)
    }

    fn capture_begin(&self, stream: Stream) -> Result<()> {
        self.begin_capture(stream)
    }

    fn capture_end(&self, stream: Stream) -> Result<Graph> {
        self.end_capture(stream)
    }

    fn capture_abort(&self, _stream: Stream) {
        let mut st = self.state();
        if let Some(cap) = st.capture.take() {
            for p in cap.allocs {
                st.allocs.remove(&p);
            }
        }
    }

    fn graph_launch(&self, graph: Graph, stream: Stream) -> Result<()> {
        let mut st = self.state();
        if !st.graphs.contains_key(&graph.0) {
            bail!("graph {} does not exist", graph.0);
        }
        Self::capture_illegal(&mut st, stream, "launching a graph")?;
        self.enqueue(&mut st, stream, Op::Graph(graph.0))
    }

    fn graph_destroy(&self, graph: Graph) {
        let mut st = self.state();
        if st.graphs.remove(&graph.0).is_some() {
            st.allocs.retain(|_, a| a.graph != Some(graph.0));
        }
    }

    fn range_push(&self, name: &str) {
        self.state().ranges.push(name.to_string());
    }

    fn range_pop(&self) {
        self.state().ranges.pop();
    }

    fn as_emu(&self) -> Option<&EmuDevice> {
        Some(self)
    }

    fn profiler(&self, _on: bool) -> Result<()> {
        self.synchronize()
    }
}

/// The index of `stream` in the device's stream table, or an error naming it.
/// A copy of what the event recorded, or an error for an event that was never created.
fn event_state(st: &State, event: Event) -> Result<EventState> {
    st.events
        .get(event.0 as usize)
        .cloned()
        .ok_or_else(|| anyhow!("event {} does not exist", event.0))
}

fn stream_index(st: &State, stream: Stream) -> Result<usize> {
    let s = stream.0 as usize;
    if s >= st.streams.len() {
        bail!("stream {} does not exist", stream.0);
    }
    Ok(s)
}
