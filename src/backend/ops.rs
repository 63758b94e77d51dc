//! Every op of the network, listed once as a forward/backward pair: one trait per op family,
//! each implemented by every backend in a file of the family's name (`cpu/conv.rs` and
//! `cuda/ops/conv.rs` implement [`ConvOps`], with the kernels in `cuda/conv.cu`).
//! [`Backend`] gathers the families and adds what is not an op: streams and profiling.
//!
//! Buffers are flat; shapes travel beside them. Backward ops that produce parameter gradients
//! *accumulate* into them (`+=`), as autograd does, so the caller zeroes gradients once per
//! step. Input gradients are overwritten.

use super::{
    Affine, BatchNormCfg, BatchNormSync, BatchStats, Conv2d, Elem, MaxPool2d, Nhwc, RunningStats,
    Sgd, SgdParam,
};

/// A backend's memory: buffers of `T`, to and from the host.
pub trait Buffers<T: Elem>: Sync {
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
    /// An activation (the network input) from the host, stored as [`Buffers::act_zeros`] does.
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
}

/// The products: 2-D convolution (PyTorch's `Conv2d`) and the classifier's `Linear`.
pub trait ConvOps<T: Elem>: Buffers<T> {
    /// `y = conv2d(x, w) + b`. x: `[N,H,W,Cin]`, w: `[Cout,Cin,k,k]`, b: `[Cout]`, y: `[N,Ho,Wo,Cout]`.
    fn conv2d_forward(
        &self, y: &mut Self::Buf, x: &Self::Buf, w: &Self::Buf, b: &Self::Buf, xs: Nhwc,
        conv: &Conv2d,
    );
    /// dx = ∂L/∂x (when asked for), dw += ∂L/∂w, db += ∂L/∂b.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_backward(
        &self, dx: Option<&mut Self::Buf>, dw: &mut Self::Buf, db: &mut Self::Buf, dy: &Self::Buf,
        x: &Self::Buf, w: &Self::Buf, xs: Nhwc, conv: &Conv2d,
    );
    /// Eval-mode Conv2d → BatchNorm → ReLU as one op, where the backend can fuse them: `y`
    /// gets the block's output and `true` comes back. The CPU folds the BatchNorm into the
    /// convolution's weight and bias and applies the ReLU before storing, saving a pass over
    /// the activations. `false` (the default): nothing was done; the network runs the ops.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_batch_norm_relu_forward_eval(
        &self, _y: &mut Self::Buf, _x: &Self::Buf, _wb: (&Self::Buf, &Self::Buf),
        _affine: Affine<&Self::Buf>, _running: RunningStats<&Self::Buf>, _xs: Nhwc, _conv: &Conv2d,
        _cfg: &BatchNormCfg,
    ) -> bool {
        false
    }

    /// `y = x·Wᵀ + b`. x: `[N,In]`, w: `[Out,In]`, y: `[N,Out]`.
    #[allow(clippy::too_many_arguments)]
    fn linear_forward(
        &self, y: &mut Self::Buf, x: &Self::Buf, w: &Self::Buf, b: &Self::Buf, n: usize,
        fin: usize, fout: usize,
    );
    /// dx (when asked for), dw +=, db +=.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self, dx: Option<&mut Self::Buf>, dw: &mut Self::Buf, db: &mut Self::Buf, dy: &Self::Buf,
        x: &Self::Buf, w: &Self::Buf, n: usize, fin: usize, fout: usize,
    );
}

/// BatchNorm2d, alone or fused with the ReLU that follows it (`relu`): `y = max(bn(x), 0)` in
/// one pass over the data.
pub trait BatchNormOps<T: Elem>: Buffers<T> {
    /// Training mode, over the N·H·W pixels of each channel: normalises with the batch mean
    /// and biased variance, saves them for the backward in `batch`, and updates `running`
    /// with PyTorch's rule (unbiased variance). With `sync`, the batch is every rank's.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_forward_train(
        &self, y: &mut Self::Buf, x: &Self::Buf, affine: Affine<&Self::Buf>,
        running: RunningStats<&mut Self::Buf>, batch: BatchStats<&mut Self::Buf>, xs: Nhwc,
        cfg: &BatchNormCfg, relu: bool, sync: Option<&dyn BatchNormSync>,
    ) -> anyhow::Result<()>;
    /// Eval mode, with the running statistics.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_forward_eval(
        &self, y: &mut Self::Buf, x: &Self::Buf, affine: Affine<&Self::Buf>,
        running: RunningStats<&Self::Buf>, xs: Nhwc, cfg: &BatchNormCfg, relu: bool,
    );
    /// Backward of the training-mode forward: dx, and the affine's gradients `+=`. With the
    /// ReLU, `relu_out` is the forward's output, which masks `dy`. With `sync` (as given to
    /// the forward), dx is that of the global batch; the affine's gradients stay this rank's,
    /// to be averaged with the others as every parameter's.
    #[allow(clippy::too_many_arguments)]
    fn batch_norm_backward(
        &self, dx: &mut Self::Buf, daffine: Affine<&mut Self::Buf>, dy: &Self::Buf,
        relu_out: Option<&Self::Buf>, x: &Self::Buf, gamma: &Self::Buf,
        batch: BatchStats<&Self::Buf>, xs: Nhwc, sync: Option<&dyn BatchNormSync>,
    );
}

/// The ReLU that stands alone (one that follows a BatchNorm runs inside it).
pub trait ElementwiseOps<T: Elem>: Buffers<T> {
    /// `y = max(x, 0)`.
    fn relu_forward(&self, y: &mut Self::Buf, x: &Self::Buf);
    /// `dy *= [y > 0]`, in place (PyTorch masks with the output).
    fn relu_backward(&self, dy: &mut Self::Buf, y: &Self::Buf);
}

/// Max pooling and the head's 2×2 average pooling.
pub trait PoolOps<T: Elem>: Buffers<T> {
    /// Max pooling (padding counts as −∞).
    fn max_pool2d_forward(&self, y: &mut Self::Buf, x: &Self::Buf, xs: Nhwc, pool: &MaxPool2d);
    /// dx = dy routed to each window's first maximum in scan order (NaN wins), as PyTorch
    /// does. Takes the forward's input and output instead of saved indices, as cuDNN does.
    fn max_pool2d_backward(
        &self, dx: &mut Self::Buf, dy: &Self::Buf, x: &Self::Buf, y: &Self::Buf, xs: Nhwc,
        pool: &MaxPool2d,
    );
    /// `avg_pool2d(x, 2)`: mean of each 2×2 window (stride 2, no padding, floor).
    fn avg_pool2d_forward(&self, y: &mut Self::Buf, x: &Self::Buf, xs: Nhwc);
    fn avg_pool2d_backward(&self, dx: &mut Self::Buf, dy: &Self::Buf, xs: Nhwc);
}

/// The Inception block's fork (one input to every branch) and join (channel concat).
pub trait ConcatOps<T: Elem>: Buffers<T> {
    /// The backward of feeding one tensor to several branches: dx = Σ parts, summed in the
    /// order given (so the result does not depend on which branch finished first).
    fn fork_backward(&self, dx: &mut Self::Buf, parts: &[&Self::Buf]);
    /// Joins NHWC tensors that share N·H·W along channels: y: [pixels, Σc].
    fn concat_forward(&self, y: &mut Self::Buf, parts: &[&Self::Buf], channels: &[usize]);
    /// Splits the joined gradient back into one gradient per part.
    fn concat_backward(&self, dparts: &mut [&mut Self::Buf], dy: &Self::Buf, channels: &[usize]);
}

/// Softmax cross-entropy with label smoothing: `logits` `[N,K]`, `labels` `[N]`.
pub trait LossOps<T: Elem>: Buffers<T> {
    /// Mean loss over the batch with label smoothing `smoothing` (0 = none). Returns the loss;
    /// `probs` keeps the softmax for the backward.
    fn cross_entropy_forward(
        &self, probs: &mut Self::Buf, logits: &Self::Buf, labels: &[u32], k: usize, smoothing: f64,
    ) -> f64;
    /// [`LossOps::cross_entropy_forward`] without reading the loss back: a backend that sums
    /// the step metrics on the device (the CUDA backend, for replayed steps, which cannot read
    /// anything back) adds the loss and the correct count to those sums; the default computes
    /// the loss and drops it.
    fn cross_entropy_forward_summed(
        &self, probs: &mut Self::Buf, logits: &Self::Buf, labels: &[u32], k: usize, smoothing: f64,
    ) {
        self.cross_entropy_forward(probs, logits, labels, k, smoothing);
    }
    /// dlogits = (softmax − target) / N, times the loss scale on a mixed-precision backend
    /// (which its [`OptimOps::sgd_step_all`] divides out again).
    fn cross_entropy_backward(
        &self, dlogits: &mut Self::Buf, probs: &Self::Buf, labels: &[u32], k: usize, smoothing: f64,
    );
}

/// SGD with momentum, as `torch.optim.SGD`.
pub trait OptimOps<T: Elem>: Buffers<T> {
    /// One optimizer step over every parameter: `(value, grad, momentum)` triples. The default
    /// runs [`OptimOps::sgd_step`] on each; a mixed-precision backend first unscales every
    /// gradient and checks them all for overflow, so that a step is taken whole or skipped whole.
    fn sgd_step_all(&self, params: &mut [SgdParam<'_, Self::Buf>], first_step: bool, opt: &Sgd) {
        for p in params {
            self.sgd_step(p.value, p.grad, p.momentum, first_step, opt);
        }
    }
    /// One SGD step over a parameter tensor. On the first step (`first_step`) the momentum
    /// buffer is set to the gradient, as PyTorch does, instead of being decayed.
    fn sgd_step(
        &self, param: &mut Self::Buf, grad: &Self::Buf, momentum_buf: &mut Self::Buf,
        first_step: bool, opt: &Sgd,
    );
}

/// A backend: every op family, and how the network's branches map onto it.
pub trait Backend<T: Elem>:
    ConvOps<T>
    + BatchNormOps<T>
    + ElementwiseOps<T>
    + PoolOps<T>
    + ConcatOps<T>
    + LossOps<T>
    + OptimOps<T>
{
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
    /// Averages `grads` (fp32 parameter gradients) over the data-parallel ranks in place,
    /// with a collective the backend holds itself (NCCL on CUDA, see `Gpu::set_comm`).
    /// `Ok(false)`: it holds none, and the caller averages through the host.
    fn average_over_ranks(&self, _grads: &mut [&mut Self::Buf]) -> anyhow::Result<bool> {
        Ok(false)
    }
}
