//! Building the nodes from a [`ModelSpec`]: parameters initialised as PyTorch initialises
//! them, and each BatchNorm that a ReLU follows fused with it.

use super::*;

/// PyTorch's default init for conv and linear layers: kaiming_uniform(a=√5) for the weight,
/// which is U(±1/√fan_in), and U(±1/√fan_in) for the bias.
fn uniform<T: Elem>(rng: &mut impl Rng, len: usize, fan_in: usize) -> Vec<T> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    (0..len).map(|_| T::cast(rng.random_range(-bound..bound))).collect()
}

fn param<T: Elem, B: Backend<T>>(be: &B, value: Vec<T>) -> Param<B::Buf> {
    Param { grad: be.zeros(value.len()), momentum: be.zeros(value.len()), value: be.upload(&value) }
}

/// Every BatchNorm directly followed by a ReLU becomes one node doing both (after the
/// parameters are drawn, so the initialisation is the model's). PyTorch's module paths stay
/// reachable: the ReLU's name is the fused node's alias.
fn fuse_bn_relu<Buf>(nodes: Vec<Node<Buf>>) -> Vec<Node<Buf>> {
    let mut out: Vec<Node<Buf>> = Vec::with_capacity(nodes.len());
    for node in nodes {
        if let (Op::Relu, Some(prev)) = (&node.op, out.last_mut()) {
            if let Op::BatchNorm { relu: fused @ false, .. } = &mut prev.op {
                *fused = true;
                prev.alias = Some(node.name);
                continue;
            }
        }
        out.push(node);
    }
    out
}

pub(super) fn build<T: Elem, B: Backend<T>>(
    be: &B, layers: &[Layer], rng: &mut impl Rng,
) -> Vec<Node<B::Buf>> {
    let nodes = build_layers(be, layers, rng);
    fuse_bn_relu(nodes)
}

fn build_layers<T: Elem, B: Backend<T>>(
    be: &B, layers: &[Layer], rng: &mut impl Rng,
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
                    (name, Op::Linear { fin: *fin, fout: *fout, w, b })
                }
            };
            Node {
                name: name.clone(),
                alias: None,
                op,
                out: Act { buf: be.zeros(0), shape: Nhwc::new(0, 0, 0, 0) },
                time: [0.0; 2],
            }
        })
        .collect()
}

/// Gives the activation `act` the shape `shape`, reallocating only when the shape changes.
pub(super) fn ensure<T: Elem, B: Backend<T>>(be: &B, act: &mut Act<B::Buf>, shape: Nhwc) {
    if act.shape != shape {
        act.buf = be.act_zeros(shape.len());
        act.shape = shape;
    }
}

/// [`ensure`] for the logits and the softmax, which stay in full precision on every backend
/// (mixed-precision training computes the loss in fp32, as autocast does).
pub(super) fn ensure_full<T: Elem, B: Backend<T>>(be: &B, act: &mut Act<B::Buf>, shape: Nhwc) {
    if act.shape != shape {
        act.buf = be.zeros(shape.len());
        act.shape = shape;
    }
}
