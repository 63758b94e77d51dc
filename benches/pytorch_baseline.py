"""PyTorch GPU baseline throughput for the CIFAR-10 InceptionNet, timed like `incept bench`.

A training step is forward + cross-entropy + backward + SGD step (Nesterov, momentum 0.9,
weight decay 5e-4) on one fixed random batch; an eval step is an eval-mode forward. Each
figure is the median over timed steps after a warm-up, every step ending with a device sync
(as `incept bench` ends each step by reading the loss back). Modes: fp32 (TF32 off, as
incept's fp32 path) and AMP (autocast fp16 + GradScaler, as incept's --amp), both in
channels_last, PyTorch's fastest eager layout for convolutions; then the same two under
`torch.compile` (default mode), unless --no-compile. `--precision amp` and `--no-eval` leave
out what a short check has no time for: each compiled mode costs a compilation of its own,
and eval in inference mode another one.

Exits 1 if any mode failed (after running the others), so a caller sees it without parsing.

Usage:
    python benches/pytorch_baseline.py -b 128 --json
    python benches/pytorch_baseline.py -b 128 -b 512 --compile-only --precision amp --no-eval --json
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

# The seed article's InceptionNetSmall, verbatim, as the golden fixtures use it. Looked up next
# to this file (the GPU bundle) or in tests/fixtures (the repository).
here = os.path.dirname(os.path.abspath(__file__))
for d in (here, os.path.join(here, "..", "tests", "fixtures")):
    if os.path.exists(os.path.join(d, "seed_model.py")):
        sys.path.insert(0, d)
        break
from seed_model import InceptionNet  # noqa: E402


def median_step_seconds(step, warmup, steps):
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(x, y, amp, warmup, steps, compiled, evaluate):
    cl = torch.channels_last
    model = InceptionNet().cuda().to(memory_format=cl)
    run = torch.compile(model) if compiled else model
    x = x.contiguous(memory_format=cl)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)

    def train_step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            loss = loss_fn(run(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        loss.item()

    def eval_step():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            run(x).float().sum().item()

    model.train()
    t = median_step_seconds(train_step, warmup, steps)
    if not evaluate:
        return t, None
    model.eval()
    e = median_step_seconds(eval_step, warmup, steps)
    return t, e


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-b", "--batch", type=int, action="append",
                   help="images per step; repeat for several (default 128)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object per mode")
    p.add_argument("--no-compile", action="store_true", help="eager only")
    p.add_argument("--compile-only", action="store_true", help="torch.compile only")
    p.add_argument("--precision", choices=("fp32", "amp", "both"), default="both")
    p.add_argument("--no-eval", action="store_true", help="time training steps only")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("pytorch_baseline.py: torch sees no CUDA device")

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    impls = ["eager"] if args.no_compile else ["compile"] if args.compile_only else ["eager", "compile"]
    # AMP first: it is the yardstick, so a run cut short by a time limit still has it.
    precisions = [(name, amp) for name, amp in (("amp-f16", True), ("fp32", False))
                  if args.precision == "both" or (args.precision == "amp") == amp]
    failed = 0
    for b in args.batch or [128]:
        torch.manual_seed(args.seed)
        x = torch.randn(b, 3, 32, 32, device="cuda")
        y = torch.randint(0, 10, (b,), device="cuda")
        print(f"torch {torch.__version__}  {torch.cuda.get_device_name()}  batch={b}  "
              f"warmup={args.warmup}  steps={args.steps}", flush=True)
        for impl in impls:
            for name, amp in precisions:
                try:
                    t, e = bench(x, y, amp, args.warmup, args.steps, impl == "compile",
                                 not args.no_eval)
                except Exception as err:  # torch.compile needs a working compiler toolchain
                    print(f"{impl} {name} batch {b}: failed: {err}".splitlines()[0],
                          file=sys.stderr, flush=True)
                    failed += 1
                    continue
                if args.json:
                    print(json.dumps({"impl": f"pytorch-{impl}-channels_last",
                                      "torch": torch.__version__,
                                      "precision": name, "batch": b,
                                      "train_ms": round(t * 1e3, 3),
                                      "train_img_s": round(b / t, 1),
                                      "eval_ms": round(e * 1e3, 3) if e else None,
                                      "eval_img_s": round(b / e, 1) if e else None}),
                          flush=True)
                else:
                    evals = (f"eval {e * 1e3:8.2f} ms/step {b / e:10.1f} img/s" if e
                             else "eval -")
                    print(f"{impl:<8}{name:<8} train {t * 1e3:8.2f} ms/step "
                          f"{b / t:10.1f} img/s   {evals}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
