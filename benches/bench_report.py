"""Side-by-side table of GPU benchmark results: incept (`incept bench --matrix --json`) and
PyTorch (`benches/pytorch_baseline.py --json`), JSON lines from one run on one card, with each
incept row's training images/s as a ratio to PyTorch at the same batch size: eager AMP
(channels_last), the yardstick, and `torch.compile` AMP, the best PyTorch does without
hand-written kernels. A configuration that failed keeps its row, with the error instead of
figures, so a table is never silently shorter than the matrix.

Usage:
    python benches/bench_report.py bench.jsonl [more.jsonl ...]
"""
import json
import sys

EAGER = "pytorch-eager-channels_last"
COMPILE = "pytorch-compile-channels_last"


def read_rows(paths):
    rows = []
    for path in paths:
        try:
            f = open(path)
        except OSError as err:
            print(f"bench_report.py: {err}", file=sys.stderr)
            continue
        with f:
            for line in f:
                line = line.strip()
                if not line.startswith("{"):
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(row, dict) and "batch" in row:
                    rows.append(row)
    return rows


def figure(value, fmt):
    return format(value, fmt) if isinstance(value, (int, float)) else "-"


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    rows = read_rows(sys.argv[1:])
    amp = [r for r in rows if r.get("precision") == "amp-f16" and "train_img_s" in r]
    base = {name: {r["batch"]: r["train_img_s"] for r in amp if r.get("impl") == name}
            for name in (EAGER, COMPILE)}

    def ratio(r, name):
        b = base[name].get(r["batch"])
        if "impl" in r or "error" in r or not b:
            return "-"
        return f"{r['train_img_s'] / b:.2f}x"

    print(f"{'impl':<30}{'precision':<10}{'streams':>8}{'graph':>6}{'batch':>7}"
          f"{'train img/s':>13}{'eval img/s':>12}{'vs eager AMP':>14}{'vs compile AMP':>16}")
    for r in sorted(rows, key=lambda r: (r["batch"], r.get("impl", "incept"),
                                         r.get("precision", ""), r.get("graph", False),
                                         r.get("streams", 0))):
        impl = r.get("impl", "incept")
        graph = {True: "on", False: "off"}.get(r.get("graph"), "-")
        head = (f"{impl:<30}{r.get('precision', '-'):<10}{r.get('streams', '-'):>8}"
                f"{graph:>6}{r['batch']:>7}")
        if "error" in r:
            error = " ".join(str(r["error"]).split())
            print(f"{head}  error: {error[:160]}")
            continue
        print(f"{head}{figure(r.get('train_img_s'), '.1f'):>13}"
              f"{figure(r.get('eval_img_s'), '.1f'):>12}"
              f"{ratio(r, EAGER):>14}{ratio(r, COMPILE):>16}")
    failed = sum("error" in r for r in rows)
    if failed:
        print(f"({failed} incept configuration(s) failed: the error is in their row)")
    if not base[EAGER]:
        print("(no PyTorch eager AMP rows: no ratios to it)")
    if not base[COMPILE]:
        print("(no PyTorch torch.compile AMP rows: no ratios to it)")


if __name__ == "__main__":
    main()
