//! Time per layer (`incept bench --profile`), from the nodes' own clocks.

use super::*;

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

pub(super) fn collect_times<Buf>(nodes: &[Node<Buf>], out: &mut Vec<LayerTime>) -> [f64; 2] {
    let mut total = [0.0; 2];
    for node in nodes {
        let (op, flop, inner) = match &node.op {
            Op::Conv { conv, .. } => {
                let s = node.out.shape;
                ("conv", 2.0 * (s.len() * conv.cin * conv.k * conv.k) as f64, [0.0; 2])
            }
            Op::BatchNorm { relu: true, .. } => ("batch_norm_relu", 0.0, [0.0; 2]),
            Op::BatchNorm { .. } => ("batch_norm", 0.0, [0.0; 2]),
            Op::Relu => ("relu", 0.0, [0.0; 2]),
            Op::MaxPool { .. } => ("max_pool", 0.0, [0.0; 2]),
            Op::AvgPool2 => ("avg_pool", 0.0, [0.0; 2]),
            Op::Linear { fin, .. } => {
                ("linear", 2.0 * (node.out.shape.len() * fin) as f64, [0.0; 2])
            }
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

pub(super) fn reset_times<Buf>(nodes: &mut [Node<Buf>]) {
    for node in nodes {
        node.time = [0.0; 2];
        if let Op::Inception { branches } = &mut node.op {
            for b in branches {
                reset_times(b);
            }
        }
    }
}
