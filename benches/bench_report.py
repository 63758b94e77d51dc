"""Side-by-side table of GPU benchmark results: incept (`incept bench --matrix --json`) and
PyTorch (`benches/pytorch_baseline.py --json`), JSON lines from one run on one card, with each
incept row's training images/s as a ratio to PyTorch eager AMP (channels_last) at the same
batch size, the yardstick.

Usage:
    python benches/bench_report.py bench.jsonl
"""
import json
import sys


def main():
    rows = []
    with open(sys.argv[1]) as f:
        for line in f:
            line = line.strip()
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    base = {r["batch"]: r["train_img_s"] for r in rows
            if r.get("impl") == "pytorch-eager-channels_last" and r.get("precision") == "amp-f16"}
    print(f"{'impl':<34}{'precision':<10}{'streams':>8}{'graph':>6}{'batch':>7}"
          f"{'train img/s':>13}{'eval img/s':>12}{'vs PyTorch eager AMP':>22}")
    for r in sorted(rows, key=lambda r: (r["batch"], r.get("impl", "incept"), r["precision"],
                                         r.get("graph", False), r.get("streams", 0))):
        impl = r.get("impl", "incept")
        ratio = base.get(r["batch"])
        ratio = f"{r['train_img_s'] / ratio:.2f}x" if ratio else "-"
        graph = {True: "on", False: "off"}.get(r.get("graph"), "-")
        print(f"{impl:<34}{r['precision']:<10}{r.get('streams', '-'):>8}{graph:>6}{r['batch']:>7}"
              f"{r['train_img_s']:>13.1f}{r['eval_img_s']:>12.1f}{ratio:>22}")
    if not base:
        print("(no PyTorch eager AMP rows: no ratios)")


if __name__ == "__main__":
    main()
