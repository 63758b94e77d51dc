#!/usr/bin/env bash
# Side-by-side CPU throughput: `incept bench --device cpu` and PyTorch on the same machine,
# same thread count, same batch, alternating runs so both see the same machine load.
#
#   PYTHON=/path/to/venv/bin/python benches/cpu_vs_pytorch.sh [runs] [batch] [threads]
#
# PYTHON must have torch installed (default: python3). Prints one line per run and the ratio
# of incept's images/s to PyTorch's best CPU configuration (eager channels_last).
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}
batch=${2:-128}
threads=${3:-$(nproc)}
python=${PYTHON:-python3}
cargo build --release --quiet
"$python" -c "import torch" 2>/dev/null || {
  echo "error: $python has no torch; set PYTHON to an interpreter with PyTorch installed" >&2
  exit 2
}
printf '%-4s %12s %12s %12s %12s %12s %12s\n' run incept_train torch_train ratio incept_eval torch_eval ratio
for r in $(seq 1 "$runs"); do
  ours=$(./target/release/incept bench --device cpu -b "$batch" --threads "$threads" --json | tail -n 1)
  theirs=$("$python" benches/pytorch_cpu.py --threads "$threads" -b "$batch" --json | tail -n 1)
  "$python" - "$r" "$ours" "$theirs" <<'PY'
import json, sys
r, a, b = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tt = max(b["train_cl_img_s"], b["train_nchw_img_s"])
te = max(b["eval_cl_img_s"], b["eval_nchw_img_s"])
print(f'{r:<4} {a["train_img_s"]:12.1f} {tt:12.1f} {a["train_img_s"]/tt:12.2f} '
      f'{a["eval_img_s"]:12.1f} {te:12.1f} {a["eval_img_s"]/te:12.2f}')
PY
done
