//! `Backend<f32>` for [`Gpu`]: each op is a cuDNN or cuBLAS call or a kernel of `cuda/`.

use super::dnn::{ConvPtrs, Pooling};
use super::Gpu;
use crate::backend::{Backend, BatchNormCfg, Conv2d, MaxPool2d, Nhwc, Sgd};
use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};
use std::ffi::c_void;

type Buf = CudaSlice<f32>;

/// A kernel parameter: a device address (0 for null), an `int` or a `float`.
#[derive(Clone, Copy)]
enum Arg {
    P(u64),
    I(i32),
    F(f32),
}
use Arg::{F, I, P};

/// Threads per block of the element-wise kernels.
const BLOCK: u32 = 256;

/// A grid-stride launch over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: ((n as u32).div_ceil(BLOCK).clamp(1, 4096), 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl Gpu {
    /// The raw device address of a buffer, for cuDNN calls and kernel arguments. Work is
    /// ordered on the one stream, so no event is needed.
    fn ptr(&self, b: &Buf) -> u64 {
        let (p, _sync) = b.device_ptr(&self.stream);
        p
    }

    fn vptr(&self, b: &Buf) -> *mut c_void {
        self.ptr(b) as *mut c_void
    }

    /// A cuDNN workspace of at least `bytes`, grown (never shrunk) as shapes need.
    fn workspace(&self, bytes: usize) -> (u64, usize) {
        let mut ws = self.workspace.lock().unwrap_or_else(|p| p.into_inner());
        if ws.len() < bytes {
            match self.stream.alloc_zeros::<u8>(bytes) {
                Ok(b) => *ws = b,
                Err(e) => self.record(
                    &format!("out of GPU memory for a {bytes}-byte cuDNN workspace"),
                    e,
                ),
            }
        }
        let (p, _sync) = ws.device_ptr(&self.stream);
        (p, ws.len())
    }

    /// Launches kernel `name` with its parameters in order.
    fn launch(&self, name: &str, cfg: LaunchConfig, args: &[Arg]) {
        let mut b = self.stream.launch_builder(self.func(name));
        for a in args {
            match a {
                Arg::P(v) => b.arg(v),
                Arg::I(v) => b.arg(v),
                Arg::F(v) => b.arg(v),
            };
        }
        // SAFETY: each caller passes the kernel's exact parameter list (pointers to live
        // buffers of the sizes the kernel reads, then scalars), as documented in cuda/.
        if let Err(e) = unsafe { b.launch(cfg) } {
            self.record(&format!("launching {name}"), e);
        }
    }

    fn dnn_call(&self, what: &str, f: impl FnOnce(&mut super::dnn::Dnn) -> anyhow::Result<()>) {
        let mut d = self.dnn.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = f(&mut d) {
            self.record(what, e);
        }
    }
}

impl Backend<f32> for Gpu {
    type Buf = Buf;

    fn zeros(&self, len: usize) -> Buf {
        match self.stream.alloc_zeros::<f32>(len.max(1)) {
            Ok(b) => b,
            Err(e) => {
                self.record(
                    &format!(
                        "out of GPU memory allocating {} MiB; use a smaller --batch-size",
                        (len * 4) >> 20
                    ),
                    e,
                );
                // A one-element stand-in keeps the op going; `status` reports the failure.
                self.stream
                    .alloc_zeros::<f32>(1)
                    .expect("a 4-byte allocation")
            }
        }
    }

    fn upload(&self, data: &[f32]) -> Buf {
        if data.is_empty() {
            return self.zeros(0);
        }
        match self.stream.clone_htod(data) {
            Ok(b) => b,
            Err(e) => {
                self.record("copying to the GPU", e);
                self.zeros(0)
            }
        }
    }

    fn download(&self, buf: &Buf) -> Vec<f32> {
        self.stream.clone_dtoh(buf).unwrap_or_else(|e| {
            self.record("copying from the GPU", e);
            vec![f32::NAN; buf.len()]
        })
    }

    fn fill_zero(&self, buf: &mut Buf) {
        if let Err(e) = self.stream.memset_zeros(buf) {
            self.record("memset", e);
        }
    }

    fn status(&self) -> anyhow::Result<()> {
        self.take_error()
    }

    fn conv2d_forward(&self, y: &mut Buf, x: &Buf, w: &Buf, b: &Buf, xs: Nhwc, conv: &Conv2d) {
        let ys = conv.out_shape(xs);
        self.dnn_call("conv2d_forward", |d| {
            let (_, _, _, need) = d.algos(xs, conv)?;
            let (ws, ws_len) = self.workspace(need);
            let p = ConvPtrs {
                x: self.vptr(x),
                w: self.vptr(w),
                y: self.vptr(y),
                workspace: ws as *mut c_void,
            };
            // SAFETY: buffers sized by the network for these shapes, on the handle's stream.
            unsafe {
                d.conv_forward(&p, ws_len, xs, conv)?;
                d.add_bias(p.y, self.vptr(b), ys)
            }
        });
    }

    fn conv2d_backward(
        &self,
        dx: Option<&mut Buf>,
        dw: &mut Buf,
        db: &mut Buf,
        dy: &Buf,
        x: &Buf,
        w: &Buf,
        xs: Nhwc,
        conv: &Conv2d,
    ) {
        let ys = conv.out_shape(xs);
        let dx_ptr = dx.map(|d| self.vptr(d));
        self.dnn_call("conv2d_backward", |d| {
            let (_, _, _, need) = d.algos(xs, conv)?;
            let (ws, ws_len) = self.workspace(need);
            // SAFETY: as in conv2d_forward.
            unsafe {
                d.bias_grad(self.vptr(db), self.vptr(dy), ys)?;
                let filter = ConvPtrs {
                    x: self.vptr(x),
                    w: self.vptr(dw),
                    y: self.vptr(dy),
                    workspace: ws as *mut c_void,
                };
                d.conv_backward_filter(&filter, ws_len, xs, conv)?;
                if let Some(dxp) = dx_ptr {
                    let data = ConvPtrs {
                        x: dxp,
                        w: self.vptr(w),
                        y: self.vptr(dy),
                        workspace: ws as *mut c_void,
                    };
                    d.conv_backward_data(&data, ws_len, xs, conv)?;
                }
                Ok(())
            }
        });
    }

    fn batch_norm_forward_train(
        &self,
        y: &mut Buf,
        mean: &mut Buf,
        invstd: &mut Buf,
        running_mean: &mut Buf,
        running_var: &mut Buf,
        x: &Buf,
        gamma: &Buf,
        beta: &Buf,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) -> anyhow::Result<()> {
        if xs.pixels() < 2 {
            anyhow::bail!(
                "BatchNorm in training mode needs more than one value per channel, got input {}x{}x{}x{} (N×H×W×C); use a batch of at least 2",
                xs.n, xs.h, xs.w, xs.c
            );
        }
        self.bn_stats(mean, invstd, running_mean, running_var, x, xs, cfg);
        self.bn_apply(y, x, mean, invstd, gamma, beta, xs, false);
        Ok(())
    }

    fn batch_norm_forward_eval(
        &self,
        y: &mut Buf,
        x: &Buf,
        gamma: &Buf,
        beta: &Buf,
        running_mean: &Buf,
        running_var: &Buf,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) {
        let mut invstd = self.zeros(xs.c);
        self.bn_eval_invstd(&mut invstd, running_var, xs.c, cfg);
        self.bn_apply(y, x, running_mean, &invstd, gamma, beta, xs, false);
    }

    fn batch_norm_backward(
        &self,
        dx: &mut Buf,
        dgamma: &mut Buf,
        dbeta: &mut Buf,
        dy: &Buf,
        x: &Buf,
        gamma: &Buf,
        mean: &Buf,
        invstd: &Buf,
        xs: Nhwc,
    ) {
        self.bn_backward(dx, dgamma, dbeta, dy, x, gamma, mean, invstd, xs);
    }

    fn relu_forward(&self, y: &mut Buf, x: &Buf) {
        let args = [P(self.ptr(y)), P(self.ptr(x)), I(x.len() as i32)];
        self.launch("relu_forward_f32", elementwise(x.len()), &args);
    }

    fn relu_backward(&self, dy: &mut Buf, y: &Buf) {
        let args = [P(self.ptr(dy)), P(self.ptr(y)), I(y.len() as i32)];
        self.launch("relu_backward_f32", elementwise(y.len()), &args);
    }

    fn max_pool2d_forward(&self, y: &mut Buf, x: &Buf, xs: Nhwc, pool: &MaxPool2d) {
        self.dnn_call("max_pool2d_forward", |d| {
            let pd = Pooling::max(pool)?;
            // SAFETY: buffers sized for these shapes, on the handle's stream.
            unsafe { d.pool_forward(&pd, self.vptr(y), self.vptr(x), xs, pool.out_shape(xs)) }
        });
    }

    fn max_pool2d_backward(
        &self,
        dx: &mut Buf,
        dy: &Buf,
        x: &Buf,
        y: &Buf,
        xs: Nhwc,
        pool: &MaxPool2d,
    ) {
        self.dnn_call("max_pool2d_backward", |d| {
            let pd = Pooling::max(pool)?;
            // SAFETY: as above.
            unsafe {
                d.pool_backward(
                    &pd,
                    self.vptr(dx),
                    self.vptr(dy),
                    self.vptr(x),
                    self.vptr(y),
                    xs,
                    pool.out_shape(xs),
                )
            }
        });
    }

    fn fork_backward(&self, dx: &mut Buf, parts: &[&Buf]) {
        // The kernel sums up to four parts in order; more are folded in four at a time.
        let n = dx.len() as i32;
        let dxp = self.ptr(dx);
        let mut first = true;
        for chunk in parts.chunks(4) {
            let mut p = [0u64; 4];
            for (slot, part) in p.iter_mut().zip(chunk) {
                *slot = self.ptr(part);
            }
            if !first {
                // dx = dx + next parts: dx itself is the first summand.
                p.rotate_right(1);
                p[0] = dxp;
                if chunk.len() == 4 {
                    self.record("fork_backward", "more than 7 branches");
                }
            }
            first = false;
            let args = [P(dxp), P(p[0]), P(p[1]), P(p[2]), P(p[3]), I(n)];
            self.launch("fork_backward_f32", elementwise(dx.len()), &args);
        }
    }

    fn concat_forward(&self, y: &mut Buf, parts: &[&Buf], channels: &[usize]) {
        self.concat(y, parts, channels);
    }

    fn concat_backward(&self, dparts: &mut [&mut Buf], dy: &Buf, channels: &[usize]) {
        self.split(dparts, dy, channels);
    }

    fn avg_pool2d_forward(&self, y: &mut Buf, x: &Buf, xs: Nhwc) {
        let ys = Nhwc::new(xs.n, xs.h / 2, xs.w / 2, xs.c);
        self.dnn_call("avg_pool2d_forward", |d| {
            let pd = Pooling::avg2()?;
            // SAFETY: as above.
            unsafe { d.pool_forward(&pd, self.vptr(y), self.vptr(x), xs, ys) }
        });
    }

    fn avg_pool2d_backward(&self, dx: &mut Buf, dy: &Buf, xs: Nhwc) {
        let ys = Nhwc::new(xs.n, xs.h / 2, xs.w / 2, xs.c);
        self.dnn_call("avg_pool2d_backward", |d| {
            let pd = Pooling::avg2()?;
            // cuDNN's average-pooling backward reads neither x nor y; dx and dy stand in.
            // SAFETY: as above.
            unsafe {
                d.pool_backward(
                    &pd,
                    self.vptr(dx),
                    self.vptr(dy),
                    self.vptr(dx),
                    self.vptr(dy),
                    xs,
                    ys,
                )
            }
        });
    }

    fn linear_forward(
        &self,
        y: &mut Buf,
        x: &Buf,
        w: &Buf,
        b: &Buf,
        n: usize,
        fin: usize,
        fout: usize,
    ) {
        // Row-major y[n, out] = x[n, in]·wᵀ is column-major yᵀ[out, n] = w(in×out)ᵀ · xᵀ(in×n).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: fout as i32,
            n: n as i32,
            k: fin as i32,
            alpha: 1.0f32,
            lda: fin as i32,
            ldb: fin as i32,
            beta: 0.0f32,
            ldc: fout as i32,
        };
        // SAFETY: w is [out, in], x [n, in], y [n, out], all on this stream.
        if let Err(e) = unsafe { self.blas.gemm(cfg, w, x, y) } {
            self.record("linear_forward (cuBLAS)", e);
        }
        self.dnn_call("linear_forward bias", |d| {
            // SAFETY: y holds n·out floats, b out.
            unsafe { d.add_bias(self.vptr(y), self.vptr(b), Nhwc::new(n, 1, 1, fout)) }
        });
    }

    fn linear_backward(
        &self,
        dx: Option<&mut Buf>,
        dw: &mut Buf,
        db: &mut Buf,
        dy: &Buf,
        x: &Buf,
        w: &Buf,
        n: usize,
        fin: usize,
        fout: usize,
    ) {
        // dw[out, in] += dyᵀ·x  ⇔  column-major dwᵀ(in×out) += xᵀ(in×n) · dy(n×out).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_T,
            m: fin as i32,
            n: fout as i32,
            k: n as i32,
            alpha: 1.0f32,
            lda: fin as i32,
            ldb: fout as i32,
            beta: 1.0f32,
            ldc: fin as i32,
        };
        // SAFETY: shapes as documented above, all on this stream.
        if let Err(e) = unsafe { self.blas.gemm(cfg, x, dy, dw) } {
            self.record("linear_backward dw (cuBLAS)", e);
        }
        if let Some(dx) = dx {
            // dx[n, in] = dy·w  ⇔  column-major dxᵀ(in×n) = wᵀ(in×out) · dyᵀ(out×n).
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: fin as i32,
                n: n as i32,
                k: fout as i32,
                alpha: 1.0f32,
                lda: fin as i32,
                ldb: fout as i32,
                beta: 0.0f32,
                ldc: fin as i32,
            };
            // SAFETY: as above.
            if let Err(e) = unsafe { self.blas.gemm(cfg, w, dy, dx) } {
                self.record("linear_backward dx (cuBLAS)", e);
            }
        }
        self.dnn_call("linear_backward bias", |d| {
            // SAFETY: dy holds n·out floats, db out.
            unsafe { d.bias_grad(self.vptr(db), self.vptr(dy), Nhwc::new(n, 1, 1, fout)) }
        });
    }

    fn cross_entropy_forward(
        &self,
        probs: &mut Buf,
        logits: &Buf,
        labels: &[u32],
        k: usize,
        smoothing: f64,
    ) -> f64 {
        self.cross_entropy(probs, logits, labels, k, smoothing)
    }

    fn cross_entropy_backward(
        &self,
        dlogits: &mut Buf,
        probs: &Buf,
        _labels: &[u32],
        _k: usize,
        _smoothing: f64,
    ) {
        // The forward kernel already wrote (softmax − target)/N into `probs`.
        if let Err(e) = self.stream.memcpy_dtod(probs, dlogits) {
            self.record("cross_entropy_backward copy", e);
        }
    }

    fn sgd_step(
        &self,
        param: &mut Buf,
        grad: &Buf,
        momentum_buf: &mut Buf,
        first_step: bool,
        opt: &Sgd,
    ) {
        self.sgd(param, grad, momentum_buf, first_step, opt);
    }
}

/// A launch of one of the per-channel reduction kernels of `bn_relu.cu`.
struct Reduction {
    cfg: LaunchConfig,
    /// Doubles of the partial-sum workspace (2·G·C).
    workspace: usize,
    /// Ints of the arrival counters (one per channel group).
    counters: usize,
}

impl Gpu {
    fn sm_count(&self) -> u32 {
        self.ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map(|n| n.max(1) as u32)
            .unwrap_or(1)
    }

    /// A grid-stride launch of at most 8 blocks per SM, as the bn/concat kernels recommend.
    fn strided(&self, n: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                (n as u32).div_ceil(BLOCK).clamp(1, 8 * self.sm_count()),
                1,
                1,
            ),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The geometry bn_relu.cu recommends for a [P, C] reduction: block (32, 16), or (16, 32)
    /// for 16 channels; about two blocks per SM, each thread keeping at least ~8 rows.
    fn reduction(&self, p: usize, c: usize) -> Reduction {
        let (bx, by) = if c <= 16 { (16u32, 32u32) } else { (32, 16) };
        let gx = (c as u32).div_ceil(bx);
        let g = (2 * self.sm_count())
            .div_ceil(gx)
            .min((p as u32 / (8 * by)).max(1))
            .max(1);
        Reduction {
            cfg: LaunchConfig {
                grid_dim: (gx, g, 1),
                block_dim: (bx, by, 1),
                shared_mem_bytes: 0,
            },
            workspace: 2 * g as usize * c,
            counters: gx as usize,
        }
    }

    /// The zeroed counters and a workspace of the reduction kernels, grown as needed. The
    /// kernels leave the counters zero again, so one pair serves every launch on this stream.
    fn reduction_buffers(&self, r: &Reduction) -> (u64, u64) {
        let mut b = self.bn_scratch.lock().unwrap_or_else(|p| p.into_inner());
        if b.0.len() < r.workspace {
            match self.stream.alloc_zeros::<f64>(r.workspace) {
                Ok(w) => b.0 = w,
                Err(e) => self.record("out of GPU memory for the BatchNorm workspace", e),
            }
        }
        if b.1.len() < r.counters {
            match self.stream.alloc_zeros::<i32>(r.counters) {
                Ok(c) => b.1 = c,
                Err(e) => self.record("out of GPU memory for the BatchNorm counters", e),
            }
        }
        let (w, _s1) = b.0.device_ptr(&self.stream);
        let (c, _s2) = b.1.device_ptr(&self.stream);
        (w, c)
    }

    #[allow(clippy::too_many_arguments)]
    fn bn_stats(
        &self,
        mean: &mut Buf,
        invstd: &mut Buf,
        running_mean: &mut Buf,
        running_var: &mut Buf,
        x: &Buf,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) {
        let (p, c) = (xs.pixels() as i32, xs.c as i32);
        let r = self.reduction(xs.pixels(), xs.c);
        let (ws, counters) = self.reduction_buffers(&r);
        let args = [
            P(self.ptr(mean)),
            P(self.ptr(invstd)),
            P(self.ptr(running_mean)),
            P(self.ptr(running_var)),
            P(ws),
            P(counters),
            P(self.ptr(x)),
            I(p),
            I(c),
            F(cfg.eps as f32),
            F(cfg.momentum as f32),
        ];
        self.launch("batch_norm_stats_f32", r.cfg, &args);
    }

    #[allow(clippy::too_many_arguments)]
    fn bn_apply(
        &self,
        y: &mut Buf,
        x: &Buf,
        mean: &Buf,
        invstd: &Buf,
        gamma: &Buf,
        beta: &Buf,
        xs: Nhwc,
        relu: bool,
    ) {
        let (p, c) = (xs.pixels() as i32, xs.c as i32);
        let args = [
            P(self.ptr(y)),
            I(c), // ldy: a plain [P, C] output
            I(0), // y_off
            P(self.ptr(x)),
            P(self.ptr(mean)),
            P(self.ptr(invstd)),
            P(self.ptr(gamma)),
            P(self.ptr(beta)),
            I(p),
            I(c),
            I(relu as i32),
        ];
        self.launch("batch_norm_relu_apply_f32", self.strided(xs.len()), &args);
    }

    fn bn_eval_invstd(&self, invstd: &mut Buf, running_var: &Buf, c: usize, cfg: &BatchNormCfg) {
        let args = [
            P(self.ptr(invstd)),
            P(self.ptr(running_var)),
            I(c as i32),
            F(cfg.eps as f32),
        ];
        let launch = LaunchConfig {
            grid_dim: ((c as u32).div_ceil(128), 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch("batch_norm_eval_invstd", launch, &args);
    }

    #[allow(clippy::too_many_arguments)]
    fn bn_backward(
        &self,
        dx: &mut Buf,
        dgamma: &mut Buf,
        dbeta: &mut Buf,
        dy: &Buf,
        x: &Buf,
        gamma: &Buf,
        mean: &Buf,
        invstd: &Buf,
        xs: Nhwc,
    ) {
        let (p, c) = (xs.pixels() as i32, xs.c as i32);
        let coef = self.zeros(3 * xs.c);
        let r = self.reduction(xs.pixels(), xs.c);
        let (ws, counters) = self.reduction_buffers(&r);
        let (dyp, xp, mp, cp) = (self.ptr(dy), self.ptr(x), self.ptr(mean), self.ptr(&coef));
        // BatchNorm alone (the ReLU is its own op here): relu = 0, so y is never read; dy
        // stands in for it. ld = C and offset 0: plain [P, C] tensors.
        let args = [
            P(cp),
            P(self.ptr(dgamma)),
            P(self.ptr(dbeta)),
            P(ws),
            P(counters),
            P(dyp),
            I(c),
            I(0),
            P(dyp),
            I(c),
            I(0),
            P(xp),
            P(mp),
            P(self.ptr(invstd)),
            P(self.ptr(gamma)),
            I(p),
            I(c),
            I(0),
        ];
        self.launch("batch_norm_relu_backward_reduce_f32", r.cfg, &args);
        let args = [
            P(self.ptr(dx)),
            P(dyp),
            I(c),
            I(0),
            P(dyp),
            I(c),
            I(0),
            P(xp),
            P(mp),
            P(cp),
            I(p),
            I(c),
            I(0),
        ];
        self.launch(
            "batch_norm_relu_backward_apply_f32",
            self.strided(xs.len()),
            &args,
        );
    }

    fn concat(&self, y: &mut Buf, parts: &[&Buf], channels: &[usize]) {
        let ld: i32 = channels.iter().sum::<usize>() as i32;
        let pixels = (y.len() / ld.max(1) as usize) as i32;
        let yp = self.ptr(y);
        let mut off = 0i32;
        for (part, &c) in parts.iter().zip(channels) {
            let args = [
                P(yp),
                I(ld),
                I(off),
                P(self.ptr(part)),
                I(pixels),
                I(c as i32),
            ];
            self.launch(
                "concat_forward_f32",
                self.strided(pixels as usize * c),
                &args,
            );
            off += c as i32;
        }
    }

    fn split(&self, dparts: &mut [&mut Buf], dy: &Buf, channels: &[usize]) {
        let ld: i32 = channels.iter().sum::<usize>() as i32;
        let pixels = (dy.len() / ld.max(1) as usize) as i32;
        let dyp = self.ptr(dy);
        let mut off = 0i32;
        for (part, &c) in dparts.iter_mut().zip(channels) {
            let args = [
                P(self.ptr(part)),
                P(dyp),
                I(ld),
                I(off),
                I(pixels),
                I(c as i32),
            ];
            self.launch(
                "concat_backward_f32",
                self.strided(pixels as usize * c),
                &args,
            );
            off += c as i32;
        }
    }

    /// Runs the fused softmax cross-entropy: `probs` receives (softmax − target)/N, the
    /// gradient the backward hands on. Returns the mean loss (reading it back synchronises).
    fn cross_entropy(
        &self,
        probs: &mut Buf,
        logits: &Buf,
        labels: &[u32],
        k: usize,
        smoothing: f64,
    ) -> f64 {
        let n = labels.len();
        let labels_i: Vec<i32> = labels.iter().map(|&l| l as i32).collect();
        let labels_d = match self.stream.clone_htod(&labels_i) {
            Ok(b) => b,
            Err(e) => {
                self.record("copying labels to the GPU", e);
                return f64::NAN;
            }
        };
        let loss = self.zeros(1);
        let correct = match self.stream.alloc_zeros::<i32>(1) {
            Ok(b) => b,
            Err(e) => {
                self.record("allocating the accuracy counter", e);
                return f64::NAN;
            }
        };
        let (correct_p, _s1) = correct.device_ptr(&self.stream);
        let (labels_p, _s2) = labels_d.device_ptr(&self.stream);
        let args = [
            P(self.ptr(probs)),
            P(self.ptr(&loss)),
            P(correct_p),
            P(self.ptr(logits)),
            P(labels_p),
            I(n as i32),
            I(k as i32),
            F(smoothing as f32),
            P(0), // loss_scale: none, the fp32 path does not scale
        ];
        let threads = ((32 * n as u32).min(1024)).div_ceil(32) * 32;
        let launch = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (threads.max(32), 1, 1),
            shared_mem_bytes: 0,
        };
        self.launch("cross_entropy_forward_backward", launch, &args);
        self.download(&loss).first().map_or(f64::NAN, |&l| l as f64)
    }

    fn sgd(
        &self,
        param: &mut Buf,
        grad: &Buf,
        momentum_buf: &mut Buf,
        first_step: bool,
        opt: &Sgd,
    ) {
        let args = [
            P(self.ptr(param)),
            P(self.ptr(grad)),
            P(self.ptr(momentum_buf)),
            I(param.len() as i32),
            F(opt.lr as f32),
            F(opt.momentum as f32),
            F(opt.weight_decay as f32),
            I(opt.nesterov as i32),
            I(first_step as i32),
            P(0), // found_inf: none, fp32 never overflows the way fp16 does
            P(0), // lr_device: the lr argument is used
        ];
        self.launch("sgd_step", self.strided(param.len()), &args);
    }
}
