//! The network's nodes: one per layer (an Inception block holds its branches as nodes), each
//! with its parameters and saved output, and the forward and backward of each op kind.

use super::*;

pub(super) enum Op<Buf> {
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

pub(super) struct Node<Buf> {
    pub(super) name: String,
    /// The name of a layer fused into this node (the ReLU after a BatchNorm), whose output
    /// this node's output is.
    pub(super) alias: Option<String>,
    pub(super) op: Op<Buf>,
    pub(super) out: Act<Buf>,
    /// Seconds spent in forward and backward since the last profile reset (with profiling on).
    pub(super) time: [f64; 2],
}

/// What every layer needs to know besides its own state.
pub(super) struct Ctx<'a, B> {
    pub(super) be: &'a B,
    pub(super) train: bool,
    pub(super) bn: BatchNormCfg,
    pub(super) schedule: BranchSchedule,
    pub(super) profile: bool,
    /// SyncBatchNorm's link to the other ranks, in training.
    pub(super) sync_bn: Option<&'a dyn BatchNormSync>,
}

impl<Buf: Send + Sync> Node<Buf> {
    pub(super) fn forward<T: Elem, B: Backend<T, Buf = Buf>>(
        &mut self, x: &Act<Buf>, ctx: &Ctx<B>,
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
                let affine = Affine { gamma: &w.value, beta: &b.value };
                if ctx.train {
                    be.batch_norm_forward_train(
                        &mut self.out.buf,
                        &x.buf,
                        affine,
                        RunningStats { mean: running_mean, var: running_var },
                        BatchStats { mean, invstd },
                        xs,
                        &ctx.bn,
                        *relu,
                        ctx.sync_bn,
                    )
                    .with_context(|| format!("layer {}", self.name))?;
                    *num_batches_tracked += 1;
                } else {
                    let running = RunningStats { mean: &*running_mean, var: &*running_var };
                    be.batch_norm_forward_eval(
                        &mut self.out.buf,
                        &x.buf,
                        affine,
                        running,
                        xs,
                        &ctx.bn,
                        *relu,
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
                ensure(be, &mut self.out, Nhwc::new(s.n, s.h, s.w, channels.iter().sum()));
                let parts: Vec<&Buf> = outs.iter().map(|o| &o.buf).collect();
                be.concat_forward(&mut self.out.buf, &parts, &channels);
            }
            Op::AvgPool2 => {
                ensure(be, &mut self.out, Nhwc::new(xs.n, xs.h / 2, xs.w / 2, xs.c));
                be.avg_pool2d_forward(&mut self.out.buf, &x.buf, xs);
            }
            Op::Linear { fin, fout, w, b } => {
                ensure_full(be, &mut self.out, Nhwc::new(xs.n, 1, 1, *fout));
                be.linear_forward(&mut self.out.buf, &x.buf, &w.value, &b.value, xs.n, *fin, *fout);
            }
        }
        Ok(())
    }

    /// Takes ∂L/∂out, accumulates parameter gradients, returns ∂L/∂x when `need_dx`.
    pub(super) fn backward<T: Elem, B: Backend<T, Buf = Buf>>(
        &mut self, x: &Act<Buf>, mut dy: Buf, need_dx: bool, ctx: &Ctx<B>,
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
            Op::BatchNorm { w, b, mean, invstd, relu, .. } => {
                let mut dx = be.act_zeros(xs.len());
                be.batch_norm_backward(
                    &mut dx,
                    Affine { gamma: &mut w.grad, beta: &mut b.grad },
                    &dy,
                    relu.then_some(&self.out.buf),
                    &x.buf,
                    &w.value,
                    BatchStats { mean, invstd },
                    xs,
                    ctx.sync_bn,
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
                inception_backward((&self.name, self.out.shape), branches, x, dy, need_dx, ctx)
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
            Op::BatchNorm { w, b, running_mean, running_var, num_batches_tracked, .. } => {
                f(format!("{name}.weight"), Slot::Param(w));
                f(format!("{name}.bias"), Slot::Param(b));
                f(format!("{name}.running_mean"), Slot::RunningStat(running_mean));
                f(format!("{name}.running_var"), Slot::RunningStat(running_var));
                f(format!("{name}.num_batches_tracked"), Slot::Count(num_batches_tracked));
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
    pub(super) fn find<'a>(&'a self, path: &str, prefix: &str, found: &mut Option<&'a Act<Buf>>) {
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

pub(super) fn visit_nodes<Buf: Send + Sync>(
    nodes: &mut [Node<Buf>], f: &mut dyn FnMut(String, Slot<Buf>),
) {
    for node in nodes {
        node.visit(f);
    }
}

/// Every parameter, in `state_dict()` order.
pub(super) fn collect_params<'a, Buf>(
    nodes: &'a mut [Node<Buf>], out: &mut Vec<&'a mut Param<Buf>>,
) {
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

pub(super) fn last_out<'a, Buf>(nodes: &'a [Node<Buf>], input: &'a Act<Buf>) -> &'a Act<Buf> {
    nodes.last().map_or(input, |n| &n.out)
}

pub(super) fn forward_seq<T: Elem, B: Backend<T>>(
    nodes: &mut [Node<B::Buf>], input: &Act<B::Buf>, ctx: &Ctx<B>,
) -> Result<()> {
    let mut i = 0;
    while i < nodes.len() {
        let (done, rest) = nodes.split_at_mut(i);
        let t = ctx.profile.then(std::time::Instant::now);
        ctx.be.range_push(&rest[0].name);
        // In evaluation, Conv → BatchNorm+ReLU may run as one op (the time goes to the conv).
        let fused = !ctx.train && fused_conv_bn_relu_eval(rest, last_out(done, input), ctx);
        let r = if fused { Ok(()) } else { rest[0].forward(last_out(done, input), ctx) };
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
    nodes: &mut [Node<B::Buf>], x: &Act<B::Buf>, ctx: &Ctx<B>,
) -> bool {
    let [conv_node, bn_node, ..] = nodes else {
        return false;
    };
    let (
        Op::Conv { conv, w, b },
        Op::BatchNorm { w: gamma, b: beta, running_mean, running_var, relu: true, .. },
    ) = (&conv_node.op, &bn_node.op)
    else {
        return false;
    };
    ensure(ctx.be, &mut bn_node.out, conv.out_shape(x.shape));
    ctx.be.conv2d_batch_norm_relu_forward_eval(
        &mut bn_node.out.buf,
        &x.buf,
        (&w.value, &b.value),
        Affine { gamma: &gamma.value, beta: &beta.value },
        RunningStats { mean: running_mean, var: running_var },
        x.shape,
        conv,
        &ctx.bn,
    )
}

pub(super) fn backward_seq<T: Elem, B: Backend<T>>(
    nodes: &mut [Node<B::Buf>], input: &Act<B::Buf>, dy: B::Buf, need_dx: bool, ctx: &Ctx<B>,
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

/// The backward of an Inception block named `name` with output shape `out`: the join's
/// gradient split by branch, each branch's backward on the scheduler, and (when `need_dx`) the
/// sum of the gradients of the input the branches share.
fn inception_backward<T: Elem, B: Backend<T, Buf = Buf>, Buf: Send + Sync>(
    (name, out): (&str, Nhwc), branches: &mut [Vec<Node<Buf>>], x: &Act<Buf>, dy: Buf,
    need_dx: bool, ctx: &Ctx<B>,
) -> Option<Buf> {
    let (be, xs) = (ctx.be, x.shape);
    let channels: Vec<usize> = branches.iter().map(|b| last_out(b, x).shape.c).collect();
    let pixels = out.pixels();
    let mut dparts: Vec<Buf> = channels.iter().map(|c| be.act_zeros(pixels * c)).collect();
    {
        let mut refs: Vec<&mut Buf> = dparts.iter_mut().collect();
        be.concat_backward(&mut refs, &dy, &channels);
    }
    let mut work: Vec<(&mut Vec<Node<Buf>>, Option<Buf>)> =
        branches.iter_mut().zip(dparts.into_iter().map(Some)).collect();
    be.branches_begin(work.len());
    let dxs = run_branches(ctx.schedule, &mut work, |i, (nodes, d)| {
        let d = d.take().expect("each branch gradient is used once");
        be.branch(Some(i));
        be.range_push(&format!("{}/branch{}", name, i + 1));
        let r = backward_seq(nodes, x, d, need_dx, ctx);
        be.range_pop();
        r
    });
    be.branch(None);
    be.branches_end(dxs.len());
    if !need_dx {
        return None;
    }
    let dxs: Vec<Buf> = dxs.into_iter().map(|d| d.expect("branch input gradient")).collect();
    let mut dx = be.act_zeros(xs.len());
    be.fork_backward(&mut dx, &dxs.iter().collect::<Vec<_>>());
    Some(dx)
}
