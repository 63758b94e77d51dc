//! Device memory of the emulated GPU: host storage with guard bytes on each side (a write past
//! either end changes them) and fresh contents poisoned with 0xFF (NaN in every float type).

/// Bytes of guard on each side of an allocation, and the allocation alignment (cudaMalloc
/// aligns to 256 bytes).
pub(super) const GUARD: usize = 256;
const ALIGN: usize = 256;
const GUARD_BYTE: u8 = 0xA5;
const POISON: u8 = 0xFF;

/// One allocation: its host storage (the device address is a host address inside it).
pub(super) struct Alloc {
    pub(super) storage: Vec<u8>,
    /// Offset of the first user byte in `storage`.
    pub(super) start: usize,
    pub(super) bytes: usize,
    /// False between a graph's free node and its next alloc node.
    pub(super) live: bool,
    /// Allocated inside a graph capture: the graph owns it.
    pub(super) graph: Option<u32>,
}

impl Alloc {
    pub(super) fn new(bytes: usize) -> Alloc {
        let padded = bytes.div_ceil(ALIGN).max(1) * ALIGN;
        let mut storage = vec![GUARD_BYTE; GUARD + padded + GUARD + ALIGN];
        let base = storage.as_ptr() as usize;
        let start = (base + GUARD).next_multiple_of(ALIGN) - base;
        storage[start..start + bytes].fill(POISON);
        Alloc { storage, start, bytes, live: true, graph: None }
    }
    pub(super) fn base(&self) -> u64 {
        self.storage.as_ptr() as u64 + self.start as u64
    }
    pub(super) fn user(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.bytes]
    }
    /// Re-poisons the user bytes (a graph's alloc node runs again).
    pub(super) fn repoison(&mut self) {
        let (s, b) = (self.start, self.bytes);
        self.storage[s..s + b].fill(POISON);
        self.live = true;
    }
    /// The first damaged guard byte, as an offset from the base (negative: before it).
    pub(super) fn damaged_guard(&self) -> Option<i64> {
        let end = self.start + self.bytes;
        if let Some(i) = self.storage[..self.start].iter().rposition(|&b| b != GUARD_BYTE) {
            return Some(i as i64 - self.start as i64);
        }
        self.storage[end..].iter().position(|&b| b != GUARD_BYTE).map(|i| (i + self.bytes) as i64)
    }
}
