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
import os
import sys
import time

import torch
import torch.nn as nn


# The seed article's InceptionNetSmall, verbatim, as the golden fixtures use it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
from seed_model import InceptionNet  # noqa: E402


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
