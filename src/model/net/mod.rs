//! The network instantiated on a backend: parameters, gradients, momentum buffers, saved
//! activations, and the forward/backward walk over the [`ModelSpec`].
//!
//! Each layer keeps its own output (the next layer's input) for the backward, so the walk is
//! a plain loop forward and the same loop reversed. An Inception block hands its input to the
//! branch scheduler, which runs the branches; the block then joins them in branch order.
//!
//! This file holds [`Net`] and its state; `build` makes the nodes from the spec, `node` is
//! the forward and backward of each kind of node, `timing` the per-layer profile.

use super::{Layer, ModelSpec, TensorInfo, TensorKind};
use crate::backend::{
    Affine, Backend, BatchNormCfg, BatchNormSync, BatchStats, Conv2d, Elem, MaxPool2d, Nhwc,
    RunningStats, Sgd, SgdParam,
};
use crate::schedule::{run_branches, BranchSchedule};
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use std::marker::PhantomData;

mod build;
mod node;
mod timing;

use build::*;
use node::*;
pub use timing::LayerTime;
use timing::*;

/// An activation: a buffer and its NHWC shape.
pub struct Act<Buf> {
    pub buf: Buf,
    pub shape: Nhwc,
}

/// A trained tensor with its gradient and its SGD momentum buffer.
pub struct Param<Buf> {
    pub value: Buf,
    pub grad: Buf,
    pub momentum: Buf,
}

/// Mutable access to one named tensor of the model, in `state_dict()` order.
pub enum Slot<'a, Buf> {
    Param(&'a mut Param<Buf>),
    RunningStat(&'a mut Buf),
    Count(&'a mut i64),
}

/// See [`Net::step_counters`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepCounters {
    batches: Vec<i64>,
    sgd_steps: u64,
}

/// The network on backend `B`, computing in `T`.
pub struct Net<T: Elem, B: Backend<T>> {
    pub spec: ModelSpec,
    pub schedule: BranchSchedule,
    be: B,
    nodes: Vec<Node<B::Buf>>,
    input: Act<B::Buf>,
    /// Softmax of the last loss, [N, classes].
    probs: Act<B::Buf>,
    labels: Vec<u32>,
    smoothing: f64,
    /// SGD steps taken (the first one initialises the momentum buffers).
    pub sgd_steps: u64,
    /// Time every layer's forward and backward (see [`Net::profile`]).
    pub profile: bool,
    /// With data parallelism and `--sync-bn`: the training-mode BatchNorms normalise over the
    /// global batch (see [`BatchNormSync`]).
    pub sync_bn: Option<std::sync::Arc<dyn BatchNormSync>>,
    _elem: PhantomData<T>,
}

/// A tensor read from or written to a checkpoint, in host memory.
#[derive(Clone, Debug, PartialEq)]
pub enum HostTensor<T> {
    Float(Vec<T>),
    Int(i64),
}

impl<T: Elem, B: Backend<T>> Net<T, B> {
    /// The network of `spec` with PyTorch's default initialisation, drawn from `seed`.
    pub fn new(spec: ModelSpec, be: B, seed: u64) -> Result<Self> {
        spec.shapes(2).context("the model description is inconsistent")?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let nodes = build::<T, B>(&be, &spec.layers, &mut rng);
        Ok(Net {
            spec,
            schedule: BranchSchedule::default(),
            input: Act { buf: be.zeros(0), shape: Nhwc::new(0, 0, 0, 0) },
            probs: Act { buf: be.zeros(0), shape: Nhwc::new(0, 0, 0, 0) },
            labels: Vec::new(),
            smoothing: 0.0,
            nodes,
            be,
            sgd_steps: 0,
            profile: false,
            sync_bn: None,
            _elem: PhantomData,
        })
    }

    pub fn backend(&self) -> &B {
        &self.be
    }

    /// [`Net::schedule`], or sequential where the backend needs its branches issued from one
    /// thread.
    /// Whether SyncBatchNorm's collectives of the last pass all succeeded.
    fn check_sync(&self) -> Result<()> {
        self.sync_bn.as_ref().map_or(Ok(()), |s| s.check().context("SyncBatchNorm"))
    }

    fn effective_schedule(&self) -> BranchSchedule {
        // SyncBatchNorm's collectives must come in the same order on every rank: one branch
        // at a time.
        if self.be.issues_from_one_thread() || self.sync_bn.is_some() {
            BranchSchedule::Sequential
        } else {
            self.schedule
        }
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.be
    }

    /// Runs the network on `x` (`[N,H,W,C]`, NHWC) and returns the logits [N, classes].
    /// `train` selects batch statistics (and updates the running ones) over running statistics.
    pub fn forward(&mut self, x: &[T], n: usize, train: bool) -> Result<Vec<T>> {
        let (c, h, w) = self.spec.input;
        let shape = Nhwc::new(n, h, w, c);
        if x.len() != shape.len() {
            bail!(
                "input has {} values, expected {} for a batch of {n} images of {c}x{h}x{w}",
                x.len(),
                shape.len()
            );
        }
        let buf = self.be.upload_act(x);
        self.forward_buf(buf, n, train)
    }

    /// [`Net::forward`] on an input already on the backend (NHWC, as
    /// [`Buffers::act_zeros`](crate::backend::Buffers::act_zeros) stores activations), e.g. a batch a data kernel built there.
    pub fn forward_buf(&mut self, x: B::Buf, n: usize, train: bool) -> Result<Vec<T>> {
        let (c, h, w) = self.spec.input;
        let shape = Nhwc::new(n, h, w, c);
        self.input = Act { buf: x, shape };
        self.forward_loaded(train)?;
        Ok(self.be.download(&last_out(&self.nodes, &self.input).buf))
    }

    /// Lets `f` refill the input buffer of the last forward in place (a step replayed as a
    /// CUDA graph reads its input from the same address every time).
    pub fn with_input<R>(&mut self, f: impl FnOnce(&B, &mut B::Buf) -> R) -> R {
        f(&self.be, &mut self.input.buf)
    }

    /// [`Net::forward`] on the input already loaded (the last one, possibly refilled through
    /// [`Net::with_input`]), without reading the logits back.
    pub fn forward_loaded(&mut self, train: bool) -> Result<()> {
        let ctx = Ctx {
            be: &self.be,
            train,
            bn: self.spec.bn,
            schedule: self.effective_schedule(),
            profile: self.profile,
            sync_bn: self.sync_bn.as_deref(),
        };
        forward_seq(&mut self.nodes, &self.input, &ctx)?;
        self.check_sync()?;
        self.be.status()
    }

    /// Counts a training step that ran without this code (a replayed CUDA graph): the batch
    /// counters of BatchNorm and the SGD step count advance as if it had.
    pub fn count_replayed_step(&mut self) {
        visit_nodes(&mut self.nodes, &mut |_, slot| {
            if let Slot::Count(c) = slot {
                *c += 1;
            }
        });
        self.sgd_steps += 1;
    }

    /// The host's step counters (BatchNorm's batch counts and the SGD step count), to be put
    /// back with [`Net::set_step_counters`] when a recorded step never runs (a CUDA graph
    /// capture that failed).
    pub fn step_counters(&mut self) -> StepCounters {
        let mut batches = Vec::new();
        visit_nodes(&mut self.nodes, &mut |_, slot| {
            if let Slot::Count(c) = slot {
                batches.push(*c);
            }
        });
        StepCounters { batches, sgd_steps: self.sgd_steps }
    }

    /// Restores what [`Net::step_counters`] returned.
    pub fn set_step_counters(&mut self, counters: &StepCounters) {
        let mut it = counters.batches.iter().copied();
        visit_nodes(&mut self.nodes, &mut |_, slot| {
            // Only a counter takes the next saved value (the other slots are visited too).
            if let Slot::Count(c) = slot {
                if let Some(v) = it.next() {
                    *c = v;
                }
            }
        });
        self.sgd_steps = counters.sgd_steps;
    }

    /// Mean cross-entropy of the last forward's logits against `labels` (label smoothing
    /// `smoothing`); keeps what the backward needs.
    pub fn loss(&mut self, labels: &[u32], smoothing: f64) -> Result<f64> {
        let k = self.prepare_loss(labels, smoothing)?;
        let logits = &last_out(&self.nodes, &self.input).buf;
        let loss = self.be.cross_entropy_forward(&mut self.probs.buf, logits, labels, k, smoothing);
        // Reading the loss back is where a device reports what failed in the step so far: that
        // failure, not the NaN that stands in for the loss, is the error.
        self.be.status()?;
        Ok(loss)
    }

    /// [`Net::loss`] of a step whose metrics stay on the device
    /// ([`LossOps::cross_entropy_forward_summed`](crate::backend::LossOps::cross_entropy_forward_summed)): nothing is read back.
    pub fn loss_summed(&mut self, labels: &[u32], smoothing: f64) -> Result<()> {
        let k = self.prepare_loss(labels, smoothing)?;
        let logits = &last_out(&self.nodes, &self.input).buf;
        self.be.cross_entropy_forward_summed(&mut self.probs.buf, logits, labels, k, smoothing);
        Ok(())
    }

    /// Checks the labels against the logits, sizes the softmax buffer and keeps the labels and
    /// smoothing for the backward. Returns the number of classes.
    fn prepare_loss(&mut self, labels: &[u32], smoothing: f64) -> Result<usize> {
        let shape = last_out(&self.nodes, &self.input).shape;
        let k = self.spec.classes;
        if labels.len() != shape.n {
            bail!("{} labels for a batch of {}", labels.len(), shape.n);
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= k) {
            bail!("label {bad} is out of range: the model has {k} classes");
        }
        ensure_full(&self.be, &mut self.probs, shape);
        self.labels = labels.to_vec();
        self.smoothing = smoothing;
        Ok(k)
    }

    /// Sets every parameter gradient to zero.
    pub fn zero_grad(&mut self) {
        let be = &self.be;
        visit_nodes(&mut self.nodes, &mut |_, slot| {
            if let Slot::Param(p) = slot {
                be.fill_zero(&mut p.grad);
            }
        });
    }

    /// Backpropagates the last [`loss`](Self::loss), accumulating into the gradients.
    pub fn backward(&mut self) -> Result<()> {
        let k = self.spec.classes;
        let mut dlogits = self.be.zeros(self.labels.len() * k);
        self.be.cross_entropy_backward(
            &mut dlogits,
            &self.probs.buf,
            &self.labels,
            k,
            self.smoothing,
        );
        let ctx = Ctx {
            be: &self.be,
            train: true,
            bn: self.spec.bn,
            schedule: self.effective_schedule(),
            profile: self.profile,
            sync_bn: self.sync_bn.as_deref(),
        };
        backward_seq(&mut self.nodes, &self.input, dlogits, false, &ctx);
        self.check_sync()?;
        self.be.status()
    }

    /// One SGD step over every parameter.
    pub fn sgd_step(&mut self, opt: &Sgd) {
        let first = self.sgd_steps == 0;
        let mut params = Vec::new();
        collect_params(&mut self.nodes, &mut params);
        let mut params: Vec<SgdParam<B::Buf>> = params
            .into_iter()
            .map(|p| SgdParam { value: &mut p.value, grad: &mut p.grad, momentum: &mut p.momentum })
            .collect();
        self.be.sgd_step_all(&mut params, first, opt);
        self.sgd_steps += 1;
    }

    /// zero_grad, forward (train), loss, backward, SGD: one training step. Returns the loss
    /// and the logits.
    pub fn train_step(
        &mut self, x: &[T], labels: &[u32], opt: &Sgd, smoothing: f64,
    ) -> Result<(f64, Vec<T>)> {
        self.zero_grad();
        let logits = self.forward(x, labels.len(), true)?;
        let loss = self.loss(labels, smoothing)?;
        self.backward()?;
        self.sgd_step(opt);
        Ok((loss, logits))
    }

    /// Visits every named tensor in `state_dict()` order.
    pub fn visit(&mut self, f: &mut dyn FnMut(String, Slot<B::Buf>)) {
        visit_nodes(&mut self.nodes, f);
    }

    /// The last forward's output of the module at `path` (PyTorch module path, e.g. `block3.0`
    /// or `block3.0.branch2_conv2`), copied to the host with its shape.
    pub fn activation(&self, path: &str) -> Option<(Vec<T>, Nhwc)> {
        let prefix = format!("{path}.");
        let mut found = None;
        for node in &self.nodes {
            node.find(path, &prefix, &mut found);
        }
        found.map(|a| (self.be.download(&a.buf), a.shape))
    }

    /// Every named tensor with its value, in `state_dict()` order (parameters, running
    /// statistics, batch counters).
    pub fn state(&mut self) -> Vec<(TensorInfo, HostTensor<T>)> {
        let infos = self.spec.tensors();
        let be = &self.be;
        let mut values = Vec::with_capacity(infos.len());
        visit_nodes(&mut self.nodes, &mut |_, slot| {
            values.push(match slot {
                Slot::Param(p) => HostTensor::Float(be.download(&p.value)),
                Slot::RunningStat(s) => HostTensor::Float(be.download(s)),
                Slot::Count(c) => HostTensor::Int(*c),
            })
        });
        infos.into_iter().zip(values).collect()
    }

    /// Every parameter gradient, in `state_dict()` order.
    pub fn grads(&mut self) -> Vec<(String, Vec<T>)> {
        self.download_params(|p| &p.grad)
    }

    /// Hands every parameter gradient to `f` as one flat host vector (in `state_dict()` order)
    /// and puts back what `f` leaves there: how a data-parallel step sums them over the ranks
    /// (one exchange for the whole model rather than one per tensor).
    pub fn update_grads(&mut self, f: impl FnOnce(&mut Vec<T>) -> Result<()>) -> Result<()> {
        let grads = self.download_params(|p| &p.grad);
        let lens: Vec<usize> = grads.iter().map(|(_, g)| g.len()).collect();
        let mut flat: Vec<T> = grads.into_iter().flat_map(|(_, g)| g).collect();
        let total = flat.len();
        f(&mut flat)?;
        if flat.len() != total {
            bail!("the flat gradient changed size from {total} to {} values", flat.len());
        }
        let be = &self.be;
        let (mut at, mut lens) = (0, lens.into_iter());
        visit_nodes(&mut self.nodes, &mut |_, slot| {
            if let Slot::Param(p) = slot {
                let n = lens.next().expect("one length per parameter, read above");
                p.grad = be.upload(&flat[at..at + n]);
                at += n;
            }
        });
        Ok(())
    }

    /// Averages every parameter gradient over the data-parallel ranks with the backend's own
    /// collective (see [`Backend::average_over_ranks`]); `false`: the backend has none.
    pub fn average_grads_on_device(&mut self) -> Result<bool> {
        let mut params = Vec::new();
        collect_params(&mut self.nodes, &mut params);
        let mut grads: Vec<&mut B::Buf> = params.into_iter().map(|p| &mut p.grad).collect();
        self.be.average_over_ranks(&mut grads)
    }

    /// `pick`'s buffer of every parameter, downloaded, in `state_dict()` order.
    fn download_params(
        &mut self, pick: impl Fn(&Param<B::Buf>) -> &B::Buf,
    ) -> Vec<(String, Vec<T>)> {
        let be = &self.be;
        let mut out = Vec::new();
        visit_nodes(&mut self.nodes, &mut |name, slot| {
            if let Slot::Param(p) = slot {
                out.push((name, be.download(pick(p))));
            }
        });
        out
    }

    /// Time per layer accumulated while [`Net::profile`] was on, in execution order (branch
    /// layers before their block's join). Meaningful with the sequential branch schedule and
    /// a backend that finishes its work before returning (the CPU).
    pub fn layer_times(&self) -> Vec<LayerTime> {
        let mut out = Vec::new();
        collect_times(&self.nodes, &mut out);
        out
    }

    /// Clears the accumulated layer times.
    pub fn reset_layer_times(&mut self) {
        reset_times(&mut self.nodes);
    }

    /// Every SGD momentum buffer, in `state_dict()` order of its parameter.
    pub fn momentum(&mut self) -> Vec<(String, Vec<T>)> {
        self.download_params(|p| &p.momentum)
    }

    /// Replaces every momentum buffer with what `get(name, len)` returns; all or nothing.
    pub fn set_momentum(
        &mut self, mut get: impl FnMut(&str, usize) -> Result<Vec<T>>,
    ) -> Result<()> {
        let mut loaded = Vec::new();
        for info in self.spec.tensors() {
            if info.kind == TensorKind::Param {
                let v = get(&info.name, info.numel())?;
                if v.len() != info.numel() {
                    bail!(
                        "momentum of {} has {} values, expected {}",
                        info.name,
                        v.len(),
                        info.numel()
                    );
                }
                loaded.push(v);
            }
        }
        let be = &self.be;
        let mut it = loaded.into_iter();
        visit_nodes(&mut self.nodes, &mut |_, slot| {
            if let Slot::Param(p) = slot {
                let v = it.next().expect("one buffer per parameter, checked above");
                p.momentum = be.upload(&v);
            }
        });
        Ok(())
    }

    /// Replaces every named tensor with the one `get` returns for it; `get` sees the expected
    /// name, shape and kind and reports a missing or mismatched tensor as an error.
    pub fn load_state(
        &mut self, mut get: impl FnMut(&TensorInfo) -> Result<HostTensor<T>>,
    ) -> Result<()> {
        let infos = self.spec.tensors();
        let mut loaded = Vec::with_capacity(infos.len());
        for info in &infos {
            let t = get(info)?;
            match (&t, info.kind) {
                (HostTensor::Float(v), TensorKind::Param | TensorKind::RunningStat)
                    if v.len() == info.numel() => {}
                (HostTensor::Int(_), TensorKind::Count) => {}
                _ => bail!(
                    "tensor {} does not have the expected type and shape {:?}",
                    info.name,
                    info.shape
                ),
            }
            loaded.push(t);
        }
        // Everything checked: only now overwrite, so a failed load leaves the model as it was.
        let be = &self.be;
        let mut it = loaded.into_iter();
        visit_nodes(&mut self.nodes, &mut |_, slot| match (slot, it.next()) {
            (Slot::Param(p), Some(HostTensor::Float(v))) => p.value = be.upload(&v),
            (Slot::RunningStat(s), Some(HostTensor::Float(v))) => *s = be.upload(&v),
            (Slot::Count(c), Some(HostTensor::Int(v))) => *c = v,
            _ => unreachable!("visit order matches ModelSpec::tensors"),
        });
        Ok(())
    }
}
