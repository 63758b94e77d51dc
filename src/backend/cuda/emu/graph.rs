//! CUDA graphs on the emulated device: a capture records nodes with the dependencies of their
//! streams and events instead of running them; ending it checks that every stream joined back
//! (as `cudaStreamEndCapture`); a replay runs the nodes in an order the edges allow.

use super::*;

/// A node of a graph being captured or replayed.
#[derive(Clone, Debug)]
pub(super) struct Node {
    pub(super) op: Op,
    pub(super) stream: Stream,
    /// Nodes that must run first (stream order and event waits inside the capture).
    pub(super) deps: Vec<usize>,
    /// The node's clock inside the graph (over the captured streams).
    pub(super) clock: Clock,
}

#[derive(Clone, Debug, Default)]
pub(super) struct GraphState {
    pub(super) nodes: Vec<Node>,
}

/// A capture in progress.
pub(super) struct Capture {
    pub(super) origin: Stream,
    pub(super) graph: GraphState,
    /// Streams in the capture and the last node issued on each.
    pub(super) last: HashMap<Stream, Option<usize>>,
    /// Per stream, the event nodes it must wait for before its next node.
    pub(super) pending: HashMap<Stream, Vec<usize>>,
    pub(super) clocks: HashMap<Stream, Clock>,
    /// The first capture-illegal call, which fails `capture_end`.
    pub(super) invalid: Option<String>,
    pub(super) allocs: Vec<u64>,
}

impl EmuDevice {
    pub(super) fn begin_capture(&self, stream: Stream) -> Result<()> {
        let mut st = self.state();
        if st.capture.is_some() {
            bail!("a CUDA graph capture is already open");
        }
        stream_index(&st, stream)?;
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

    pub(super) fn end_capture(&self, stream: Stream) -> Result<Graph> {
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
        let mut ends: Vec<usize> = cap.last.get(&stream).copied().flatten().into_iter().collect();
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

    /// Replays graph `g` as one operation of the stream it was launched on: its nodes run in
    /// an order the capture's edges allow; inside it, the nodes' own clocks order them.
    pub(super) fn replay(&self, st: &mut State, g: u32, outer: &Who) -> Result<()> {
        let graph =
            st.graphs.get(&g).cloned().ok_or_else(|| anyhow!("graph {g} does not exist"))?;
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
        let entry = st.profile.as_ref().and_then(|p| p.graph_entry(outer.stream.0));
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
