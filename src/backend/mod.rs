//! Every op of the network, listed once as a forward/backward pair.
//!
//! [`Backend`] is the index of the ops: the CPU reference in [`cpu`] implements it, and so does
//! any accelerated backend. Activations are NHWC (`[N, H, W, C]`, the channel fastest), which
//! makes a 1×1 convolution a plain GEMM and the channel concat of an Inception block a set of
//! column slices. Parameters keep PyTorch's layouts (conv weights OIHW, linear weights
//! `[out, in]`) so they load and save under PyTorch's names and shapes without conversion.

pub mod cpu;
pub mod cuda;
pub mod geometry;
pub mod select;

use std::fmt::Debug;

/// A floating-point element the backends compute in: `f32` for training, `f64` for the
/// finite-difference checks of every backward.
pub trait Elem:
    num_traits::Float
    + std::iter::Sum
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + Default
    + Debug
    + Send
    + Sync
    + 'static
{
    /// Safetensors dtype name (`F32`, `F64`).
    const DTYPE: safetensors::Dtype;
    fn cast(v: f64) -> Self;
    fn as_f64(self) -> f64;
    /// The slice as `f32` when `Self` is `f32`: the CPU's direct convolution kernels are f32.
    fn f32s(_s: &[Self]) -> Option<&[f32]> {
        None
    }
    fn f32s_mut(_s: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
}

impl Elem for f32 {
    const DTYPE: safetensors::Dtype = safetensors::Dtype::F32;
    fn cast(v: f64) -> Self {
        v as f32
    }
    fn as_f64(self) -> f64 {
        self as f64
    }
    fn f32s(s: &[f32]) -> Option<&[f32]> {
        Some(s)
    }
    fn f32s_mut(s: &mut [f32]) -> Option<&mut [f32]> {
        Some(s)
    }
}

impl Elem for f64 {
    const DTYPE: safetensors::Dtype = safetensors::Dtype::F64;
    fn cast(v: f64) -> Self {
        v
    }
    fn as_f64(self) -> f64 {
        self
    }
}

/// Training-mode BatchNorm needs two values per channel to estimate a variance; every backend
/// refuses the same inputs with the same message.
pub fn check_batch_norm_train(xs: Nhwc) -> anyhow::Result<()> {
    if xs.pixels() < 2 {
        anyhow::bail!(
            "BatchNorm in training mode needs more than one value per channel, got input {}x{}x{}x{} (N×H×W×C); use a batch of at least 2",
            xs.n, xs.h, xs.w, xs.c
        );
    }
    Ok(())
}

/// Shape of an NHWC activation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Nhwc {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
}

impl Nhwc {
    pub fn new(n: usize, h: usize, w: usize, c: usize) -> Self {
        Nhwc { n, h, w, c }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.n * self.h * self.w * self.c
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of pixels, `N·H·W`: the rows of the activation seen as a `[pixels, C]` matrix.
    pub fn pixels(&self) -> usize {
        self.n * self.h * self.w
    }
}

/// A 2-D convolution: cross-correlation with zero padding, PyTorch's `Conv2d` with a bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2d {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2d {
    /// Output side for an input side, as PyTorch computes it.
    pub fn out_side(&self, side: usize) -> usize {
        (side + 2 * self.pad - self.k) / self.stride + 1
    }
    pub fn out_shape(&self, x: Nhwc) -> Nhwc {
        Nhwc::new(x.n, self.out_side(x.h), self.out_side(x.w), self.cout)
    }
    /// Elements of the OIHW weight.
    pub fn weight_len(&self) -> usize {
        self.cout * self.cin * self.k * self.k
    }
}

/// A square max pooling window; padding counts as −∞.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaxPool2d {
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
}

impl MaxPool2d {
    pub fn out_side(&self, side: usize) -> usize {
        (side + 2 * self.pad - self.k) / self.stride + 1
    }
    pub fn out_shape(&self, x: Nhwc) -> Nhwc {
        Nhwc::new(x.n, self.out_side(x.h), self.out_side(x.w), x.c)
    }
}

/// BatchNorm2d's hyper-parameters (PyTorch defaults: eps 1e-5, momentum 0.1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormCfg {
    pub eps: f64,
    pub momentum: f64,
}

impl Default for BatchNormCfg {
    fn default() -> Self {
        BatchNormCfg {
            eps: 1e-5,
            momentum: 0.1,
        }
    }
}

/// SGD with momentum as `torch.optim.SGD` defines it (dampening 0).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
}

/// One parameter as the optimizer sees it.
pub struct SgdParam<'a, B> {
    pub value: &'a mut B,
    pub grad: &'a mut B,
    pub momentum: &'a mut B,
}

/// Every op as a forward/backward pair. Buffers are flat; shapes travel beside them.
///
/// Backward ops that produce parameter gradients *accumulate* into them (`+=`), as autograd
/// does, so the caller zeroes gradients once per step. Input gradients are overwritten.
pub trait Backend<T: Elem>: Sync {
    /// A flat buffer of `T` owned by this backend.
    type Buf: Send + Sync;

    /// A zeroed buffer in full precision: parameters, their gradients and momentum, BatchNorm
    /// statistics, logits.
    fn zeros(&self, len: usize) -> Self::Buf;
    fn upload(&self, data: &[T]) -> Self::Buf;
    /// A zeroed buffer for an activation or an activation gradient. The CPU keeps them in `T`;
    /// a mixed-precision backend stores them in 16 bits.
    fn act_zeros(&self, len: usize) -> Self::Buf {
        self.zeros(len)
    }
    /// An activation (the network input) from the host, stored as [`Backend::act_zeros`] does.
    fn upload_act(&self, data: &[T]) -> Self::Buf {
        self.upload(data)
    }
    fn download(&self, buf: &Self::Buf) -> Vec<T>;
    /// Sets every element to zero.
    fn fill_zero(&self, buf: &mut Self::Buf);
    /// The first error of an op since the last call (ops themselves cannot fail on the CPU; a
    /// GPU backend records launch and allocation failures here), cleared by the call.
    fn status(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// Whether the branches must be issued in order from one thread (a backend that routes
    /// each branch to a stream of its own by [`Backend::branch`]); the network then runs them
    /// in sequence whatever its schedule says.
    fn issues_from_one_thread(&self) -> bool {
        false
    }
    /// The `n` branches of an Inception block are about to run (on the input computed so far).
    /// A backend with several streams makes each branch stream wait for that input.
    fn branches_begin(&self, _n: usize) {}
    /// The ops from now on belong to branch `i` of the current block (`None`: back to the main
    /// line of the network). Called from one thread, with the branches issued in order.
    fn branch(&self, _i: Option<usize>) {}
    /// The branches are done: what follows (the join) waits for all `n` of them.
    fn branches_end(&self, _n: usize) {}
    /// A named range around a layer, a branch or a block, for profilers (NVTX on CUDA).
    fn range_push(&self, _name: &str) {}
    fn range_pop(&self) {}
    /// Starts (`true`) or stops the device profiler's capture (`cuProfilerStart/Stop`, for
    /// `nsys profile --capture-range=cudaProfilerApi`); nothing on the CPU.
    fn profiler(&self, _on: bool) -> anyhow::Result<()> {
        Ok(())
    }

    /// In mixed precision: the current loss scale and how many optimizer steps were skipped
    /// for an overflowed gradient so far. `None` for a backend that does not scale.
    fn loss_scale(&self) -> anyhow::Result<Option<(f64, u64)>> {
        Ok(None)
    }

    /// Continues mixed precision at a saved loss scale (a resumed run); nothing elsewhere.
    fn restore_loss_scale(&mut self, _scale: f64) -> anyhow::Result<()> {
        Ok(())
    }

    /// `y = conv2d(x, w) + b`. x: `[N,H,W,Cin]`, w: `[Cout,Cin,k,k]`, b: `[Cout]`, y: `[N,Ho,Wo,Cout]`.
    fn conv2d_forward(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        xs: Nhwc,
        conv: &Conv2d,
    );
    /// dx = ∂L/∂x (when asked for), dw += ∂L/∂w, db += ∂L/∂b.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_backward(
        &self,
        dx: Option<&mut Self::Buf>,
        dw: &mut Self::Buf,
        db: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        xs: Nhwc,
        conv: &Conv2d,
    );

    /// Training-mode BatchNorm over the N·H·W pixels of each channel: normalises with the batch
    /// mean and biased variance, saves `mean` and `invstd` (`[C]` each) for the backward, and
    /// updates the running statistics with PyTorch's rule (unbiased variance).
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_forward_train(
        &self,
        y: &mut Self::Buf,
        mean: &mut Self::Buf,
        invstd: &mut Self::Buf,
        running_mean: &mut Self::Buf,
        running_var: &mut Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) -> anyhow::Result<()>;
    /// Eval-mode BatchNorm with the running statistics.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_forward_eval(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &Self::Buf,
        running_var: &Self::Buf,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    );
    /// Backward of the training-mode forward: dx, dgamma +=, dbeta +=.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(
        &self,
        dx: &mut Self::Buf,
        dgamma: &mut Self::Buf,
        dbeta: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        mean: &Self::Buf,
        invstd: &Self::Buf,
        xs: Nhwc,
    );

    /// BatchNorm in training mode followed by ReLU: `y = max(batch_norm(x), 0)`, what a
    /// backend can do in one pass over the data. The default runs the two ops.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_relu_forward_train(
        &self,
        y: &mut Self::Buf,
        mean: &mut Self::Buf,
        invstd: &mut Self::Buf,
        running_mean: &mut Self::Buf,
        running_var: &mut Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) -> anyhow::Result<()> {
        let mut t = self.act_zeros(xs.len());
        self.batch_norm_forward_train(
            &mut t,
            mean,
            invstd,
            running_mean,
            running_var,
            x,
            gamma,
            beta,
            xs,
            cfg,
        )?;
        self.relu_forward(y, &t);
        Ok(())
    }
    /// Eval-mode BatchNorm followed by ReLU.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_relu_forward_eval(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        beta: &Self::Buf,
        running_mean: &Self::Buf,
        running_var: &Self::Buf,
        xs: Nhwc,
        cfg: &BatchNormCfg,
    ) {
        let mut t = self.act_zeros(xs.len());
        self.batch_norm_forward_eval(&mut t, x, gamma, beta, running_mean, running_var, xs, cfg);
        self.relu_forward(y, &t);
    }
    /// Eval-mode Conv2d → BatchNorm → ReLU as one op, where the backend can fuse them: `y`
    /// gets the block's output and `true` comes back. The CPU folds the BatchNorm into the
    /// convolution's weight and bias and applies the ReLU before storing, saving a pass over
    /// the activations. `false` (the default): nothing was done; the network runs the ops.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_batch_norm_relu_forward_eval(
        &self,
        _y: &mut Self::Buf,
        _x: &Self::Buf,
        (_w, _b): (&Self::Buf, &Self::Buf),
        (_gamma, _beta, _running_mean, _running_var): (
            &Self::Buf,
            &Self::Buf,
            &Self::Buf,
            &Self::Buf,
        ),
        _xs: Nhwc,
        _conv: &Conv2d,
        _cfg: &BatchNormCfg,
    ) -> bool {
        false
    }
    /// Backward of [`Backend::batch_norm_relu_forward_train`]: `y` is its output; `dy` may be
    /// overwritten (the default masks it in place, then runs the BatchNorm backward).
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_relu_backward(
        &self,
        dx: &mut Self::Buf,
        dgamma: &mut Self::Buf,
        dbeta: &mut Self::Buf,
        dy: &mut Self::Buf,
        y: &Self::Buf,
        x: &Self::Buf,
        gamma: &Self::Buf,
        mean: &Self::Buf,
        invstd: &Self::Buf,
        xs: Nhwc,
    ) {
        self.relu_backward(dy, y);
        self.batch_norm_backward(dx, dgamma, dbeta, dy, x, gamma, mean, invstd, xs);
    }

    /// `y = max(x, 0)`.
    fn relu_forward(&self, y: &mut Self::Buf, x: &Self::Buf);
    /// `dy *= [y > 0]`, in place (PyTorch masks with the output).
    fn relu_backward(&self, dy: &mut Self::Buf, y: &Self::Buf);

    /// Max pooling (padding counts as −∞).
    fn max_pool2d_forward(&self, y: &mut Self::Buf, x: &Self::Buf, xs: Nhwc, pool: &MaxPool2d);
    /// dx = dy routed to each window's first maximum in scan order (NaN wins), as PyTorch
    /// does. Takes the forward's input and output instead of saved indices, as cuDNN does.
    #[allow(clippy::too_many_arguments)]
    fn max_pool2d_backward(
        &self,
        dx: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        y: &Self::Buf,
        xs: Nhwc,
        pool: &MaxPool2d,
    );

    /// The backward of feeding one tensor to several branches: dx = Σ parts, summed in the
    /// order given (so the result does not depend on which branch finished first).
    fn fork_backward(&self, dx: &mut Self::Buf, parts: &[&Self::Buf]);

    /// Joins NHWC tensors that share N·H·W along channels: y: [pixels, Σc].
    fn concat_forward(&self, y: &mut Self::Buf, parts: &[&Self::Buf], channels: &[usize]);
    /// Splits the joined gradient back into one gradient per part.
    fn concat_backward(&self, dparts: &mut [&mut Self::Buf], dy: &Self::Buf, channels: &[usize]);

    /// `avg_pool2d(x, 2)`: mean of each 2×2 window (stride 2, no padding, floor).
    fn avg_pool2d_forward(&self, y: &mut Self::Buf, x: &Self::Buf, xs: Nhwc);
    fn avg_pool2d_backward(&self, dx: &mut Self::Buf, dy: &Self::Buf, xs: Nhwc);

    /// `y = x·Wᵀ + b`. x: `[N,In]`, w: `[Out,In]`, y: `[N,Out]`.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        n: usize,
        fin: usize,
        fout: usize,
    );
    /// dx (when asked for), dw +=, db +=.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        dx: Option<&mut Self::Buf>,
        dw: &mut Self::Buf,
        db: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        fin: usize,
        fout: usize,
    );

    /// Mean softmax cross-entropy over the batch with label smoothing `smoothing` (0 = none).
    /// Returns the loss; `probs` keeps the softmax for the backward. logits: `[N,K]`.
    fn cross_entropy_forward(
        &self,
        probs: &mut Self::Buf,
        logits: &Self::Buf,
        labels: &[u32],
        k: usize,
        smoothing: f64,
    ) -> f64;
    /// [`Backend::cross_entropy_forward`] without reading the loss back: a backend that sums
    /// the step metrics on the device (the CUDA backend, for replayed steps, which cannot read
    /// anything back) adds the loss and the correct count to those sums; the default computes
    /// the loss and drops it.
    fn cross_entropy_forward_summed(
        &self,
        probs: &mut Self::Buf,
        logits: &Self::Buf,
        labels: &[u32],
        k: usize,
        smoothing: f64,
    ) {
        self.cross_entropy_forward(probs, logits, labels, k, smoothing);
    }
    /// dlogits = (softmax − target) / N, times the loss scale on a mixed-precision backend
    /// (which its [`Backend::sgd_step_all`] divides out again).
    fn cross_entropy_backward(
        &self,
        dlogits: &mut Self::Buf,
        probs: &Self::Buf,
        labels: &[u32],
        k: usize,
        smoothing: f64,
    );

    /// One optimizer step over every parameter: `(value, grad, momentum)` triples. The default
    /// runs [`Backend::sgd_step`] on each; a mixed-precision backend first unscales every
    /// gradient and checks them all for overflow, so that a step is taken whole or skipped whole.
    fn sgd_step_all(&self, params: &mut [SgdParam<'_, Self::Buf>], first_step: bool, opt: &Sgd) {
        for p in params {
            self.sgd_step(p.value, p.grad, p.momentum, first_step, opt);
        }
    }

    /// One SGD step over a parameter tensor. On the first step (`first_step`) the momentum
    /// buffer is set to the gradient, as PyTorch does, instead of being decayed.
    fn sgd_step(
        &self,
        param: &mut Self::Buf,
        grad: &Self::Buf,
        momentum_buf: &mut Self::Buf,
        first_step: bool,
        opt: &Sgd,
    );
}
