#!/usr/bin/env bash
# GPU checks, run on the GPU machine from the folder `make gpu-bundle` made (no Rust toolchain
# needed): the GPU test executables, `incept info`, `incept bench --device cuda`, and a short
# training run on synthetic data. Every step's output goes to a log in the report folder and its
# exit status and time to summary.txt; a failing step does not stop the others.
#
#   ./gpu-check.sh [report-dir]      # default target/gpu-check (relative to the current folder)
#
# On a borrowed GPU machine that gets a copy of the work tree, carry target/gpu-bundle (ignored by
# git) and run `target/gpu-bundle/gpu-check.sh "$OUT/gpu-check"`.
#
# Environment: STEP_TIMEOUT (seconds a step may take, default 300), GPU_CHECK_BUDGET (seconds for
# all steps, default 480: later steps are cut short or skipped), GPU_TEST_ARGS (extra libtest
# arguments, e.g. --nocapture), BENCH_BATCHES (PyTorch's, default "128 512"), TRAIN_EPOCHS (default 2; 0
# skips the training run), INCEPT_PYTHON (a python whose site-packages hold the NVIDIA wheels).
set -u
here="$(cd "$(dirname "$0")" && pwd)"
# From the repo (scripts/gpu-check.sh) use the bundle in target/gpu-bundle.
if [ ! -f "$here/tests.txt" ] && [ -f "$here/../target/gpu-bundle/tests.txt" ]; then
  here="$(cd "$here/../target/gpu-bundle" && pwd)"
fi
if [ ! -x "$here/incept" ]; then
  echo "gpu-check: no incept binary in $here: build the bundle with \`make gpu-bundle\`" >&2
  exit 2
fi
report="${1:-target/gpu-check}"
mkdir -p "$report" || exit 2
report="$(cd "$report" && pwd)"
summary="$report/summary.txt"
step_timeout="${STEP_TIMEOUT:-300}"
deadline=$((SECONDS + ${GPU_CHECK_BUDGET:-480}))
: >"$summary"
rm -f "$report"/*.log "$report"/train-*

# The NVIDIA libraries that PyTorch-style pip wheels install (cuDNN, cuBLAS, NVRTC, runtime),
# for cudarc's dynamic loading; the driver's libcuda comes from the system.
nvidia_lib_dirs() {
  local py
  for py in "${INCEPT_PYTHON:-}" python3; do
    [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
    "$py" - <<'PY' 2>/dev/null
import os
try:
    import nvidia
except ImportError:
    raise SystemExit
for base in list(getattr(nvidia, "__path__", [])):
    for name in ("cudnn", "cublas", "cuda_nvrtc", "cuda_runtime", "nvjitlink", "cu13"):
        lib = os.path.join(base, name, "lib")
        if os.path.isdir(lib):
            print(lib)
PY
  done
}
extra="$(nvidia_lib_dirs | awk '!seen[$0]++' | paste -sd: -)"
if [ -n "$extra" ]; then
  export LD_LIBRARY_PATH="$extra${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# The GPU tests find the binary and the golden fixtures in the bundle, not where they were built.
export INCEPT_BIN="$here/incept" INCEPT_FIXTURES="$here/fixtures" RUST_BACKTRACE=1

failed=0
skipped=0
steps=0
# step NAME CMD...: runs CMD in the bundle folder with a time limit, output to NAME.log.
step() {
  local name="$1" log="$report/$1.log" start rc secs limit
  shift
  steps=$((steps + 1))
  limit=$((deadline - SECONDS))
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped (GPU_CHECK_BUDGET spent)"
    printf '%-4s %-28s %s\n' SKIP "$name" "GPU_CHECK_BUDGET spent" >>"$summary"
    skipped=$((skipped + 1))
    return 0
  fi
  [ "$limit" -gt "$step_timeout" ] && limit="$step_timeout"
  echo "== $name: $*"
  start="$(date +%s)"
  {
    echo "\$ $*"
    echo "# $(date -u '+%Y-%m-%dT%H:%M:%SZ')"
  } >"$log"
  if command -v timeout >/dev/null; then
    (cd "$here" && timeout -k 10 "$limit" "$@") >>"$log" 2>&1 </dev/null
  else
    (cd "$here" && "$@") >>"$log" 2>&1 </dev/null
  fi
  rc=$?
  secs=$(($(date +%s) - start))
  [ "$rc" -eq 124 ] && echo "# timed out after ${limit}s" >>"$log"
  tail -n 5 "$log" | sed 's/^/   /'
  local status="ok"
  if [ "$rc" -ne 0 ]; then
    status="FAIL"
    failed=$((failed + 1))
  fi
  # The test runner's closing line (libtest's, or a custom harness's "N passed, N failed,
  # N skipped"), so skipped GPU tests show in the summary.
  local result
  result="$(grep -E '^test result:|^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1 | sed 's/^test result: //')"
  printf '%-4s %-28s exit %-3s %5ss  %s\n' "$status" "$name" "$rc" "$secs" "$result" >>"$summary"
  return 0
}

{
  echo "# gpu-check $(date -u '+%Y-%m-%dT%H:%M:%SZ') on $(hostname 2>/dev/null || echo '?')"
  echo "bundle: $here"
  cat "$here/BUILD-INFO.txt" 2>/dev/null
  echo
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  uname -a
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
    nvidia-smi 2>&1
  else
    echo "nvidia-smi: not found"
  fi
  for lib in libcuda.so.1 libcudnn.so.9 libcublas.so.12 libcublasLt.so.12 libnvrtc.so.12 libcublas.so.13 libnvrtc.so.13; do
    found="$(ldconfig -p 2>/dev/null | grep -m1 " $lib " | sed 's/.*=> //')"
    for d in ${LD_LIBRARY_PATH:+${LD_LIBRARY_PATH//:/ }}; do
      [ -z "$found" ] && [ -e "$d/$lib" ] && found="$d/$lib"
    done
    echo "$lib: ${found:-NOT FOUND}"
  done
} >"$report/env.txt" 2>&1
gpu="$(grep -A1 '^name, driver_version' "$report/env.txt" | tail -n 1)"
echo "GPU: ${gpu:-none seen by nvidia-smi}"
grep -E '^lib.*: ' "$report/env.txt"
echo "report: $report"

# GPU test executables (tests.txt: name<TAB>libtest filter).
if [ -f "$here/tests.txt" ]; then
  while IFS=$'\t' read -r name filter; do
    [ -n "$name" ] || continue
    # shellcheck disable=SC2086  # GPU_TEST_ARGS is a list of arguments
    step "test-$name" "./tests/$name" ${filter:+"$filter"} ${GPU_TEST_ARGS:-}
  done <"$here/tests.txt"
fi

help="$("$here/incept" --help 2>&1)"
if echo "$help" | grep -qE '^\s+info\b'; then
  step info ./incept info
fi
# The benchmark matrix {streams 1, 4} x {graph off, on} x {fp32, AMP fp16} x {batch 128, 512}; where the
# machine's python3 has PyTorch with CUDA, the seed model in PyTorch timed the same way (same
# card, same run: eager and torch.compile, fp32 and AMP), so the report has the ratios side by
# side (bench.txt).
step bench-matrix ./incept bench --device cuda --matrix --steps 30 --warmup 5 --json
have_torch=0
if python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  have_torch=1
  for b in ${BENCH_BATCHES:-128 512}; do
    step "pytorch-eager-b$b" python3 ./pytorch_baseline.py -b "$b" --steps 30 --warmup 5 --no-compile --json
  done
fi
if [ "${TRAIN_EPOCHS:-2}" -gt 0 ]; then
  # Data and checkpoints in a scratch folder; the report keeps the run's metrics only.
  work="$(mktemp -d "${TMPDIR:-/tmp}/incept-gpu-check.XXXXXX")"
  step synth-data ./incept data synth --out "$work/synth" --train 5000 --test 1000 --seed 0
  step train-cuda ./incept train --device cuda --data-dir "$work/synth" \
    --epochs "${TRAIN_EPOCHS:-2}" --output "$work/runs" --experiment gpu-check \
    --log-format json
  for f in summary.csv metrics.jsonl args.json; do
    [ -f "$work/runs/gpu-check/$f" ] && cp "$work/runs/gpu-check/$f" "$report/train-$f"
  done
  rm -rf "$work"
fi

# torch.compile last: its compilation takes long and is the first thing to drop when the
# budget runs out.
if [ "$have_torch" -eq 1 ]; then
  for b in ${BENCH_BATCHES:-128 512}; do
    step "pytorch-compile-b$b" python3 ./pytorch_baseline.py -b "$b" --steps 30 --warmup 5 --compile-only --json
  done
fi
grep -h '^{' "$report"/bench-*.log "$report"/pytorch-*.log >"$report/bench.jsonl" 2>/dev/null
python3 ./bench_report.py "$report/bench.jsonl" >"$report/bench.txt" 2>&1 && cat "$report/bench.txt"

echo
echo "== summary ($report/summary.txt)"
cat "$summary"
line="$((steps - failed - skipped)) passed, $failed failed, $skipped skipped"
echo "$line"
echo "$line" >>"$summary"
[ "$failed" -eq 0 ] && [ "$skipped" -eq 0 ]
