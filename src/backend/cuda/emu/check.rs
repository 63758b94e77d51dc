//! The emulated device's checker: races between operations that no happens-before path
//! orders, and reads of memory nothing wrote.
//!
//! Happens-before is tracked with vector clocks, one component per stream: an operation's
//! clock is its stream's clock when it was issued, after the stream counted it; an event
//! record copies the stream's clock into the event, a wait joins it into the waiting stream,
//! and the host joins the clock of whatever it synchronized with (and every stream joins the
//! host's clock when the host issues work, since that work comes after what the host saw).
//! A happens before B when A's own component is at most B's view of it. Inside a replayed
//! graph the nodes are ordered by the clocks of their capture.
//!
//! Accesses are byte intervals. A kernel's writes are the bytes its mutable arguments'
//! buffers changed (compared before and after), so branches writing disjoint channel slices
//! of one concat buffer do not conflict; a library call's are the regions its descriptors
//! give. A kernel's const argument is taken to read from its address to the end of its
//! buffer (what it can reach); since that over-reaches, a conflict is reported only against
//! writes that changed bytes inside the region. A write that stores the value already there
//! is invisible to the comparison: harmless for the result of this run, and the only kind of
//! race this cannot see.

use anyhow::{bail, Result};
use std::collections::HashMap;

/// A vector clock: per stream, how many of its operations are known to have been issued.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Clock(Vec<u64>);

impl Clock {
    pub fn get(&self, stream: u32) -> u64 {
        self.0.get(stream as usize).copied().unwrap_or(0)
    }
    pub fn tick(&mut self, stream: u32) {
        let s = stream as usize;
        if self.0.len() <= s {
            self.0.resize(s + 1, 0);
        }
        self.0[s] += 1;
    }
    pub fn join(&mut self, other: &Clock) {
        if self.0.len() < other.0.len() {
            self.0.resize(other.0.len(), 0);
        }
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a = (*a).max(*b);
        }
    }
}

/// Who accessed memory: an operation, its stream and clock, and where it sits in a replayed
/// graph.
#[derive(Clone, Debug)]
pub struct Who {
    pub id: u64,
    pub stream: super::Stream,
    pub clock: Clock,
    pub label: String,
    /// Inside a graph launch: the launch's id, the node's stream and clock in the capture.
    graph: Option<(u64, super::Stream, Clock)>,
}

impl Who {
    pub fn op(id: u64, stream: super::Stream, clock: Clock, label: String) -> Who {
        Who { id, stream, clock, label, graph: None }
    }

    /// A node of the graph launch `launch` (this is the launch operation).
    pub fn in_graph(&self, launch: u64, stream: super::Stream, clock: Clock, label: String) -> Who {
        Who {
            id: self.id,
            stream: self.stream,
            clock: self.clock.clone(),
            label: format!("{label} (graph node on captured stream {})", stream.0),
            graph: Some((launch, stream, clock)),
        }
    }

    fn same(&self, other: &Who) -> bool {
        match (&self.graph, &other.graph) {
            (Some((la, sa, ca)), Some((lb, sb, cb))) => la == lb && sa == sb && ca == cb,
            (None, None) => self.id == other.id,
            _ => false,
        }
    }

    /// Whether `self` happens before `other`.
    fn before(&self, other: &Who) -> bool {
        if let (Some((la, sa, ca)), Some((lb, _, cb))) = (&self.graph, &other.graph) {
            if la == lb {
                return ca.get(sa.0) <= cb.get(sa.0);
            }
        }
        self.clock.get(self.stream.0) <= other.clock.get(self.stream.0)
            && !(self.graph.is_some() && other.graph.is_some() && self.id == other.id)
    }

    fn describe(&self) -> String {
        format!("{} on stream {}", self.label, self.stream.0)
    }
}

/// A half-open byte interval [start, end) of device addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interval {
    pub start: u64,
    pub end: u64,
}

impl Interval {
    pub fn new(start: u64, bytes: usize) -> Interval {
        Interval { start, end: start + bytes as u64 }
    }
}

/// The first overlap of two sorted interval lists.
fn overlap(a: &[Interval], b: &[Interval]) -> Option<Interval> {
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        let start = a[i].start.max(b[j].start);
        let end = a[i].end.min(b[j].end);
        if start < end {
            return Some(Interval { start, end });
        }
        if a[i].end <= b[j].end {
            i += 1;
        } else {
            j += 1;
        }
    }
    None
}

/// The elements (of `elem` bytes) where `before` and `after` differ, as runs of addresses from
/// `base`. Whole elements: a written element whose bytes partly equal the poison still counts
/// as written in full.
pub fn differences(base: u64, before: &[u8], after: &[u8], elem: usize) -> Vec<Interval> {
    let mut out: Vec<Interval> = Vec::new();
    let elem = elem.max(1);
    let n = before.len().min(after.len());
    let mut i = 0;
    while i < n {
        // Skip equal 64-byte runs quickly.
        if i + 64 <= n && before[i..i + 64] == after[i..i + 64] {
            i += 64;
            continue;
        }
        let end = (i + elem).min(n);
        if before[i..end] != after[i..end] {
            let at = base + i as u64;
            match out.last_mut() {
                Some(last) if last.end == at => last.end = base + end as u64,
                _ => out.push(Interval { start: at, end: base + end as u64 }),
            }
        }
        i = end;
    }
    out
}

struct Record {
    who: Who,
    write: bool,
    intervals: Vec<Interval>,
}

/// The checker's state: per allocation (by base address), the accesses not yet known to
/// happen before everything that follows, and which bytes were ever written.
pub struct Checker {
    enabled: bool,
    records: HashMap<u64, Vec<Record>>,
    /// Per allocation, one bit per byte: written at least once.
    written: HashMap<u64, Vec<u64>>,
}

impl Checker {
    pub fn new(enabled: bool) -> Checker {
        Checker { enabled, records: HashMap::new(), written: HashMap::new() }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Forgets an allocation (freed, or allocated afresh by a graph node).
    pub fn forget(&mut self, base: u64) {
        self.records.remove(&base);
        self.written.remove(&base);
    }

    /// Drops the records of accesses the host has synchronized with: everything issued from
    /// now on happens after them.
    pub fn settle(&mut self, host: &Clock) {
        for recs in self.records.values_mut() {
            recs.retain(|r| r.who.clock.get(r.who.stream.0) > host.get(r.who.stream.0));
        }
        self.records.retain(|_, r| !r.is_empty());
    }

    /// Records an access and reports a race with any earlier unordered, conflicting one.
    fn access(
        &mut self, who: &Who, base: u64, intervals: Vec<Interval>, write: bool,
    ) -> Result<()> {
        if !self.enabled || intervals.is_empty() {
            return Ok(());
        }
        let recs = self.records.entry(base).or_default();
        for r in recs.iter() {
            if (!r.write && !write) || r.who.same(who) || r.who.before(who) {
                continue;
            }
            if let Some(iv) = overlap(&r.intervals, &intervals) {
                bail!(
                    "race on the buffer at {base:#x} (bytes {}..{} of it): {} by {} and {} by {}, with no event or stream order between them",
                    iv.start - base,
                    iv.end - base,
                    if r.write { "written" } else { "read" },
                    r.who.describe(),
                    if write { "written" } else { "read" },
                    who.describe()
                );
            }
        }
        recs.push(Record { who: who.clone(), write, intervals });
        Ok(())
    }

    fn mark_written(&mut self, base: u64, intervals: &[Interval]) {
        let bits = self.written.entry(base).or_default();
        for iv in intervals {
            for b in (iv.start - base)..(iv.end - base) {
                let (w, bit) = ((b / 64) as usize, b % 64);
                if bits.len() <= w {
                    bits.resize(w + 1, 0);
                }
                bits[w] |= 1 << bit;
            }
        }
    }

    /// The offset (from `base`) of the first byte of [off, off + len) never written.
    fn first_unwritten(&self, base: u64, off: u64, len: u64) -> Option<u64> {
        let bits = self.written.get(&base);
        (off..off + len).find(|&b| {
            let (w, bit) = ((b / 64) as usize, b % 64);
            bits.and_then(|v| v.get(w)).is_none_or(|x| x & (1 << bit) == 0)
        })
    }

    /// Whether any byte of [off, off + len) was ever written.
    fn any_written(&self, base: u64, off: u64, len: u64) -> bool {
        let Some(bits) = self.written.get(&base) else {
            return false;
        };
        (off..off + len).any(|b| {
            let (w, bit) = ((b / 64) as usize, b % 64);
            bits.get(w).is_some_and(|x| x & (1 << bit) != 0)
        })
    }

    /// A write of the whole of [ptr, ptr + bytes) (a library call's output, a copy, a memset).
    pub fn write(&mut self, who: &Who, base: u64, ptr: u64, bytes: usize) -> Result<()> {
        let iv = vec![Interval::new(ptr, bytes)];
        self.mark_written(base, &iv);
        self.access(who, base, iv, true)
    }

    /// A read of all of [ptr, ptr + bytes), every byte of which must have been written.
    pub fn read(&mut self, who: &Who, base: u64, ptr: u64, bytes: usize, what: &str) -> Result<()> {
        if !self.enabled || bytes == 0 {
            return Ok(());
        }
        if let Some(b) = self.first_unwritten(base, ptr - base, bytes as u64) {
            bail!(
                "{} reads {what} ({bytes} bytes at {ptr:#x}), whose byte {} was never written before it: uninitialised memory (it holds the 0xFF poison), or a write not ordered before this read (a missing event wait)",
                who.describe(),
                b - (ptr - base)
            );
        }
        self.access(who, base, vec![Interval::new(ptr, bytes)], false)
    }

    /// A kernel's const argument: it may read anywhere in [ptr, ptr + bytes); an error if
    /// nothing there was ever written.
    pub fn read_reachable(
        &mut self, who: &Who, base: u64, ptr: u64, bytes: usize, what: &str,
    ) -> Result<()> {
        if !self.enabled || bytes == 0 {
            return Ok(());
        }
        if !self.any_written(base, ptr - base, bytes as u64) {
            bail!(
                "{} reads {what}, a buffer of {bytes} bytes at {ptr:#x} that was never written before it: uninitialised memory (it holds the 0xFF poison), or a write not ordered before this read (a missing event wait)",
                who.describe()
            );
        }
        self.access(who, base, vec![Interval::new(ptr, bytes)], false)
    }

    /// A kernel's mutable argument of `elem`-byte elements: the elements that changed between
    /// `before` and `after` (both starting at `ptr`) were written.
    pub fn changed(
        &mut self, who: &Who, base: u64, ptr: u64, (before, after): (&[u8], &[u8]), elem: usize,
    ) -> Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let iv = differences(ptr, before, after, elem);
        self.mark_written(base, &iv);
        self.access(who, base, iv, true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::device::Stream;

    fn who(id: u64, stream: u32, clock: &[u64]) -> Who {
        Who::op(id, Stream(stream), Clock(clock.to_vec()), format!("op{id}"))
    }

    #[test]
    fn differences_are_merged_runs() {
        let before = [0u8; 20];
        let mut after = before;
        after[3] = 1;
        after[4] = 1;
        after[17] = 9;
        let d = differences(100, &before, &after, 1);
        assert_eq!(d, vec![Interval::new(103, 2), Interval::new(117, 1)]);
        // Whole 4-byte elements: [0, 8) and [16, 20).
        let d = differences(100, &before, &after, 4);
        assert_eq!(d, vec![Interval::new(100, 8), Interval::new(116, 4)]);
    }

    #[test]
    fn unordered_conflicting_writes_are_a_race_and_ordered_ones_are_not() {
        let mut c = Checker::new(true);
        // op1 on stream 0 at clock [1]; op2 on stream 1 knowing nothing of stream 0.
        c.write(&who(1, 0, &[1]), 0, 0, 16).unwrap();
        let err = c.write(&who(2, 1, &[0, 1]), 0, 8, 16).unwrap_err().to_string();
        assert!(err.contains("race") && err.contains("op1") && err.contains("op2"), "{err}");
        // op3 on stream 1 after waiting for op1: ordered.
        let mut c = Checker::new(true);
        c.write(&who(1, 0, &[1]), 0, 0, 16).unwrap();
        c.write(&who(3, 1, &[1, 1]), 0, 0, 16).unwrap();
        // Disjoint writes from unordered streams are fine.
        let mut c = Checker::new(true);
        c.write(&who(1, 0, &[1]), 0, 0, 8).unwrap();
        c.write(&who(2, 1, &[0, 1]), 0, 8, 8).unwrap();
    }

    #[test]
    fn reading_unwritten_bytes_is_reported() {
        let mut c = Checker::new(true);
        c.write(&who(1, 0, &[1]), 0, 0, 8).unwrap();
        c.read(&who(2, 0, &[2]), 0, 0, 8, "x").unwrap();
        let err = c.read(&who(3, 0, &[3]), 0, 0, 12, "x").unwrap_err().to_string();
        assert!(err.contains("never written") && err.contains("byte 8"), "{err}");
        let err =
            c.read_reachable(&who(4, 0, &[4]), 64, 64, 32, "argument 1").unwrap_err().to_string();
        assert!(err.contains("argument 1") && err.contains("never written"), "{err}");
    }

    #[test]
    fn settled_records_order_everything_after() {
        let mut c = Checker::new(true);
        c.write(&who(1, 0, &[1]), 0, 0, 16).unwrap();
        c.settle(&Clock(vec![1]));
        // Issued after the host saw op1 finish; its clock on stream 0 may even be lower in
        // this hand-made test: the record is gone.
        c.write(&who(2, 1, &[0, 1]), 0, 0, 16).unwrap();
    }
}
