//! Running one operation on the emulated device: copies and memsets, library calls on the
//! reference, kernels through the registry; every access checked against the allocations and
//! recorded for the checker (and, while recording, for the step profile).

use super::*;

impl EmuDevice {
    /// Runs one operation now; returns the work it did (for a step profile).
    pub(super) fn execute(&self, st: &mut State, op: &Op, who: &Who) -> Result<Traffic> {
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
                Ok(Traffic { written: *bytes as u64, ..nothing })
            }
            Op::Htod { dst, data } => {
                let base = self.region(st, who, *dst, data.len(), "copy host→device")?;
                // SAFETY: as for memset.
                unsafe {
                    std::ptr::copy_nonoverlapping(data.as_ptr(), *dst as *mut u8, data.len())
                };
                st.checker.write(who, base, *dst, data.len())?;
                Ok(Traffic { written: data.len() as u64, host: data.len() as u64, ..nothing })
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
                Ok(Traffic { read: *bytes as u64, written: *bytes as u64, ..nothing })
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
    pub(super) fn bytes_of(&self, st: &State, ptr: u64, what: &str) -> Result<usize> {
        match st.allocs.get(&ptr) {
            Some(a) if a.live => Ok(a.bytes),
            _ => bail!("{what} of {ptr:#x}, which is not a live allocation"),
        }
    }

    /// The live allocation containing [ptr, ptr + bytes), or an error naming `what`.
    pub(super) fn region(
        &self, st: &State, who: &Who, ptr: u64, bytes: usize, what: &str,
    ) -> Result<u64> {
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
    pub(super) fn library(
        &self, st: &mut State, who: &Who, name: &str, regions: &[reference::Region],
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
    pub(super) fn kernel(
        &self, st: &mut State, who: &Who, name: &str, dims: &LaunchDims, args: &[KernelArg],
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
            st.checker.read_reachable(who, base, p, (end - p) as usize, &what)?;
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
            kernel_emu::launch(name, dims.grid, dims.block, dims.shared_bytes, order, &eargs)
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
    pub(super) fn check_args(
        &self, name: &str, dims: LaunchDims, args: &[KernelArg],
    ) -> Result<()> {
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
            bail!("kernel {name} takes {} parameters, {} given", params.len(), args.len());
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
}

/// A library call's traffic: every operand's extent (the workspace left out), and its
/// arithmetic.
pub(super) fn library_work(
    regions: &[reference::Region], (flops, math): (f64, profile::Math),
) -> Traffic {
    let mut w = Traffic { flops, math, ..Traffic::default() };
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

/// Bytes of a kernel parameter's element type, by its C++ name.
pub(super) fn elem_size(elem: &str) -> usize {
    match elem {
        "double" => 8,
        "float" | "int" | "unsigned int" => 4,
        "__half" | "__nv_bfloat16" => 2,
        _ => 1,
    }
}
