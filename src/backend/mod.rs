//! The backends and the values their ops take.
//!
//! [`ops`] is the index of the ops: one trait per op family ([`ConvOps`], [`BatchNormOps`], …),
//! gathered by [`Backend`]. The CPU reference in [`cpu`] implements each family in a file of
//! the family's name, and so does the CUDA backend in `cuda/ops/`. Activations are NHWC (`[N, H, W, C]`, the channel fastest), which
//! makes a 1×1 convolution a plain GEMM and the channel concat of an Inception block a set of
//! column slices. Parameters keep PyTorch's layouts (conv weights OIHW, linear weights
//! `[out, in]`) so they load and save under PyTorch's names and shapes without conversion.

pub mod cpu;
pub mod cuda;
pub mod geometry;
pub mod ops;
pub mod select;

pub use ops::{
    Backend, BatchNormOps, Buffers, ConcatOps, ConvOps, ElementwiseOps, LossOps, OptimOps, PoolOps,
};

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
        BatchNormCfg { eps: 1e-5, momentum: 0.1 }
    }
}

/// BatchNorm's learned per-channel scale and shift (PyTorch's `weight` and `bias`), `[C]`
/// each; their gradients in a backward.
#[derive(Clone, Copy, Debug)]
pub struct Affine<B> {
    pub gamma: B,
    pub beta: B,
}

/// The running mean and (unbiased) variance a BatchNorm keeps for evaluation, `[C]` each.
#[derive(Clone, Copy, Debug)]
pub struct RunningStats<B> {
    pub mean: B,
    pub var: B,
}

/// The batch mean and `1/√(var + eps)` a training forward saves for its backward, `[C]` each.
#[derive(Clone, Copy, Debug)]
pub struct BatchStats<B> {
    pub mean: B,
    pub invstd: B,
}

/// SyncBatchNorm's link between the data-parallel ranks (PyTorch's `SyncBatchNorm`): a
/// training-mode BatchNorm given one normalises over the global batch (the batch statistics
/// gathered from every rank) and its backward sums the statistics of the gradient over the
/// ranks, so that W ranks with b images each compute what one process computes with W·b.
///
/// Every rank must make the same calls in the same order (the network issues its BatchNorms
/// one at a time when one is given). The backward has no error path, so a failed collective
/// is kept, the values are left as they were, later calls do nothing, and
/// [`BatchNormSync::check`] reports it after the pass: nothing computed from it is applied.
pub trait BatchNormSync: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sums `values` element-wise over the ranks, in place; the same bits on every rank.
    fn sum(&self, values: &mut [f64]);
    /// The first failed collective since the last check.
    fn check(&self) -> anyhow::Result<()>;
    /// Every rank's `mine` (each of the same length), in rank order, on every rank: a sum of
    /// vectors that are zero outside their rank's slot, which is exact.
    fn all_gather(&self, mine: &[f64]) -> Vec<f64> {
        let k = mine.len();
        let mut all = vec![0.0; k * self.world()];
        all[self.rank() * k..(self.rank() + 1) * k].copy_from_slice(mine);
        self.sum(&mut all);
        all
    }
}

/// The count, mean and Σ (x − μ)² of every rank's batch from each rank's own (count `m`, mean
/// `mu`, Σ (x − μ_r)² `s2`), combined in rank order (Chan et al.'s pairwise update, written
/// out), so that every rank gets the same bits.
pub(crate) fn global_moments(
    sync: &dyn BatchNormSync, m: usize, mu: Vec<f64>, s2: Vec<f64>,
) -> (usize, Vec<f64>, Vec<f64>) {
    let c = mu.len();
    let mut mine = vec![m as f64];
    mine.extend(&mu);
    mine.extend(&s2);
    let all = sync.all_gather(&mine);
    let ranks: Vec<&[f64]> = all.chunks(2 * c + 1).collect();
    let total: f64 = ranks.iter().map(|r| r[0]).sum();
    let mean: Vec<f64> =
        (0..c).map(|ch| ranks.iter().map(|r| r[0] * r[1 + ch]).sum::<f64>() / total).collect();
    let s2 = (0..c)
        .map(|ch| ranks.iter().map(|r| r[1 + c + ch] + r[0] * (r[1 + ch] - mean[ch]).powi(2)).sum())
        .collect();
    (total as usize, mean, s2)
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
