//! Convolutions and the linear layer: cuDNN convolutions (fp32 weights, or their 16-bit
//! OHWI working copy in mixed precision) with the bias, and cuBLAS SGEMM; the bias and
//! weight-layout kernels are `cuda/conv.cu`.

// The ops take the arguments `Backend` declares for them, one for one.
#![allow(clippy::too_many_arguments)]

use super::*;

impl Gpu {
    /// The 16-bit working copy in `dt` of `conv`'s fp32 OIHW weight `w`, in OHWI (cuDNN's KRSC,
    /// see `dnn::filter_format`), remade if `w` changed since; 0 when a failure is recorded (its
    /// allocation or an earlier one), so the caller's work is skipped.
    pub(super) fn working_copy(&self, w: &Buf, conv: &Conv2d, dt: DType) -> u64 {
        if self.failed() {
            return 0;
        }
        let mut shadow = w.shadow.lock().unwrap_or_else(|p| p.into_inner());
        let bytes = w.len.max(1) * dt.size();
        if shadow.as_ref().is_none_or(|s| s.bytes() != bytes) {
            match alloc_mem(&self.dev, self.current_stream(), bytes) {
                Ok(s) => *shadow = Some(s),
                Err(e) => {
                    let what = format!("the {} copy of a weight of {} values", dt.suffix(), w.len);
                    self.record_oom(&what, bytes, e);
                    return 0;
                }
            }
            w.shadow_fresh.store(false, Ordering::Release);
        }
        let Some(s) = shadow.as_ref() else {
            return 0;
        };
        let sp = s.ptr();
        if !w.shadow_fresh.load(Ordering::Acquire) {
            let args = [
                Ptr(sp),
                Ptr(self.ptr(w)),
                I32(conv.cout as i32),
                I32(conv.cin as i32),
                I32((conv.k * conv.k) as i32),
            ];
            // Fresh only once the conversion is queued: a skipped one is redone next time.
            let name = typed("weight_oihw_to_ohwi", dt);
            if self.launch(&name, elementwise(w.len), &args) {
                w.shadow_fresh.store(true, Ordering::Release);
            }
        }
        sp
    }

    /// A cuDNN workspace of at least `bytes`, grown (never shrunk) as shapes need.
    pub(super) fn workspace(&self, bytes: usize) -> anyhow::Result<(u64, usize)> {
        let mut ws = self.lane().workspace.lock().unwrap_or_else(|p| p.into_inner());
        if bytes == 0 {
            return Ok((0, 0));
        }
        if ws.as_ref().is_none_or(|w| w.bytes() < bytes) {
            match alloc_mem(&self.dev, self.current_stream(), bytes) {
                Ok(b) => *ws = Some(b),
                Err(e) => {
                    self.record_oom("a cuDNN workspace", bytes, e);
                    anyhow::bail!("no cuDNN workspace");
                }
            }
        }
        let ws = ws.as_ref().expect("allocated above");
        Ok((ws.ptr(), ws.bytes()))
    }

    /// The algorithms of convolving `xs` with `conv` in `dt`, chosen once per shape.
    pub(super) fn algos(&self, xs: Nhwc, conv: &Conv2d, dt: DType) -> anyhow::Result<dnn::Algos> {
        let mut cache = self.algos.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(a) = cache.get(&(xs, *conv, dt)) {
            return Ok(*a);
        }
        let a =
            dnn::algos(&*self.dev, self.current_stream(), xs, conv, dt, self.opts.deterministic)?;
        tracing::debug!(?xs, ?conv, ?dt, measured = a.measured, ?a, "cuDNN convolution algorithms");
        cache.insert((xs, *conv, dt), a);
        Ok(a)
    }

    /// One convolution of direction `dir` on `(x, w, y)` (dx, dw or dy in the backward
    /// directions, as [`ConvCall`] says), with `beta` blending into the output.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn conv(
        &self, what: &str, dir: ConvDirection, (x, w, y): (u64, u64, u64), xs: Nhwc, conv: &Conv2d,
        dt: DType, beta: f32,
    ) {
        if self.failed() {
            return;
        }
        let run = || -> anyhow::Result<()> {
            let a = self.algos(xs, conv, dt)?;
            let (algo, math): (u32, MathType) = match dir {
                ConvDirection::Forward => a.fwd,
                ConvDirection::BackwardData => a.bwd_data,
                ConvDirection::BackwardFilter => a.bwd_filter,
            };
            let (workspace, workspace_bytes) = self.workspace(a.workspace)?;
            let call = ConvCall {
                dir,
                problem: dnn::problem(xs, conv, dt, math),
                algo,
                x,
                w,
                y,
                workspace,
                workspace_bytes,
                alpha: 1.0,
                beta,
            };
            self.dev.dnn(self.current_stream(), &DnnCall::Conv(call))
        };
        if let Err(e) = run() {
            self.record(what, e);
        }
    }

    /// Column-major fp32 `C = A·B (+ C when beta = 1)` through cuBLAS (no TF32: the handle
    /// keeps cuBLAS's default math mode).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sgemm(
        &self, what: &str, (transa, transb): (Transpose, Transpose),
        (m, n, k): (usize, usize, usize), a: u64, lda: usize, b: u64, ldb: usize, beta: f32,
        c: u64, ldc: usize,
    ) {
        if self.failed() {
            return;
        }
        let g = Gemm { transa, transb, m, n, k, a, lda, b, ldb, c, ldc, alpha: 1.0, beta };
        if let Err(e) = self.dev.gemm(self.current_stream(), &g) {
            self.record(&format!("{what} (cuBLAS)"), e);
        }
    }

    /// An fp32 view of `x`: `x` itself, or a converted copy (kept alive by the returned
    /// buffer) for a 16-bit activation.
    pub(super) fn as_f32(&self, x: &Buf) -> (u64, Option<Buf>) {
        if x.dtype == DType::F32 {
            return (self.ptr(x), None);
        }
        let copy = self.alloc(
            &buffer_label("an fp32 copy of the linear head's input", x.len, DType::F32),
            x.len,
            DType::F32,
        );
        let args = [Ptr(self.ptr(&copy)), Ptr(self.ptr(x)), I32(x.len as i32)];
        self.launch(&typed("convert_to_f32", x.dtype), elementwise(x.len), &args);
        (self.ptr(&copy), Some(copy))
    }

    /// db[c] += Σ_pixels dy[p, c] (dy NHWC in any activation type, or the fp32 logits'
    /// gradient), by the project's own reduction kernel on every path: its bits depend only on
    /// the data and the shape, never on timing or on the GPU, which `--deterministic` needs and
    /// cuDNN's bias-gradient reduction does not promise.
    pub(super) fn bias_grad(&self, db: &mut Buf, dy: &Buf, ys: Nhwc) {
        let r = geometry::bias_grad(ys.pixels(), ys.c, self.sm_count());
        let (ws, counters) = self.reduction_buffers(&r);
        let args = [
            Ptr(self.ptr(db)),
            Ptr(ws),
            Ptr(counters),
            Ptr(self.ptr(dy)),
            I32(ys.pixels() as i32),
            I32(ys.c as i32),
            I32(geometry::BIAS_GRAD_TILE_ROWS as i32),
        ];
        self.launch(&typed("bias_grad", dy.dtype), config(&r), &args);
    }
}

impl ConvOps<f32> for Gpu {
    fn conv2d_forward(&self, y: &mut Buf, x: &Buf, w: &Buf, b: &Buf, xs: Nhwc, conv: &Conv2d) {
        let dt = x.dtype;
        let ys = conv.out_shape(xs);
        let wp = if dt == DType::F32 { self.ptr(w) } else { self.working_copy(w, conv, dt) };
        let (xp, yp, bp) = (self.ptr(x), self.ptr(y), self.ptr(b));
        self.conv("conv2d_forward", ConvDirection::Forward, (xp, wp, yp), xs, conv, dt, 0.0);
        if dt == DType::F32 {
            let add = AddTensor {
                a: dnn::channels(ys.c),
                a_ptr: bp,
                c: dnn::nhwc(ys, dt),
                c_ptr: yp,
                alpha: 1.0,
                beta: 1.0,
            };
            self.dnn_call("conv2d_forward bias", DnnCall::AddTensor(add));
        } else {
            // cuDNN's bias add wants the bias in the data type; ours stays fp32.
            let args = [Ptr(yp), Ptr(bp), I32(ys.pixels() as i32), I32(ys.c as i32)];
            self.launch(&typed("bias_add", dt), self.strided(ys.len()), &args);
        }
    }

    fn conv2d_backward(
        &self, dx: Option<&mut Buf>, dw: &mut Buf, db: &mut Buf, dy: &Buf, x: &Buf, w: &Buf,
        xs: Nhwc, conv: &Conv2d,
    ) {
        let dt = dy.dtype;
        let ys = conv.out_shape(xs);
        let dx_ptr = dx.map(|d| self.ptr(d));
        let (xp, dyp) = (self.ptr(x), self.ptr(dy));
        self.bias_grad(db, dy, ys);
        // In fp32 the weight gradient accumulates in place (beta = 1). In mixed precision it
        // comes out of cuDNN in the data type (and the filter layout) of the working copy and
        // is added to the fp32 one below (the bias gradient above is reduced straight into
        // fp32); cuDNN overwrites it (beta = 0), so it needs no zeroing.
        let dw_low = (dt != DType::F32).then(|| {
            let what = buffer_label("a 16-bit weight gradient", conv.weight_len(), dt);
            self.uninit(&what, conv.weight_len(), dt)
        });
        let (dwp, beta) = dw_low.as_ref().map_or((self.ptr(dw), 1.0), |d| (self.ptr(d), 0.0));
        let filter = (xp, dwp, dyp);
        self.conv(
            "conv2d_backward filter",
            ConvDirection::BackwardFilter,
            filter,
            xs,
            conv,
            dt,
            beta,
        );
        if let Some(dxp) = dx_ptr {
            let wp = if dt == DType::F32 { self.ptr(w) } else { self.working_copy(w, conv, dt) };
            let data = (dxp, wp, dyp);
            self.conv("conv2d_backward data", ConvDirection::BackwardData, data, xs, conv, dt, 0.0);
        }
        let Some(dw_low) = dw_low else { return };
        // cuDNN wrote the gradient in the filter layout of the 16-bit path (OHWI); the fp32
        // gradient keeps the master weight's OIHW.
        let args = [
            Ptr(self.ptr(dw)),
            Ptr(self.ptr(&dw_low)),
            I32(conv.cout as i32),
            I32(conv.cin as i32),
            I32((conv.k * conv.k) as i32),
        ];
        let name = typed("add_ohwi_to_oihw", dt);
        self.launch(&name, elementwise(dw.len), &args);
    }

    fn linear_forward(
        &self, y: &mut Buf, x: &Buf, w: &Buf, b: &Buf, n: usize, fin: usize, fout: usize,
    ) {
        // The head is tiny ([N, 256]·[256, 10]) and produces the logits, so it runs in fp32 on
        // every path: a 16-bit input is widened first.
        if !self.expect_f32("linear_forward output", y) || !self.expect_main("linear_forward") {
            return;
        }
        let (xp, _x32) = self.as_f32(x);
        // Row-major y[n, out] = x[n, in]·wᵀ is column-major yᵀ[out, n] = w(in×out)ᵀ · xᵀ(in×n).
        self.sgemm(
            "linear_forward",
            (Transpose::T, Transpose::N),
            (fout, n, fin),
            self.ptr(w),
            fin,
            xp,
            fin,
            0.0,
            self.ptr(y),
            fout,
        );
        let add = AddTensor {
            a: dnn::channels(fout),
            a_ptr: self.ptr(b),
            c: dnn::nhwc(Nhwc::new(n, 1, 1, fout), DType::F32),
            c_ptr: self.ptr(y),
            alpha: 1.0,
            beta: 1.0,
        };
        self.dnn_call("linear_forward bias", DnnCall::AddTensor(add));
    }

    fn linear_backward(
        &self, dx: Option<&mut Buf>, dw: &mut Buf, db: &mut Buf, dy: &Buf, x: &Buf, w: &Buf,
        n: usize, fin: usize, fout: usize,
    ) {
        if !self.expect_f32("linear_backward gradient", dy) || !self.expect_main("linear_backward")
        {
            return;
        }
        let (xp, _x32) = self.as_f32(x);
        // dw[out, in] += dyᵀ·x  ⇔  column-major dwᵀ(in×out) += xᵀ(in×n) · dy(n×out).
        self.sgemm(
            "linear_backward dw",
            (Transpose::N, Transpose::T),
            (fin, fout, n),
            xp,
            fin,
            self.ptr(dy),
            fout,
            1.0,
            self.ptr(dw),
            fin,
        );
        if let Some(dx) = dx {
            // dx[n, in] = dy·w  ⇔  column-major dxᵀ(in×n) = wᵀ(in×out) · dyᵀ(out×n), in fp32,
            // then narrowed to the activation type.
            let dx32 = (dx.dtype != DType::F32).then(|| {
                let what =
                    buffer_label("the fp32 input gradient of the linear head", dx.len, DType::F32);
                self.alloc(&what, dx.len, DType::F32)
            });
            let target = dx32.as_ref().map_or(self.ptr(dx), |b| self.ptr(b));
            self.sgemm(
                "linear_backward dx",
                (Transpose::N, Transpose::N),
                (fin, n, fout),
                self.ptr(w),
                fin,
                self.ptr(dy),
                fout,
                0.0,
                target,
                fin,
            );
            if let Some(dx32) = &dx32 {
                let args = [Ptr(self.ptr(dx)), Ptr(self.ptr(dx32)), I32(dx.len as i32)];
                self.launch(&typed("convert_from_f32", dx.dtype), elementwise(dx.len), &args);
            }
        }
        self.bias_grad(db, dy, Nhwc::new(n, 1, 1, fout));
    }
}
