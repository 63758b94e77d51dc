//! The emulated GPU (`--device emu`): the [`Device`] of the seam, on the CPU.
//!
//! - **Kernels** are the `cuda/*.cu` sources compiled for the host (the `kernel-emu` crate),
//!   launched by name with the argument list the backend built, checked against the
//!   signature each kernel registered from its own source.
//! - **cuDNN and cuBLAS** calls are executed by [`reference`], which honours every field of
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
pub mod profile;
pub mod reference;

use super::device::{
    AlgoPerf, ConvDirection, ConvProblem, Device, DeviceInfo, DnnCall, Event, Gemm, Graph,
    KernelArg, LaunchDims, Stream,
};
use anyhow::{anyhow, bail, Result};
use check::{Checker, Clock, Who};
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
        EmuOptions {
            seed: 1,
            check: true,
        }
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
    TOTAL
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_default()
}

/// Every kernel the emulation can launch: all `__global__` functions of `cuda/*.cu`.
pub fn kernel_names() -> Vec<String> {
    kernel_emu::kernels()
        .iter()
        .map(|k| k.name.to_string())
        .collect()
}

/// Counts one run of `name` in `pick(counters)` of the device and of the process.
fn count(own: &mut Counters, pick: fn(&mut Counters) -> &mut BTreeMap<String, u64>, name: &str) {
    *pick(own).entry(name.to_string()).or_default() += 1;
    let mut total = TOTAL.lock().unwrap_or_else(|p| p.into_inner());
    *pick(total.get_or_insert_with(Counters::default))
        .entry(name.to_string())
        .or_default() += 1;
}

/// Bytes of guard on each side of an allocation, and the allocation alignment (cudaMalloc
/// aligns to 256 bytes).
const GUARD: usize = 256;
const ALIGN: usize = 256;
const GUARD_BYTE: u8 = 0xA5;
const POISON: u8 = 0xFF;

/// One allocation: its host storage (the device address is a host address inside it).
struct Alloc {
    storage: Vec<u8>,
    /// Offset of the first user byte in `storage`.
    start: usize,
    bytes: usize,
    /// False between a graph's free node and its next alloc node.
    live: bool,
    /// Allocated inside a graph capture: the graph owns it.
    graph: Option<u32>,
}

impl Alloc {
    fn new(bytes: usize) -> Alloc {
        let padded = bytes.div_ceil(ALIGN).max(1) * ALIGN;
        let mut storage = vec![GUARD_BYTE; GUARD + padded + GUARD + ALIGN];
        let base = storage.as_ptr() as usize;
        let start = (base + GUARD).next_multiple_of(ALIGN) - base;
        storage[start..start + bytes].fill(POISON);
        Alloc {
            storage,
            start,
            bytes,
            live: true,
            graph: None,
        }
    }
    fn base(&self) -> u64 {
        self.storage.as_ptr() as u64 + self.start as u64
    }
    fn user(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.bytes]
    }
    /// Re-poisons the user bytes (a graph's alloc node runs again).
    fn repoison(&mut self) {
        let (s, b) = (self.start, self.bytes);
        self.storage[s..s + b].fill(POISON);
        self.live = true;
    }
    /// The first damaged guard byte, as an offset from the base (negative: before it).
    fn damaged_guard(&self) -> Option<i64> {
        let end = self.start + self.bytes;
        if let Some(i) = self.storage[..self.start]
            .iter()
            .rposition(|&b| b != GUARD_BYTE)
        {
            return Some(i as i64 - self.start as i64);
        }
        self.storage[end..]
            .iter()
            .position(|&b| b != GUARD_BYTE)
            .map(|i| (i + self.bytes) as i64)
    }
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

/// A node of a graph being captured or replayed.
#[derive(Clone, Debug)]
struct Node {
    op: Op,
    stream: Stream,
    /// Nodes that must run first (stream order and event waits inside the capture).
    deps: Vec<usize>,
    /// The node's clock inside the graph (over the captured streams).
    clock: Clock,
}

#[derive(Clone, Debug, Default)]
struct GraphState {
    nodes: Vec<Node>,
}

/// A capture in progress.
struct Capture {
    origin: Stream,
    graph: GraphState,
    /// Streams in the capture and the last node issued on each.
    last: HashMap<Stream, Option<usize>>,
    /// Per stream, the event nodes it must wait for before its next node.
    pending: HashMap<Stream, Vec<usize>>,
    clocks: HashMap<Stream, Clock>,
    /// The first capture-illegal call, which fails `capture_end`.
    invalid: Option<String>,
    allocs: Vec<u64>,
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
        let kernels = kernel_emu::kernels()
            .iter()
            .map(|k| (k.name.to_string(), k.params.clone()))
            .collect();
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
        self.state()
            .profile
            .take()
            .map(Recorder::finish)
            .unwrap_or_default()
    }

    /// Queues `op` on `stream` (or records it into the capture).
    fn enqueue(&self, st: &mut State, stream: Stream, op: Op) -> Result<()> {
        let s = stream.0 as usize;
        if s >= st.streams.len() {
            bail!("stream {} does not exist", stream.0);
        }
        if let Some(cap) = st.capture.as_mut() {
            if cap.last.contains_key(&stream) {
                let mut deps: Vec<usize> = cap.last[&stream].into_iter().collect();
                deps.extend(cap.pending.remove(&stream).unwrap_or_default());
                let clock = cap.clocks.entry(stream).or_default();
                clock.tick(stream.0);
                let clock = clock.clone();
                cap.graph.nodes.push(Node {
                    op,
                    stream,
                    deps,
                    clock,
                });
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
        st.streams[s].push_back(Queued {
            id,
            stream,
            op,
            clock,
        });
        Ok(())
    }

    /// Whether `stream` is being captured.
    fn capturing(st: &State, stream: Stream) -> bool {
        st.capture
            .as_ref()
            .is_some_and(|c| c.last.contains_key(&stream))
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

    /// Runs one operation now; returns the work it did (for a step profile).
    fn execute(&self, st: &mut State, op: &Op, who: &Who) -> Result<Traffic> {
        let nothing = Traffic::default();
        match op {
            Op::Record | Op::Wait(_) => Ok(nothing),
            Op::Alloc { ptr } => {
                let a = st
                    .allocs
                    .get_mut(ptr)
                    .ok_or_else(|| anyhow!("allocation {ptr:#x} vanished"))?;
                if a.graph.is_some() {
                    a.repoison();
                }
                st.checker.forget(*ptr);
                Ok(nothing)
            }
            Op::Free { ptr } => {
                let bytes = self.bytes_of(st, *ptr, "free")?;
                // Freeing is a write for ordering: no other stream may still use the memory.
                st.checker.write(who, *ptr, *ptr, bytes)?;
                let graph_owned = st.allocs.get(ptr).is_some_and(|a| a.graph.is_some());
                if graph_owned {
                    if let Some(a) = st.allocs.get_mut(ptr) {
                        a.live = false;
                    }
                } else {
                    st.allocs.remove(ptr);
                }
                st.checker.forget(*ptr);
                Ok(nothing)
            }
            Op::Memset { ptr, value, bytes } => {
                let base = self.region(st, who, *ptr, *bytes, "memset")?;
                // SAFETY: the region lies inside a live allocation (checked above).
                unsafe { std::ptr::write_bytes(*ptr as *mut u8, *value, *bytes) };
                st.checker.write(who, base, *ptr, *bytes)?;
                Ok(Traffic {
                    written: *bytes as u64,
                    ..nothing
                })
            }
            Op::Htod { dst, data } => {
                let base = self.region(st, who, *dst, data.len(), "copy host→device")?;
                // SAFETY: as for memset.
                unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), *dst as *mut u8, data.len())
                };
                st.checker.write(who, base, *dst, data.len())?;
                Ok(Traffic {
                    written: data.len() as u64,
                    host: data.len() as u64,
                    ..nothing
                })
            }
            Op::Dtod { dst, src, bytes } => {
                let sbase = self.region(st, who, *src, *bytes, "copy device→device (source)")?;
                let dbase =
                    self.region(st, who, *dst, *bytes, "copy device→device (destination)")?;
                st.checker.read(who, sbase, *src, *bytes, "its source")?;
                // SAFETY: both regions are inside live allocations; cudaMemcpy does not allow
                // overlap either (copy handles it anyway).
                unsafe { std::ptr::copy(*src as *const u8, *dst as *mut u8, *bytes) };
                st.checker.write(who, dbase, *dst, *bytes)?;
                Ok(Traffic {
                    read: *bytes as u64,
                    written: *bytes as u64,
                    ..nothing
                })
            }
            Op::Dnn(call) => {
                reference::validate_dnn(call)?;
                let regions = reference::dnn_regions(call);
                let work = library_work(&regions, profile::dnn_flops(call));
                self.library(st, who, call.name(), &regions, || {
                    // SAFETY: every region was checked to lie in a live allocation.
                    unsafe { reference::run_dnn(call) }
                })?;
                Ok(work)
            }
            Op::Gemm(g) => {
                reference::validate_gemm(g)?;
                let regions = reference::gemm_regions(g);
                let work = library_work(&regions, profile::gemm_flops(g));
                self.library(st, who, "cublasSgemm", &regions, || {
                    // SAFETY: as above.
                    unsafe { reference::run_gemm(g) }
                })?;
                Ok(work)
            }
            Op::Launch { name, dims, args } => self.kernel(st, who, name, dims, args),
            Op::Graph(g) => {
                self.replay(st, *g, who)?;
                Ok(nothing)
            }
        }
    }

    /// Bytes of the allocation that starts at `ptr`.
    fn bytes_of(&self, st: &State, ptr: u64, what: &str) -> Result<usize> {
        match st.allocs.get(&ptr) {
            Some(a) if a.live => Ok(a.bytes),
            _ => bail!("{what} of {ptr:#x}, which is not a live allocation"),
        }
    }

    /// The live allocation containing [ptr, ptr + bytes), or an error naming `what`.
    fn region(&self, st: &State, who: &Who, ptr: u64, bytes: usize, what: &str) -> Result<u64> {
        let found = st.allocs.range(..=ptr).next_back();
        match found {
            Some((&base, a)) if a.live && ptr + bytes as u64 <= base + a.bytes as u64 => Ok(base),
            Some((&base, a)) if ptr < base + a.bytes as u64 + GUARD as u64 => bail!(
                "{}: {what} [{ptr:#x}, +{bytes}) runs past the end of its buffer ({} bytes at {base:#x}) by {} bytes{}",
                who.label,
                a.bytes,
                ptr + bytes as u64 - (base + a.bytes as u64),
                if a.live { "" } else { " (and the buffer was freed)" }
            ),
            _ => bail!(
                "{}: {what} at {ptr:#x} is outside every live allocation (freed, or never allocated)",
                who.label
            ),
        }
    }

    /// Runs a library call after checking its regions; records its accesses.
    fn library(
        &self,
        st: &mut State,
        who: &Who,
        name: &str,
        regions: &[reference::Region],
        run: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let mut bases = Vec::with_capacity(regions.len());
        for r in regions {
            let base = self.region(st, who, r.ptr, r.bytes, r.what)?;
            if matches!(r.access, reference::Access::Read) {
                st.checker.read(who, base, r.ptr, r.bytes, r.what)?;
            }
            bases.push(base);
        }
        run().map_err(|e| anyhow!("{name}: {e:#}"))?;
        for (r, base) in regions.iter().zip(bases) {
            if !matches!(r.access, reference::Access::Read) {
                st.checker.write(who, base, r.ptr, r.bytes)?;
            }
        }
        count(&mut st.counters, |c| &mut c.library, name);
        Ok(())
    }

    /// Runs a kernel: its pointer arguments must lie in live allocations; writes are found by
    /// comparing the mutable buffers before and after; guards are checked afterwards.
    fn kernel(
        &self,
        st: &mut State,
        who: &Who,
        name: &str,
        dims: &LaunchDims,
        args: &[KernelArg],
    ) -> Result<Traffic> {
        let params = self
            .kernels
            .get(name)
            .ok_or_else(|| anyhow!("kernel {name} does not exist in cuda/*.cu"))?;
        // The buffers each pointer argument lies in.
        let mut written: Vec<(u64, u64, u64, usize, Vec<u8>)> = Vec::new();
        let mut touched: Vec<u64> = Vec::new();
        // Per const argument: its element size and the bytes it can reach.
        let mut reads: Vec<(usize, u64)> = Vec::new();
        let compare = st.checker.enabled() || st.profile.is_some();
        for (i, a) in args.iter().enumerate() {
            let KernelArg::Ptr(p) = *a else { continue };
            if p == 0 {
                continue;
            }
            let base = self
                .region(st, who, p, 0, &format!("pointer argument {i}"))
                .map_err(|e| anyhow!("{e}"))?;
            let a = &st.allocs[&base];
            touched.push(base);
            let end = base + a.bytes as u64;
            match params.get(i) {
                Some(kernel_emu::Param::MutPtr { elem }) => {
                    if compare {
                        let off = (p - base) as usize;
                        written.push((base, p, end, elem_size(elem), a.user()[off..].to_vec()));
                    }
                    continue;
                }
                Some(kernel_emu::Param::ConstPtr { elem }) => {
                    reads.push((elem_size(elem), end - p))
                }
                _ => {}
            }
            let what = format!("its argument {i}");
            st.checker
                .read_reachable(who, base, p, (end - p) as usize, &what)?;
        }
        let eargs: Vec<kernel_emu::Arg> = args
            .iter()
            .map(|a| match *a {
                KernelArg::Ptr(p) => kernel_emu::Arg::Ptr(p),
                KernelArg::I32(v) => kernel_emu::Arg::I32(v),
                KernelArg::F32(v) => kernel_emu::Arg::F32(v),
            })
            .collect();
        st.launches += 1;
        let order = if self.opts.seed == 0 {
            0
        } else {
            let mut s = self.opts.seed ^ st.launches.wrapping_mul(0x2545_f491_4f6c_dd1d);
            splitmix(&mut s) | 1
        };
        // SAFETY: every non-null pointer argument lies in a live allocation (checked above);
        // how far the kernel reads past it is the checker's business (guards, poison).
        unsafe {
            kernel_emu::launch(
                name,
                dims.grid,
                dims.block,
                dims.shared_bytes,
                order,
                &eargs,
            )
        }
        .map_err(|e| anyhow!("{}: {e}", who.label))?;
        for base in &touched {
            if let Some(off) = st.allocs[base].damaged_guard() {
                bail!(
                    "{}: wrote outside its buffer ({} bytes at {base:#x}): the byte at offset {off} was changed",
                    who.label,
                    st.allocs[base].bytes
                );
            }
        }
        let mut work = Traffic::default();
        // The most elements any mutable argument had written.
        let mut elements = 0u64;
        for (base, p, end, elem, before) in written {
            // SAFETY: [p, end) is inside a live allocation.
            let after = unsafe { std::slice::from_raw_parts(p as *const u8, (end - p) as usize) };
            if st.profile.is_some() {
                let bytes: u64 = check::differences(p, &before, after, elem)
                    .iter()
                    .map(|iv| iv.end - iv.start)
                    .sum();
                work.written += bytes;
                elements = elements.max(bytes / elem as u64);
            }
            st.checker.changed(who, base, p, (&before, after), elem)?;
        }
        // See `profile`: a const argument reads at most what it reaches and, in every project
        // kernel but the reductions, as many elements as the launch writes.
        for (elem, reach) in reads {
            work.reach += reach;
            work.read += reach.min(elements * elem as u64);
        }
        count(&mut st.counters, |c| &mut c.kernels, name);
        Ok(work)
    }

    /// Checks a launch against the kernel's signature (as its source declares it) when it is
    /// issued, so the error points at the call that built it.
    fn check_args(&self, name: &str, dims: LaunchDims, args: &[KernelArg]) -> Result<()> {
        let Some(params) = self.kernels.get(name) else {
            let mut near: Vec<&String> = self
                .kernels
                .keys()
                .filter(|k| k.starts_with(name.split('_').next().unwrap_or(name)))
                .collect();
            near.sort();
            bail!("kernel {name} is not in cuda/*.cu (similar: {near:?})");
        };
        if params.len() != args.len() {
            bail!(
                "kernel {name} takes {} parameters, {} given",
                params.len(),
                args.len()
            );
        }
        for (i, (p, a)) in params.iter().zip(args).enumerate() {
            let ok = match p {
                kernel_emu::Param::MutPtr { .. } | kernel_emu::Param::ConstPtr { .. } => {
                    matches!(a, KernelArg::Ptr(_))
                }
                kernel_emu::Param::Int => matches!(a, KernelArg::I32(_)),
                kernel_emu::Param::Float => matches!(a, KernelArg::F32(_)),
            };
            if !ok {
                bail!("kernel {name}: parameter {i} is {p:?}, given {a:?}");
            }
        }
        let threads: u64 = dims.block.iter().map(|&b| b as u64).product();
        if dims.grid.contains(&0) || dims.block.contains(&0) || threads > 1024 {
            bail!(
                "kernel {name}: invalid launch grid {:?} block {:?} (cudaErrorInvalidConfiguration)",
                dims.grid,
                dims.block
            );
        }
        Ok(())
    }

    /// Replays graph `g` as one operation of the stream it was launched on: its nodes run in
    /// an order the capture's edges allow; inside it, the nodes' own clocks order them.
    fn replay(&self, st: &mut State, g: u32, outer: &Who) -> Result<()> {
        let graph = st
            .graphs
            .get(&g)
            .cloned()
            .ok_or_else(|| anyhow!("graph {g} does not exist"))?;
        let n = graph.nodes.len();
        let mut remaining: Vec<usize> = graph.nodes.iter().map(|nd| nd.deps.len()).collect();
        let mut users: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (i, nd) in graph.nodes.iter().enumerate() {
            for &d in &nd.deps {
                users[d].push(i);
            }
        }
        let mut ready: Vec<usize> = (0..n).filter(|&i| remaining[i] == 0).collect();
        let launch_id = st.next_id;
        st.next_id += 1;
        // For a step profile: each node's profile node, and what the entry nodes wait for.
        let entry = st
            .profile
            .as_ref()
            .and_then(|p| p.graph_entry(outer.stream.0));
        let mut profiled: Vec<usize> = vec![usize::MAX; n];
        while !ready.is_empty() {
            let k = if self.opts.seed == 0 {
                0
            } else {
                (splitmix(&mut st.rng) % ready.len() as u64) as usize
            };
            let i = ready.swap_remove(k);
            let nd = &graph.nodes[i];
            let who = outer.in_graph(launch_id, nd.stream, nd.clock.clone(), nd.op.label());
            let work = self.execute(st, &nd.op, &who)?;
            if let Some(p) = st.profile.as_mut() {
                let deps = if nd.deps.is_empty() {
                    entry.into_iter().collect()
                } else {
                    nd.deps.iter().map(|&d| profiled[d]).collect()
                };
                profiled[i] = p.node(nd.stream.0, nd.op.profile_name(), work, deps);
            }
            for &u in &users[i] {
                remaining[u] -= 1;
                if remaining[u] == 0 {
                    ready.push(u);
                }
            }
        }
        if let Some(p) = st.profile.as_mut() {
            p.graph_exit(outer.id, outer.stream.0, profiled);
        }
        Ok(())
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
            st.events[e] = EventState {
                op: None,
                clock,
                captured: node.or(Some(usize::MAX)),
            };
            return Ok(());
        }
        self.enqueue(&mut st, stream, Op::Record)?;
        let q = st.streams[stream.0 as usize]
            .back()
            .expect("just queued")
            .clone();
        st.events[e] = EventState {
            op: Some(q.id),
            clock: q.clock,
            captured: None,
        };
        Ok(())
    }

    fn stream_wait(&self, stream: Stream, event: Event) -> Result<()> {
        let mut st = self.state();
        let ev = st
            .events
            .get(event.0 as usize)
            .cloned()
            .ok_or_else(|| anyhow!("event {} does not exist", event.0))?;
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
        let s = stream.0 as usize;
        if s >= st.streams.len() {
            bail!("stream {} does not exist", stream.0);
        }
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
        let ev = st
            .events
            .get(event.0 as usize)
            .cloned()
            .ok_or_else(|| anyhow!("event {} does not exist", event.0))?;
        let Some(id) = ev.op else { return Ok(true) };
        // Work runs when the host looks: the event's point is reached now.
        self.run(&mut st, &|s| s.done.contains(&id))?;
        st.host.join(&ev.clock);
        Ok(true)
    }

    fn stream_synchronize(&self, stream: Stream) -> Result<()> {
        let mut st = self.state();
        Self::capture_illegal(&mut st, stream, "a stream synchronization")?;
        let s = stream.0 as usize;
        if s >= st.streams.len() {
            bail!("stream {} does not exist", stream.0);
        }
        self.run(&mut st, &|st| st.streams[s].is_empty())?;
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
        self.enqueue(
            &mut st,
            stream,
            Op::Htod {
                dst,
                data: src.to_vec(),
            },
        )
    }

    fn dtoh(&self, stream: Stream, dst: &mut [u8], src: u64) -> Result<()> {
        let mut st = self.state();
        Self::capture_illegal(&mut st, stream, "a blocking copy to the host")?;
        let s = stream.0 as usize;
        if s >= st.streams.len() {
            bail!("stream {} does not exist", stream.0);
        }
        self.run(&mut st, &|st| st.streams[s].is_empty())?;
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
        &self,
        stream: Stream,
        name: &str,
        dims: LaunchDims,
        args: &[KernelArg],
    ) -> Result<()> {
        self.check_args(name, dims, args)?;
        let mut st = self.state();
        self.enqueue(
            &mut st,
            stream,
            Op::Launch {
                name: name.to_string(),
                dims,
                args: args.to_vec(),
            },
        )
    }

    fn conv_algorithms(
        &self,
        _stream: Stream,
        problem: &ConvProblem,
        dir: ConvDirection,
        measure: bool,
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

    fn capture_begin(&self, stream: Stream) -> Result<()> {
        let mut st = self.state();
        if st.capture.is_some() {
            bail!("a CUDA graph capture is already open");
        }
        if stream.0 as usize >= st.streams.len() {
            bail!("stream {} does not exist", stream.0);
        }
        let mut last = HashMap::new();
        last.insert(stream, None);
        st.capture = Some(Capture {
            origin: stream,
            graph: GraphState::default(),
            last,
            pending: HashMap::new(),
            clocks: HashMap::new(),
            invalid: None,
            allocs: Vec::new(),
        });
        Ok(())
    }

    fn capture_end(&self, stream: Stream) -> Result<Graph> {
        let mut st = self.state();
        let Some(cap) = st.capture.take() else {
            bail!("no CUDA graph capture is open");
        };
        if cap.origin != stream {
            bail!(
                "the capture began on stream {} and cannot end on stream {} (cudaErrorStreamCaptureUnmatched)",
                cap.origin.0,
                stream.0
            );
        }
        if let Some(why) = cap.invalid {
            bail!("the CUDA graph capture was invalidated: {why}");
        }
        // Every stream pulled into the capture must have joined back into the origin: its
        // last node must be an ancestor of the origin's last node.
        let graph = cap.graph;
        // Where the origin stream ends: its last node, and the nodes it waited for after that
        // (a wait with no work after it still joins, as cudaStreamEndCapture sees it).
        let mut ends: Vec<usize> = cap
            .last
            .get(&stream)
            .copied()
            .flatten()
            .into_iter()
            .collect();
        ends.extend(cap.pending.get(&stream).into_iter().flatten().copied());
        let mut ancestors = vec![false; graph.nodes.len()];
        {
            let mut stack = ends;
            while let Some(i) = stack.pop() {
                if !ancestors[i] {
                    ancestors[i] = true;
                    stack.extend(graph.nodes[i].deps.iter().copied());
                }
            }
        }
        for (s, last) in &cap.last {
            if let Some(l) = last {
                if !ancestors[*l] {
                    bail!(
                        "stream {} was pulled into the capture and not joined back into stream {} before it ended (cudaErrorStreamCaptureUnjoined)",
                        s.0,
                        stream.0
                    );
                }
            }
        }
        let id = st.next_graph;
        st.next_graph += 1;
        for p in &cap.allocs {
            if let Some(a) = st.allocs.get_mut(p) {
                a.graph = Some(id);
            }
        }
        st.graphs.insert(id, graph);
        Ok(Graph(id))
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

/// Bytes of a kernel parameter's element type, by its C++ name.
/// A library call's traffic: every operand's extent (the workspace left out), and its
/// arithmetic.
fn library_work(regions: &[reference::Region], (flops, math): (f64, profile::Math)) -> Traffic {
    let mut w = Traffic {
        flops,
        math,
        ..Traffic::default()
    };
    for r in regions.iter().filter(|r| r.what != "workspace") {
        let bytes = r.bytes as u64;
        match r.access {
            reference::Access::Read => w.read += bytes,
            reference::Access::Write => w.written += bytes,
            reference::Access::ReadWrite => {
                w.read += bytes;
                w.written += bytes;
            }
        }
    }
    w
}

fn elem_size(elem: &str) -> usize {
    match elem {
        "double" => 8,
        "float" | "int" | "unsigned int" => 4,
        "__half" | "__nv_bfloat16" => 2,
        _ => 1,
    }
}
