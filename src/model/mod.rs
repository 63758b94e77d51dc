//! The network as data: layers, Inception blocks and their branches, with PyTorch's module
//! paths as names. One description drives the CPU executor ([`net`]), parameter naming and
//! shapes (checkpoints), and the branch scheduler.

pub mod net;

use crate::backend::{BatchNormCfg, Conv2d, MaxPool2d, Nhwc};

/// One layer of the network. `name` is the PyTorch module path (`block3.0.branch2_conv2.0`), so
/// parameter names are `{name}.weight` etc., exactly as in the seed model's `state_dict()`.
#[derive(Clone, Debug, PartialEq)]
pub enum Layer {
    Conv {
        name: String,
        conv: Conv2d,
    },
    BatchNorm {
        name: String,
        channels: usize,
    },
    Relu {
        name: String,
    },
    MaxPool {
        name: String,
        pool: MaxPool2d,
    },
    /// Branches that all read the same input; their outputs are joined along channels.
    Inception {
        name: String,
        branches: Vec<Branch>,
    },
    /// `avg_pool2d(x, 2)` (a functional call in the seed, so it has no parameters).
    AvgPool2 {
        name: String,
    },
    /// `Linear(fin, fout)` on the flattened input; the input must be 1×1 spatially, where NHWC
    /// and NCHW flatten to the same order.
    Linear {
        name: String,
        fin: usize,
        fout: usize,
    },
}

/// One branch of an Inception block: a chain of layers.
#[derive(Clone, Debug, PartialEq)]
pub struct Branch {
    pub name: String,
    pub layers: Vec<Layer>,
}

/// A whole network: input shape, layers in order, classes out.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    /// Input channels, height, width.
    pub input: (usize, usize, usize),
    pub classes: usize,
    pub layers: Vec<Layer>,
    pub bn: BatchNormCfg,
}

/// What a named tensor of the model is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TensorKind {
    /// Trained by the optimizer (weights, biases, BN γ and β).
    Param,
    /// BN running statistics (float), updated by the forward in training mode.
    RunningStat,
    /// BN `num_batches_tracked` (int64 in PyTorch).
    Count,
}

/// A named tensor of the model, as it appears in PyTorch's `state_dict()`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: TensorKind,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// `Conv(bias) → BatchNorm → ReLU` as `nn.Sequential` numbers them: `{prefix}.0/.1/.2`.
fn conv_bn_relu(
    prefix: &str, cin: usize, cout: usize, k: usize, stride: usize, pad: usize,
) -> Vec<Layer> {
    vec![
        Layer::Conv { name: format!("{prefix}.0"), conv: Conv2d { cin, cout, k, stride, pad } },
        Layer::BatchNorm { name: format!("{prefix}.1"), channels: cout },
        Layer::Relu { name: format!("{prefix}.2") },
    ]
}

/// The seed's `BaseInception(cin, out, reduce)`: four branches, every conv stride 1, padding k/2.
pub fn inception(name: &str, cin: usize, out: [usize; 4], reduce: [usize; 2]) -> Layer {
    let cbr = |module: &str, ci: usize, co: usize, k: usize| {
        conv_bn_relu(&format!("{name}.{module}"), ci, co, k, 1, k / 2)
    };
    let branch = |bname: &str, layers: Vec<Vec<Layer>>| Branch {
        name: format!("{name}.{bname}"),
        layers: layers.into_iter().flatten().collect(),
    };
    Layer::Inception {
        name: name.to_string(),
        branches: vec![
            branch("branch1", vec![cbr("branch1_conv", cin, out[0], 1)]),
            branch(
                "branch2",
                vec![
                    cbr("branch2_conv1", cin, reduce[0], 1),
                    cbr("branch2_conv2", reduce[0], out[1], 3),
                ],
            ),
            branch(
                "branch3",
                vec![
                    cbr("branch3_conv1", cin, reduce[1], 1),
                    cbr("branch3_conv2", reduce[1], out[2], 5),
                ],
            ),
            branch(
                "branch4",
                vec![
                    vec![Layer::MaxPool {
                        name: format!("{name}.branch4_pool"),
                        pool: MaxPool2d { k: 3, stride: 1, pad: 1 },
                    }],
                    // The seed uses a 3×3 convolution here, not GoogLeNet's 1×1.
                    cbr("branch4_conv", cin, out[3], 3),
                ],
            ),
        ],
    }
}

impl ModelSpec {
    /// The seed article's `InceptionNetSmall` for 32×32 RGB images and 10 classes.
    pub fn inception_net_small() -> ModelSpec {
        let pool = |name: &str| Layer::MaxPool {
            name: name.to_string(),
            pool: MaxPool2d { k: 3, stride: 2, pad: 1 },
        };
        let mut layers = Vec::new();
        // block1: 7×7 stride 2 with padding 1 (as the seed has it): 32 → 14.
        layers.extend(conv_bn_relu("block1", 3, 64, 7, 2, 1));
        layers.extend(conv_bn_relu("block2", 64, 128, 3, 2, 1));
        layers.push(inception("block3.0", 128, [64, 64, 64, 64], [16, 16]));
        layers.push(pool("block3.1"));
        layers.push(inception("block4.0", 256, [96, 96, 96, 96], [32, 32]));
        layers.push(pool("block4.1"));
        layers.push(Layer::AvgPool2 { name: "avg_pool2d".into() });
        layers.push(Layer::Linear { name: "fc".into(), fin: 384, fout: 10 });
        ModelSpec {
            name: "InceptionNetSmall".into(),
            input: (3, 32, 32),
            classes: 10,
            layers,
            bn: BatchNormCfg::default(),
        }
    }

    /// Every named tensor, in `state_dict()` order.
    pub fn tensors(&self) -> Vec<TensorInfo> {
        fn walk(layers: &[Layer], out: &mut Vec<TensorInfo>) {
            for layer in layers {
                let mut push = |name: &str, field: &str, shape: Vec<usize>, kind| {
                    out.push(TensorInfo { name: format!("{name}.{field}"), shape, kind })
                };
                match layer {
                    Layer::Conv { name, conv } => {
                        push(
                            name,
                            "weight",
                            vec![conv.cout, conv.cin, conv.k, conv.k],
                            TensorKind::Param,
                        );
                        push(name, "bias", vec![conv.cout], TensorKind::Param);
                    }
                    Layer::BatchNorm { name, channels } => {
                        let c = *channels;
                        push(name, "weight", vec![c], TensorKind::Param);
                        push(name, "bias", vec![c], TensorKind::Param);
                        push(name, "running_mean", vec![c], TensorKind::RunningStat);
                        push(name, "running_var", vec![c], TensorKind::RunningStat);
                        push(name, "num_batches_tracked", vec![], TensorKind::Count);
                    }
                    Layer::Linear { name, fin, fout } => {
                        push(name, "weight", vec![*fout, *fin], TensorKind::Param);
                        push(name, "bias", vec![*fout], TensorKind::Param);
                    }
                    Layer::Inception { branches, .. } => {
                        for b in branches {
                            walk(&b.layers, out);
                        }
                    }
                    Layer::Relu { .. } | Layer::MaxPool { .. } | Layer::AvgPool2 { .. } => {}
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.layers, &mut out);
        out
    }

    /// Number of trained parameters.
    pub fn param_count(&self) -> usize {
        self.tensors().iter().filter(|t| t.kind == TensorKind::Param).map(TensorInfo::numel).sum()
    }

    /// Checks that consecutive layers fit together, and returns the output shape of every layer
    /// for a batch of `n` (in execution order, branches before the join).
    pub fn shapes(&self, n: usize) -> anyhow::Result<Nhwc> {
        self.walk(n, &mut |_, _| {})
    }

    /// Every convolution with its input shape for a batch of `n`, in execution order: the
    /// shapes the convolution kernels have to cover.
    pub fn convolutions(&self, n: usize) -> anyhow::Result<Vec<(String, Nhwc, Conv2d)>> {
        let mut out = Vec::new();
        self.walk(n, &mut |layer, s| {
            if let Layer::Conv { name, conv } = layer {
                out.push((name.clone(), s, *conv));
            }
        })?;
        Ok(out)
    }

    /// Every layer with its input shape for a batch of `n`, in execution order (an Inception
    /// block, then the layers of its branches): the shapes each op has to cover.
    pub fn layer_inputs(&self, n: usize) -> anyhow::Result<Vec<(Layer, Nhwc)>> {
        let mut out = Vec::new();
        self.walk(n, &mut |layer, s| out.push((layer.clone(), s)))?;
        Ok(out)
    }

    /// Walks the layers in execution order, checking that they fit together and calling
    /// `visit(layer, its input shape)`; returns the network's output shape.
    fn walk(&self, n: usize, visit: &mut dyn FnMut(&Layer, Nhwc)) -> anyhow::Result<Nhwc> {
        fn walk(
            layers: &[Layer], mut s: Nhwc, visit: &mut dyn FnMut(&Layer, Nhwc),
        ) -> anyhow::Result<Nhwc> {
            for layer in layers {
                visit(layer, s);
                s = match layer {
                    Layer::Conv { name, conv } => {
                        anyhow::ensure!(
                            s.c == conv.cin,
                            "{name}: expects {} input channels, gets {}",
                            conv.cin,
                            s.c
                        );
                        anyhow::ensure!(
                            s.h + 2 * conv.pad >= conv.k && s.w + 2 * conv.pad >= conv.k,
                            "{name}: input {}x{} smaller than the kernel",
                            s.h,
                            s.w
                        );
                        conv.out_shape(s)
                    }
                    Layer::BatchNorm { name, channels } => {
                        anyhow::ensure!(
                            s.c == *channels,
                            "{name}: expects {channels} channels, gets {}",
                            s.c
                        );
                        s
                    }
                    Layer::Relu { .. } => s,
                    Layer::MaxPool { pool, .. } => pool.out_shape(s),
                    Layer::Inception { name, branches } => {
                        let outs = branches
                            .iter()
                            .map(|b| walk(&b.layers, s, visit))
                            .collect::<anyhow::Result<Vec<_>>>()?;
                        let first = outs[0];
                        anyhow::ensure!(
                            outs.iter().all(|o| o.h == first.h && o.w == first.w),
                            "{name}: branches disagree on the spatial size"
                        );
                        Nhwc::new(s.n, first.h, first.w, outs.iter().map(|o| o.c).sum())
                    }
                    Layer::AvgPool2 { name } => {
                        anyhow::ensure!(
                            s.h >= 2 && s.w >= 2,
                            "{name}: input {}x{} is smaller than 2x2",
                            s.h,
                            s.w
                        );
                        Nhwc::new(s.n, s.h / 2, s.w / 2, s.c)
                    }
                    Layer::Linear { name, fin, fout } => {
                        anyhow::ensure!(
                            s.h == 1 && s.w == 1 && s.c == *fin,
                            "{name}: expects a 1x1x{fin} input, gets {}x{}x{}",
                            s.h,
                            s.w,
                            s.c
                        );
                        Nhwc::new(s.n, 1, 1, *fout)
                    }
                };
            }
            Ok(s)
        }
        let (c, h, w) = self.input;
        walk(&self.layers, Nhwc::new(n, h, w, c), visit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_model_shapes_and_size() {
        let spec = ModelSpec::inception_net_small();
        assert_eq!(spec.shapes(5).unwrap(), Nhwc::new(5, 1, 1, 10));
        // Counted from the PyTorch model: sum(p.numel() for p in m.parameters()).
        let tensors = spec.tensors();
        assert_eq!(tensors[0].name, "block1.0.weight");
        assert!(tensors.iter().any(|t| t.name == "block3.0.branch2_conv2.1.running_var"));
        assert_eq!(tensors.last().unwrap().name, "fc.bias");
    }
}
