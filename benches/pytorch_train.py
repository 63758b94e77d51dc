"""Train the CIFAR-10 InceptionNet in PyTorch on the CPU, with the recipe of `incept train`.

Reads the CIFAR-10 binary version (data_batch_1..5.bin, test_batch.bin; records of one label
byte and 3072 image bytes, R, G, B planes of 32x32). Recipe: SGD (momentum 0.9, Nesterov,
weight decay 5e-4), OneCycleLR stepped per batch (peak --lr, cosine, no momentum cycling),
random crop 32 with 4 pixels of zero padding and horizontal flip, per-channel normalisation,
a new shuffle every epoch, the last partial batch kept. The test set is evaluated after every
epoch. Everything runs in one process (no DataLoader workers).

Per epoch it prints the train loss and accuracy, the test accuracy, training images/s (batch
preparation included) and the epoch's seconds (training and evaluation); the last line is a
JSON object with those lists.

Usage:
    python benches/pytorch_train.py --data-dir data/cifar-10-batches-bin --epochs 3 --threads 2
    python benches/pytorch_train.py --data-dir DIR --no-channels-last   # NCHW instead
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn


# The seed article's InceptionNetSmall, verbatim, as the golden fixtures use it.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures"))
from seed_model import InceptionNet  # noqa: E402


MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILES = ["test_batch.bin"]
PAD = 4


def load(data_dir, names):
    """(N,3,32,32) uint8 images and (N,) int64 labels from CIFAR-10 binary files."""
    raw = np.concatenate([np.fromfile(os.path.join(data_dir, n), dtype=np.uint8) for n in names])
    if raw.size % 3073:
        raise SystemExit(f"{data_dir}: file sizes are not a multiple of 3073-byte records")
    rec = torch.from_numpy(raw.reshape(-1, 3073))
    return rec[:, 1:].reshape(-1, 3, 32, 32).contiguous(), rec[:, 0].long()


def normalise(x_u8, memory_format):
    x = (x_u8.float() / 255.0 - MEAN) / STD
    return x.contiguous(memory_format=memory_format)


def augment(x_u8, gen):
    """Random 32x32 crop of the image zero-padded by 4 (before normalisation), then a random
    horizontal flip, drawn per image."""
    n = x_u8.shape[0]
    padded = torch.nn.functional.pad(x_u8, (PAD, PAD, PAD, PAD))  # zeros
    oy = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    ox = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    ar = torch.arange(32)
    rows = (oy[:, None] + ar).view(n, 1, 32, 1).expand(n, 3, 32, 32)
    cols_idx = torch.where(flip[:, None], 31 - ar, ar)  # flip = read columns backwards
    cols = (ox[:, None] + cols_idx).view(n, 1, 1, 32).expand(n, 3, 32, 32)
    chans = torch.arange(3).view(1, 3, 1, 1).expand(n, 3, 32, 32)
    imgs = torch.arange(n).view(n, 1, 1, 1).expand(n, 3, 32, 32)
    return padded[imgs, chans, rows, cols]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("-b", "--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval-batch-size", type=int, default=500)
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format

    x_train, y_train = load(args.data_dir, TRAIN_FILES)
    x_test, y_test = load(args.data_dir, TEST_FILES)
    n, b = len(y_train), args.batch_size
    # Keep the last partial batch, unless it has one image (BatchNorm cannot train on it).
    steps_per_epoch = n // b if n % b == 1 else -(-n // b)

    model = InceptionNet().to(memory_format=fmt)
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9,
                          nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch, cycle_momentum=False)

    print(f"torch {torch.__version__}  threads={torch.get_num_threads()}  "
          f"format={'channels_last' if args.channels_last else 'NCHW'}  train={n}  "
          f"test={len(y_test)}  batch={b}  steps/epoch={steps_per_epoch}")
    print(f"{'epoch':>5}{'train_loss':>12}{'train_acc':>11}{'test_acc':>10}{'img/s':>9}{'seconds':>9}")
    hist = {k: [] for k in ("train_loss", "train_acc", "test_acc", "img_per_s", "seconds")}
    for epoch in range(1, args.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = order[step * b:(step + 1) * b]
            x = normalise(augment(x_train[idx], gen), fmt)
            y = y_train[idx]
            opt.zero_grad(set_to_none=True)
            logits = model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(idx)
        train_secs = time.perf_counter() - t0

        model.eval()
        test_correct = 0
        with torch.no_grad():
            for s in range(0, len(y_test), args.eval_batch_size):
                xb = normalise(x_test[s:s + args.eval_batch_size], fmt)
                test_correct += (model(xb).argmax(1) == y_test[s:s + args.eval_batch_size]).sum().item()
        secs = time.perf_counter() - t0

        row = (loss_sum / seen, correct / seen, test_correct / len(y_test), seen / train_secs, secs)
        for k, v in zip(hist, row):
            hist[k].append(round(v, 6))
        print(f"{epoch:>5}{row[0]:>12.4f}{row[1]:>11.4f}{row[2]:>10.4f}{row[3]:>9.1f}{row[4]:>9.2f}",
              flush=True)

    print(json.dumps({"torch": torch.__version__, "threads": args.threads,
                      "channels_last": args.channels_last, "batch": b, **hist}))


if __name__ == "__main__":
    main()
