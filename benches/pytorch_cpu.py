"""PyTorch CPU baseline throughput for the CIFAR-10 InceptionNet.

Measures training (forward + cross-entropy + backward + SGD step) and
inference (eval mode, forward only) images/second on the CPU, in both NCHW
(contiguous) and channels_last memory formats, using random inputs.

Usage:
    python benches/pytorch_cpu.py --threads 2 -b 128 --json
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn as nn


# The seed article's InceptionNetSmall (model definition copied verbatim).
def ConvBNRelu(in_channel, out_channel, kernel_size):
    return nn.Sequential(
        nn.Conv2d(in_channel, out_channel, kernel_size=kernel_size, stride=1, padding=kernel_size // 2),
        nn.BatchNorm2d(out_channel),
        nn.ReLU(),
    )

class BaseInception(nn.Module):
    def __init__(self, in_channel, out_channel_list, reduce_channel_list):
        super().__init__()
        self.branch1_conv = ConvBNRelu(in_channel, out_channel_list[0], 1)
        self.branch2_conv1 = ConvBNRelu(in_channel, reduce_channel_list[0], 1)
        self.branch2_conv2 = ConvBNRelu(reduce_channel_list[0], out_channel_list[1], 3)
        self.branch3_conv1 = ConvBNRelu(in_channel, reduce_channel_list[1], 1)
        self.branch3_conv2 = ConvBNRelu(reduce_channel_list[1], out_channel_list[2], 5)
        self.branch4_pool = nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.branch4_conv = ConvBNRelu(in_channel, out_channel_list[3], 3)

    def forward(self, x):
        out1 = self.branch1_conv(x)
        out2 = self.branch2_conv2(self.branch2_conv1(x))
        out3 = self.branch3_conv2(self.branch3_conv1(x))
        out4 = self.branch4_conv(self.branch4_pool(x))
        return torch.cat([out1, out2, out3, out4], dim=1)

class InceptionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(64, 128, kernel_size=3, stride=2, padding=1), nn.BatchNorm2d(128), nn.ReLU())
        self.block3 = nn.Sequential(BaseInception(128, [64, 64, 64, 64], [16, 16]), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.block4 = nn.Sequential(BaseInception(256, [96, 96, 96, 96], [32, 32]), nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
        self.fc = nn.Linear(384, 10)

    def forward(self, x):
        out = self.block1(x)
        out = self.block2(out)
        out = self.block3(out)
        out = self.block4(out)
        out = torch.nn.functional.avg_pool2d(out, 2)
        out = out.view(out.size(0), -1)
        return self.fc(out)


def median_step_seconds(step, warmup, steps):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_train(x, y, memory_format, warmup, steps):
    model = InceptionNet().to(memory_format=memory_format)
    model.train()
    x = x.contiguous(memory_format=memory_format)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9,
                          nesterov=True, weight_decay=5e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    return median_step_seconds(step, warmup, steps)


def bench_eval(x, memory_format, warmup, steps):
    model = InceptionNet().to(memory_format=memory_format)
    model.eval()
    x = x.contiguous(memory_format=memory_format)

    def step():
        with torch.inference_mode():
            model(x)

    return median_step_seconds(step, warmup, steps)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-b", "--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on the last line")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    b = args.batch
    x = torch.randn(b, 3, 32, 32)
    y = torch.randint(0, 10, (b,))

    nchw, cl = torch.contiguous_format, torch.channels_last
    secs = {
        "train_nchw": bench_train(x, y, nchw, args.warmup, args.steps),
        "train_cl": bench_train(x, y, cl, args.warmup, args.steps),
        "eval_nchw": bench_eval(x, nchw, args.warmup, args.steps),
        "eval_cl": bench_eval(x, cl, args.warmup, args.steps),
    }

    print(f"torch {torch.__version__}  threads={torch.get_num_threads()}  batch={b}  "
          f"warmup={args.warmup}  steps={args.steps}")
    print(f"{'mode':<8}{'format':<16}{'median ms/step':>16}{'img/s':>12}")
    for key, s in secs.items():
        mode, fmt = key.split("_")
        fmt = "NCHW" if fmt == "nchw" else "channels_last"
        print(f"{mode:<8}{fmt:<16}{s * 1e3:>16.2f}{b / s:>12.1f}")

    if args.json:
        out = {"torch": torch.__version__, "threads": args.threads, "batch": b,
               "warmup": args.warmup, "steps": args.steps}
        for key, s in secs.items():
            out[f"{key}_ms"] = round(s * 1e3, 3)
            out[f"{key}_img_s"] = round(b / s, 2)
        print(json.dumps(out))


if __name__ == "__main__":
    main()
