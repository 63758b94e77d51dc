//! The network instantiated on a backend: parameters, gradients, momentum buffers, saved
//! activations, and the forward/backward walk over the [`ModelSpec`].
//!
//! Each layer keeps its own output (the next layer's input) for the backward, so the walk is
//! a plain loop forward and the same loop reversed. An Inception block hands its input to the
//! branch scheduler, which runs the branches; the block then joins them in branch order.

use super::{Layer, ModelSpec, TensorInfo, TensorKind};
use crate::backend::{Backend, BatchNormCfg, Conv2d, Elem, MaxPool2d, Nhwc, Sgd, SgdParam};
use crate::schedule::{run_branches, BranchSchedule};
use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use std::marker::PhantomData;

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

enum Op<Buf> {
    Conv {
        conv: Conv2d,
        w: Param<Buf>,
        b: Param<Buf>,
    },
    BatchNorm {
        w: Param<Buf>,
        b: Param<Buf>,
        running_mean: Buf,
        running_var: Buf,
        num_batches_tracked: i64,
        /// Batch mean and 1/√(var+eps) of the last training forward.
        mean: Buf,
        invstd: Buf,
        /// The ReLU that follows in the model runs inside this node (one pass over the data);
        /// the node's output is the ReLU's.
        relu: bool,
    },
    Relu,
    MaxPool {
        pool: MaxPool2d,
    },
    Inception {
        branches: Vec<Vec<Node<Buf>>>,
    },
    AvgPool2,
    Linear {
        fin: usize,
        fout: usize,
        w: Param<Buf>,
        b: Param<Buf>,
    },
}

struct Node<Buf> {
    name: String,
    /// The name of a layer fused into this node (the ReLU after a BatchNorm), whose output
    /// this node's output is.
    alias: Option<String>,
    op: Op<Buf>,
    out: Act<Buf>,
    /// Seconds spent in forward and backward since the last profile reset (with profiling on).
    time: [f64; 2],
}

/// What every layer needs to know besides its own state.
struct Ctx<'a, B> {
    be: &'a B,
    train: bool,
    bn: BatchNormCfg,
    schedule: BranchSchedule,
    profile: bool,
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
    _elem: PhantomData<T>,
}

/// PyTorch's default init for conv and linear layers: kaiming_uniform(a=√5) for the weight,
/// which is U(±1/√fan_in), and U(±1/√fan_in) for the bias.
fn uniform<T: Elem>(rng: &mut impl Rng, len: usize, fan_in: usize) -> Vec<T> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    (0..len)
        .map(|_| T::cast(rng.random_range(-bound..bound)))
        .collect()
}

fn param<T: Elem, B: Backend<T>>(be: &B, value: Vec<T>) -> Param<B::Buf> {
    Param {
        grad: be.zeros(value.len()),
        momentum: be.zeros(value.len()),
        value: be.upload(&value),
    }
}

/// Every BatchNorm directly followed by a ReLU becomes one node doing both (after the
/// parameters are drawn, so the initialisation is the model's). PyTorch's module paths stay
/// reachable: the ReLU's name is the fused node's alias.
fn fuse_bn_relu<Buf>(nodes: Vec<Node<Buf>>) -> Vec<Node<Buf>> {
    let mut out: Vec<Node<Buf>> = Vec::with_capacity(nodes.len());
    for node in nodes {
        if let (Op::Relu, Some(prev)) = (&node.op, out.last_mut()) {
            if let Op::BatchNorm {
                relu: fused @ false,
                ..
            } = &mut prev.op
            {
                *fused = true;
                prev.alias = Some(node.name);
                continue;
            }
        }
        out.push(node);
    }
    out
}

fn build<T: Elem, B: Backend<T>>(
    be: &B,
    layers: &[Layer],
    rng: &mut impl Rng,
) -> Vec<Node<B::Buf>> {
    let nodes = build_layers(be, layers, rng);
    fuse_bn_relu(nodes)
}

fn build_layers<T: Elem, B: Backend<T>>(
    be: &B,
    layers: &[Layer],
    rng: &mut impl Rng,
) -> Vec<Node<B::Buf>> {
    layers
        .iter()
        .map(|layer| {
            let (name, op) = match layer {
                Layer::Conv { name, conv } => {
                    let fan_in = conv.cin * conv.k * conv.k;
                    let w = param(be, uniform::<T>(rng, conv.weight_len(), fan_in));
                    let b = param(be, uniform::<T>(rng, conv.cout, fan_in));
                    (name, Op::Conv { conv: *conv, w, b })
                }
                Layer::BatchNorm { name, channels } => {
                    let c = *channels;
                    let op = Op::BatchNorm {
                        w: param(be, vec![T::one(); c]),
                        b: param(be, vec![T::zero(); c]),
                        running_mean: be.zeros(c),
                        running_var: be.upload(&vec![T::one(); c]),
                        num_batches_tracked: 0,
                        mean: be.zeros(c),
                        invstd: be.zeros(c),
                        relu: false,
                    };
                    (name, op)
                }
                Layer::Relu { name } => (name, Op::Relu),
                Layer::MaxPool { name, pool } => (name, Op::MaxPool { pool: *pool }),
                Layer::Inception { name, branches } => {
                    let branches = branches.iter().map(|b| build(be, &b.layers, rng)).collect();
                    (name, Op::Inception { branches })
                }
                Layer::AvgPool2 { name } => (name, Op::AvgPool2),
                Layer::Linear { name, fin, fout } => {
                    let w = param(be, uniform::<T>(rng, fin * fout, *fin));
                    let b = param(be, uniform::<T>(rng, *fout, *fin));
                    (
                        name,
                        Op::Linear {
                            fin: *fin,
                            fout: *fout,
                            w,
                            b,
                        },
                    )
                }
            };
            Node {
                name: name.clone(),
                alias: None,
                op,
                out: Act {
                    buf: be.zeros(0),
                    shape: Nhwc::new(0, 0, 0, 0),
                },
                time: [0.0; 2],
            }
        })
        .collect()
}

/// Gives the activation `act` the shape `shape`, reallocating only when the shape changes.
fn ensure<T: Elem, B: Backend<T>>(be: &B, act: &mut Act<B::Buf>, shape: Nhwc) {
    if act.shape != shape {
        act.buf = be.act_zeros(shape.len());
        act.shape = shape;
    }
}

/// [`ensure`] for the logits and the softmax, which stay in full precision on every backend
/// (mixed-precision training computes the loss in fp32, as autocast does).
fn ensure_full<T: Elem, B: Backend<T>>(be: &B, act: &mut Act<B::Buf>, shape: Nhwc) {
    if act.shape != shape {
        act.buf = be.zeros(shape.len());
        act.shape = shape;
    }
}

impl<Buf: Send + Sync> Node<Buf> {
    fn forward<T: Elem, B: Backend<T, Buf = Buf>>(
        &mut self,
        x: &Act<Buf>,
        ctx: &Ctx<B>,
    ) -> Result<()> {
        let be = ctx.be;
        let xs = x.shape;
        match &mut self.op {
            Op::Conv { conv, w, b } => {
                ensure(be, &mut self.out, conv.out_shape(xs));
                be.conv2d_forward(&mut self.out.buf, &x.buf, &w.value, &b.value, xs, conv);
            }
            Op::BatchNorm {
                w,
                b,
                running_mean,
                running_var,
                num_batches_tracked,
                mean,
                invstd,
                relu,
            } => {
                ensure(be, &mut self.out, xs);
                if ctx.train {
                    let f = if *relu {
                        B::batch_norm_relu_forward_train
                    } else {
                        B::batch_norm_forward_train
                    };
                    f(
                        be,
                        &mut self.out.buf,
                        mean,
                        invstd,
                        running_mean,
                        running_var,
                        &x.buf,
                        &w.value,
                        &b.value,
                        xs,
                        &ctx.bn,
                    )
                    .with_context(|| format!("layer {}", self.name))?;
                    *num_batches_tracked += 1;
                } else {
                    let f = if *relu {
                        B::batch_norm_relu_forward_eval
                    } else {
                        B::batch_norm_forward_eval
                    };
                    f(
                        be,
                        &mut self.out.buf,
                        &x.buf,
                        &w.value,
                        &b.value,
                        running_mean,
                        running_var,
                        xs,
                        &ctx.bn,
                    );
                }
            }
            Op::Relu => {
                ensure(be, &mut self.out, xs);
                be.relu_forward(&mut self.out.buf, &x.buf);
            }
            Op::MaxPool { pool } => {
                ensure(be, &mut self.out, pool.out_shape(xs));
                be.max_pool2d_forward(&mut self.out.buf, &x.buf, xs, pool);
            }
            Op::Inception { branches } => {
                be.branches_begin(branches.len());
                let results = run_branches(ctx.schedule, branches, |i, nodes| {
                    be.branch(Some(i));
                    be.range_push(&format!("{}/branch{}", self.name, i + 1));
                    let r = forward_seq(nodes, x, ctx);
                    be.range_pop();
                    r
                });
                be.branch(None);
                be.branches_end(branches.len());
                results.into_iter().collect::<Result<Vec<()>>>()?;
                let outs: Vec<&Act<Buf>> = branches.iter().map(|b| last_out(b, x)).collect();
                let channels: Vec<usize> = outs.iter().map(|o| o.shape.c).collect();
                let s = outs[0].shape;
                ensure(
                    be,
                    &mut self.out,
                    Nhwc::new(s.n, s.h, s.w, channels.iter().sum()),
                );
                let parts: Vec<&Buf> = outs.iter().map(|o| &o.buf).collect();
                be.concat_forward(&mut self.out.buf, &parts, &channels);
            }
            Op::AvgPool2 => {
                ensure(be, &mut self.out, Nhwc::new(xs.n, xs.h / 2, xs.w / 2, xs.c));
                be.avg_pool2d_forward(&mut self.out.buf, &x.buf, xs);
            }
            Op::Linear { fin, fout, w, b } => {
                ensure_full(be, &mut self.out, Nhwc::new(xs.n, 1, 1, *fout));
                be.linear_forward(
                    &mut self.out.buf,
                    &x.buf,
                    &w.value,
                    &b.value,
                    xs.n,
                    *fin,
                    *fout,
                );
            }
        }
        Ok(())
    }

    /// Takes ∂L/∂out, accumulates parameter gradients, returns ∂L/∂x when `need_dx`.
    fn backward<T: Elem, B: Backend<T, Buf = Buf>>(
        &mut self,
        x: &Act<Buf>,
        mut dy: Buf,
        need_dx: bool,
        ctx: &Ctx<B>,
    ) -> Option<Buf> {
        let be = ctx.be;
        let xs = x.shape;
        match &mut self.op {
            Op::Conv { conv, w, b } => {
                let mut dx = need_dx.then(|| be.act_zeros(xs.len()));
                be.conv2d_backward(
                    dx.as_mut(),
                    &mut w.grad,
                    &mut b.grad,
                    &dy,
                    &x.buf,
                    &w.value,
                    xs,
                    conv,
                );
                dx
            }
            Op::BatchNorm {
                w,
                b,
                mean,
                invstd,
                relu: true,
                ..
            } => {
                let mut dx = be.act_zeros(xs.len());
                be.batch_norm_relu_backward(
                    &mut dx,
                    &mut w.grad,
                    &mut b.grad,
                    &mut dy,
                    &self.out.buf,
                    &x.buf,
                    &w.value,
                    mean,
                    invstd,
                    xs,
                );
                Some(dx)
            }
            Op::BatchNorm {
                w, b, mean, invstd, ..
            } => {
                let mut dx = be.act_zeros(xs.len());
                be.batch_norm_backward(
                    &mut dx,
                    &mut w.grad,
                    &mut b.grad,
                    &dy,
                    &x.buf,
                    &w.value,
                    mean,
                    invstd,
                    xs,
                );
                Some(dx)
            }
            Op::Relu => {
                be.relu_backward(&mut dy, &self.out.buf);
                Some(dy)
            }
            Op::MaxPool { pool } => {
                let mut dx = be.act_zeros(xs.len());
                be.max_pool2d_backward(&mut dx, &dy, &x.buf, &self.out.buf, xs, pool);
                Some(dx)
            }
            Op::Inception { branches } => {
                let channels: Vec<usize> =
                    branches.iter().map(|b| last_out(b, x).shape.c).collect();
                let pixels = self.out.shape.pixels();
                let mut dparts: Vec<Buf> =
                    channels.iter().map(|c| be.act_zeros(pixels * c)).collect();
                {
                    let mut refs: Vec<&mut Buf> = dparts.iter_mut().collect();
                    be.concat_backward(&mut refs, &dy, &channels);
                }
                let mut work: Vec<(&mut Vec<Node<Buf>>, Option<Buf>)> = branches
                    .iter_mut()
                    .zip(dparts.into_iter().map(Some))
                    .collect();
                be.branches_begin(work.len());
                let dxs = run_branches(ctx.schedule, &mut work, |i, (nodes, d)| {
                    let d = d.take().expect("each branch gradient is used once");
                    be.branch(Some(i));
                    be.range_push(&format!("{}/branch{}", self.name, i + 1));
                    let r = backward_seq(nodes, x, d, need_dx, ctx);
                    be.range_pop();
                    r
                });
                be.branch(None);
                be.branches_end(dxs.len());
                if !need_dx {
                    return None;
                }
                let dxs: Vec<Buf> = dxs
                    .into_iter()
                    .map(|d| d.expect("branch input gradient"))
                    .collect();
                let mut dx = be.act_zeros(xs.len());
                be.fork_backward(&mut dx, &dxs.iter().collect::<Vec<_>>());
                Some(dx)
            }
            Op::AvgPool2 => {
                let mut dx = be.act_zeros(xs.len());
                be.avg_pool2d_backward(&mut dx, &dy, xs);
                Some(dx)
            }
            Op::Linear { fin, fout, w, b } => {
                let mut dx = need_dx.then(|| be.act_zeros(xs.len()));
                be.linear_backward(
                    dx.as_mut(),
                    &mut w.grad,
                    &mut b.grad,
                    &dy,
                    &x.buf,
                    &w.value,
                    xs.n,
                    *fin,
                    *fout,
                );
                dx
            }
        }
    }

    /// Visits every named tensor in `state_dict()` order.
    fn visit(&mut self, f: &mut dyn FnMut(String, Slot<Buf>)) {
        let name = &self.name;
        match &mut self.op {
            Op::Conv { w, b, .. } | Op::Linear { w, b, .. } => {
                f(format!("{name}.weight"), Slot::Param(w));
                f(format!("{name}.bias"), Slot::Param(b));
            }
            Op::BatchNorm {
                w,
                b,
                running_mean,
                running_var,
                num_batches_tracked,
                ..
            } => {
                f(format!("{name}.weight"), Slot::Param(w));
                f(format!("{name}.bias"), Slot::Param(b));
                f(
                    format!("{name}.running_mean"),
                    Slot::RunningStat(running_mean),
                );
                f(
                    format!("{name}.running_var"),
                    Slot::RunningStat(running_var),
                );
                f(
                    format!("{name}.num_batches_tracked"),
                    Slot::Count(num_batches_tracked),
                );
            }
            Op::Inception { branches } => {
                for node in branches.iter_mut().flatten() {
                    node.visit(f);
                }
            }
            Op::Relu | Op::MaxPool { .. } | Op::AvgPool2 => {}
        }
    }

    /// The output of the module at `path`: the node of that name, else the last node inside
    /// it (a `Sequential`'s output is its last layer's), searched in execution order.
    fn find<'a>(&'a self, path: &str, prefix: &str, found: &mut Option<&'a Act<Buf>>) {
        if let Op::Inception { branches } = &self.op {
            for node in branches.iter().flatten() {
                node.find(path, prefix, found);
            }
        }
        if self.name == path || self.name.starts_with(prefix) || self.alias.as_deref() == Some(path)
        {
            *found = Some(&self.out);
        }
    }
}

fn visit_nodes<Buf: Send + Sync>(nodes: &mut [Node<Buf>], f: &mut dyn FnMut(String, Slot<Buf>)) {
    for node in nodes {
        node.visit(f);
    }
}

/// Every parameter, in `state_dict()` order.
fn collect_params<'a, Buf>(nodes: &'a mut [Node<Buf>], out: &mut Vec<&'a mut Param<Buf>>) {
    for node in nodes {
        match &mut node.op {
            Op::Conv { w, b, .. } | Op::Linear { w, b, .. } | Op::BatchNorm { w, b, .. } => {
                out.push(w);
                out.push(b);
            }
            Op::Inception { branches } => {
                for branch in branches {
                    collect_params(branch, out);
                }
            }
            Op::Relu | Op::MaxPool { .. } | Op::AvgPool2 => {}
        }
    }
}

fn last_out<'a, Buf>(nodes: &'a [Node<Buf>], input: &'a Act<Buf>) -> &'a Act<Buf> {
    nodes.last().map_or(input, |n| &n.out)
}

fn forward_seq<T: Elem, B: Backend<T>>(
    nodes: &mut [Node<B::Buf>],
    input: &Act<B::Buf>,
    ctx: &Ctx<B>,
) -> Result<()> {
    let mut i = 0;
    while i < nodes.len() {
        let (done, rest) = nodes.split_at_mut(i);
        let t = ctx.profile.then(std::time::Instant::now);
        ctx.be.range_push(&rest[0].name);
        // In evaluation, Conv → BatchNorm+ReLU may run as one op (the time goes to the conv).
        let fused = !ctx.train && fused_conv_bn_relu_eval(rest, last_out(done, input), ctx);
        let r = if fused {
            Ok(())
        } else {
            rest[0].forward(last_out(done, input), ctx)
        };
        ctx.be.range_pop();
        r?;
        if let Some(t) = t {
            rest[0].time[0] += t.elapsed().as_secs_f64();
        }
        i += if fused { 2 } else { 1 };
    }
    Ok(())
}

/// Runs `nodes[0..2]` as one eval-mode Conv → BatchNorm+ReLU when they are that pair and the
/// backend fuses it, writing the BatchNorm node's output (the conv's own stays stale: nothing
/// reads it in evaluation). `false`: nothing was run.
fn fused_conv_bn_relu_eval<T: Elem, B: Backend<T>>(
    nodes: &mut [Node<B::Buf>],
    x: &Act<B::Buf>,
    ctx: &Ctx<B>,
) -> bool {
    let [conv_node, bn_node, ..] = nodes else {
        return false;
    };
    let (
        Op::Conv { conv, w, b },
        Op::BatchNorm {
            w: gamma,
            b: beta,
            running_mean,
            running_var,
            relu: true,
            ..
        },
    ) = (&conv_node.op, &bn_node.op)
    else {
        return false;
    };
    ensure(ctx.be, &mut bn_node.out, conv.out_shape(x.shape));
    ctx.be.conv2d_batch_norm_relu_forward_eval(
        &mut bn_node.out.buf,
        &x.buf,
        (&w.value, &b.value),
        (&gamma.value, &beta.value, running_mean, running_var),
        x.shape,
        conv,
        &ctx.bn,
    )
}

fn backward_seq<T: Elem, B: Backend<T>>(
    nodes: &mut [Node<B::Buf>],
    input: &Act<B::Buf>,
    dy: B::Buf,
    need_dx: bool,
    ctx: &Ctx<B>,
) -> Option<B::Buf> {
    let mut grad = dy;
    for i in (0..nodes.len()).rev() {
        let (before, rest) = nodes.split_at_mut(i);
        let need = i > 0 || need_dx;
        let t = ctx.profile.then(std::time::Instant::now);
        ctx.be.range_push(&rest[0].name);
        let g = rest[0].backward(last_out(before, input), grad, need, ctx);
        ctx.be.range_pop();
        if let Some(t) = t {
            rest[0].time[1] += t.elapsed().as_secs_f64();
        }
        grad = g?;
    }
    Some(grad)
}

/// Time spent in one layer, from [`Net::profile`].
#[derive(Clone, Debug)]
pub struct LayerTime {
    /// PyTorch module path; an Inception block's own entry is its join (concat, gradient sum).
    pub name: String,
    pub op: &'static str,
    pub forward_s: f64,
    pub backward_s: f64,
    /// Multiply-adds ×2 of one forward at the last batch (convolutions and linear only).
    pub forward_flop: f64,
    /// The convolution, for a conv layer.
    pub conv: Option<Conv2d>,
}

fn collect_times<Buf>(nodes: &[Node<Buf>], out: &mut Vec<LayerTime>) -> [f64; 2] {
    let mut total = [0.0; 2];
    for node in nodes {
        let (op, flop, inner) = match &node.op {
            Op::Conv { conv, .. } => {
                let s = node.out.shape;
                (
                    "conv",
                    2.0 * (s.len() * conv.cin * conv.k * conv.k) as f64,
                    [0.0; 2],
                )
            }
            Op::BatchNorm { relu: true, .. } => ("batch_norm_relu", 0.0, [0.0; 2]),
            Op::BatchNorm { .. } => ("batch_norm", 0.0, [0.0; 2]),
            Op::Relu => ("relu", 0.0, [0.0; 2]),
            Op::MaxPool { .. } => ("max_pool", 0.0, [0.0; 2]),
            Op::AvgPool2 => ("avg_pool", 0.0, [0.0; 2]),
            Op::Linear { fin, .. } => (
                "linear",
                2.0 * (node.out.shape.len() * fin) as f64,
                [0.0; 2],
            ),
            Op::Inception { branches } => {
                let mut inner = [0.0; 2];
                for b in branches {
                    let t = collect_times(b, out);
                    inner[0] += t[0];
                    inner[1] += t[1];
                }
                ("join", 0.0, inner)
            }
        };
        out.push(LayerTime {
            name: node.name.clone(),
            op,
            forward_s: (node.time[0] - inner[0]).max(0.0),
            backward_s: (node.time[1] - inner[1]).max(0.0),
            forward_flop: flop,
            conv: match &node.op {
                Op::Conv { conv, .. } => Some(*conv),
                _ => None,
            },
        });
        total[0] += node.time[0];
        total[1] += node.time[1];
    }
    total
}

fn reset_times<Buf>(nodes: &mut [Node<Buf>]) {
    for node in nodes {
        node.time = [0.0; 2];
        if let Op::Inception { branches } = &mut node.op {
            for b in branches {
                reset_times(b);
            }
        }
    }
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
        spec.shapes(2)
            .context("the model description is inconsistent")?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let nodes = build::<T, B>(&be, &spec.layers, &mut rng);
        Ok(Net {
            spec,
            schedule: BranchSchedule::default(),
            input: Act {
                buf: be.zeros(0),
                shape: Nhwc::new(0, 0, 0, 0),
            },
            probs: Act {
                buf: be.zeros(0),
                shape: Nhwc::new(0, 0, 0, 0),
            },
            labels: Vec::new(),
            smoothing: 0.0,
            nodes,
            be,
            sgd_steps: 0,
            profile: false,
            _elem: PhantomData,
        })
    }

    pub fn backend(&self) -> &B {
        &self.be
    }

    /// [`Net::schedule`], or sequential where the backend needs its branches issued from one
    /// thread.
    fn effective_schedule(&self) -> BranchSchedule {
        if self.be.issues_from_one_thread() {
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
    /// [`Backend::act_zeros`] stores activations), e.g. a batch a data kernel built there.
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
        };
        forward_seq(&mut self.nodes, &self.input, &ctx)?;
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
        StepCounters {
            batches,
            sgd_steps: self.sgd_steps,
        }
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
        let logits = last_out(&self.nodes, &self.input);
        let k = self.spec.classes;
        if labels.len() != logits.shape.n {
            bail!("{} labels for a batch of {}", labels.len(), logits.shape.n);
        }
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= k) {
            bail!("label {bad} is out of range: the model has {k} classes");
        }
        ensure_full(&self.be, &mut self.probs, logits.shape);
        let loss =
            self.be
                .cross_entropy_forward(&mut self.probs.buf, &logits.buf, labels, k, smoothing);
        self.labels = labels.to_vec();
        self.smoothing = smoothing;
        // Reading the loss back is where a device reports what failed in the step so far: that
        // failure, not the NaN that stands in for the loss, is the error.
        self.be.status()?;
        Ok(loss)
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
        };
        backward_seq(&mut self.nodes, &self.input, dlogits, false, &ctx);
        self.be.status()
    }

    /// One SGD step over every parameter.
    pub fn sgd_step(&mut self, opt: &Sgd) {
        let first = self.sgd_steps == 0;
        let mut params = Vec::new();
        collect_params(&mut self.nodes, &mut params);
        let mut params: Vec<SgdParam<B::Buf>> = params
            .into_iter()
            .map(|p| SgdParam {
                value: &mut p.value,
                grad: &mut p.grad,
                momentum: &mut p.momentum,
            })
            .collect();
        self.be.sgd_step_all(&mut params, first, opt);
        self.sgd_steps += 1;
    }

    /// zero_grad, forward (train), loss, backward, SGD: one training step. Returns the loss
    /// and the logits.
    pub fn train_step(
        &mut self,
        x: &[T],
        labels: &[u32],
        opt: &Sgd,
        smoothing: f64,
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
        let be = &self.be;
        let mut out = Vec::new();
        visit_nodes(&mut self.nodes, &mut |name, slot| {
            if let Slot::Param(p) = slot {
                out.push((name, be.download(&p.grad)));
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
        let be = &self.be;
        let mut out = Vec::new();
        visit_nodes(&mut self.nodes, &mut |name, slot| {
            if let Slot::Param(p) = slot {
                out.push((name, be.download(&p.momentum)));
            }
        });
        out
    }

    /// Replaces every momentum buffer with what `get(name, len)` returns; all or nothing.
    pub fn set_momentum(
        &mut self,
        mut get: impl FnMut(&str, usize) -> Result<Vec<T>>,
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
        &mut self,
        mut get: impl FnMut(&TensorInfo) -> Result<HostTensor<T>>,
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
