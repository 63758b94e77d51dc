#!/usr/bin/env bash
# The GPU check: one prepared run on a GPU machine, from the folder `make gpu-bundle` made (no
# Rust toolchain needed there). In this order, each step going on whatever the last one did:
#
#   1. info        `incept info`: driver, device, libraries, embedded kernels
#   2. train       synthetic data, then 2 epochs with --device cuda (loss and accuracy printed);
#                  with two GPUs or more, 1 epoch on 2 ranks over NCCL (skipped otherwise)
#   3. tests       the GPU test executables with INCEPT_EXPECT_GPU=1: no GPU fails them
#   4. sanitizer   a few training steps (-b 32, --no-cuda-graph) under compute-sanitizer, once
#                  per tool: memcheck, racecheck, synccheck, initcheck
#   5. bench       `incept bench --matrix`; a failing configuration is a row with its error
#   6. pytorch     PyTorch eager and torch.compile on the same model and batches (where python3
#                  has torch with CUDA), and the table of incept's ratios to them (bench.txt)
#
#   ./gpu-check.sh [--quick] [report-dir]     # default target/gpu-check, in the current folder
#
# On a GPU machine that gets a copy of the work tree, carry target/gpu-bundle (ignored
# by git) and run `target/gpu-bundle/gpu-check.sh "$OUT/gpu-check"`.
#
# The whole run is held to GPU_CHECK_BUDGET seconds (default 270; --quick: 110), each step to a
# cap of its own, and every phase keeps a share of the budget for the phases after it, so a
# step that hangs costs its cap and not the rest of the run. --quick trains on fewer images,
# runs a subset of the GPU tests (QUICK_TEST_FILTER, default `cpu_fp32`), memcheck only, and the
# bench matrix at batch 128 only with fewer steps.
#
# The report folder is written as the run goes (a run killed from outside keeps what it did):
# summary.txt gets each step's line as soon as the step ends (a `RUN` line while it runs), each
# step streams its output to <step>.log, and env.txt describes the machine.
#
# Environment: GPU_CHECK_BUDGET, GPU_TEST_ARGS (extra test arguments), QUICK_TEST_FILTER,
# SANITIZER_TOOLS (default all four; --quick: memcheck), SANITIZER_CAP (seconds per tool),
# COMPUTE_SANITIZER (its path), TRAIN_EPOCHS (default 2), BENCH_BATCHES (PyTorch's; default
# "128 512", --quick "128"), TORCH_PYTHON (default python3), INCEPT_PYTHON (a python whose
# site-packages hold NVIDIA wheels).
set -u

usage() { sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

quick=0
report=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    -h | --help)
      usage
      exit 0
      ;;
    -*)
      echo "gpu-check: unknown option $1 (see --help)" >&2
      exit 2
      ;;
    *)
      if [ -n "$report" ]; then
        echo "gpu-check: one report folder only (got $report and $1)" >&2
        exit 2
      fi
      report="$1"
      ;;
  esac
  shift
done

here="$(cd "$(dirname "$0")" && pwd)"
# From the repo (scripts/gpu-check.sh) use the bundle in target/gpu-bundle.
if [ ! -f "$here/tests.txt" ] && [ -f "$here/../target/gpu-bundle/tests.txt" ]; then
  here="$(cd "$here/../target/gpu-bundle" && pwd)"
fi
if [ ! -x "$here/incept" ]; then
  echo "gpu-check: no incept binary in $here: build the bundle with \`make gpu-bundle\`" >&2
  exit 2
fi
report="${report:-target/gpu-check}"
mkdir -p "$report" || exit 2
report="$(cd "$report" && pwd)"
summary="$report/summary.txt"
rm -f "$report"/*.log "$report"/train-* "$report"/bench.jsonl "$report"/bench.txt

if [ "$quick" -eq 1 ]; then
  mode=quick
  budget="${GPU_CHECK_BUDGET:-110}"
  synth_train=1024 synth_test=256
  test_filter="${QUICK_TEST_FILTER:-cpu_fp32}"
  sanitizer_tools="${SANITIZER_TOOLS:-memcheck}"
  sanitizer_cap="${SANITIZER_CAP:-30}"
  bench_args=(-b 128 --steps 10 --warmup 3)
  torch_batches="${BENCH_BATCHES:-128}"
  torch_steps=(--steps 10 --warmup 3)
  # cap: info synth train test unit sanitizer-data bench torch-probe eager compile
  caps=(15 10 25 30 10 10 30 15 20 40)
  # Kept back for the phases still to come: info train tests sanitizer bench pytorch.
  floors=(5 15 15 20 15 20)
else
  mode=full
  budget="${GPU_CHECK_BUDGET:-270}"
  synth_train=4096 synth_test=1024
  test_filter=""
  sanitizer_tools="${SANITIZER_TOOLS:-memcheck racecheck synccheck initcheck}"
  sanitizer_cap="${SANITIZER_CAP:-30}"
  bench_args=(--steps 20 --warmup 5)
  torch_batches="${BENCH_BATCHES:-128 512}"
  torch_steps=(--steps 20 --warmup 5)
  caps=(20 15 45 80 20 10 50 20 35 60)
  floors=(10 25 40 60 30 40)
fi
cap_info=${caps[0]} cap_synth=${caps[1]} cap_train=${caps[2]} cap_test=${caps[3]}
cap_unit=${caps[4]} cap_sandata=${caps[5]} cap_bench=${caps[6]} cap_probe=${caps[7]}
cap_eager=${caps[8]} cap_compile=${caps[9]}
deadline=$((SECONDS + budget))
epochs="${TRAIN_EPOCHS:-2}"

work="$(mktemp -d "${TMPDIR:-/tmp}/incept-gpu-check.XXXXXX")" || exit 2
trap 'rm -rf "$work"' EXIT

# The NVIDIA libraries that PyTorch-style pip wheels install (cuDNN, cuBLAS, NVRTC, runtime),
# for cudarc's dynamic loading; the driver's libcuda comes from the system.
nvidia_lib_dirs() {
  local py
  for py in "${INCEPT_PYTHON:-}" python3; do
    if [ -z "$py" ] || ! command -v "$py" >/dev/null 2>&1; then continue; fi
    timeout 20 "$py" - <<'PY' 2>/dev/null
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
# Python's output reaches the logs as it is printed, not when the process ends.
export PYTHONUNBUFFERED=1

{
  echo "# gpu-check $(date -u '+%Y-%m-%dT%H:%M:%SZ') on $(hostname 2>/dev/null || echo '?')"
  echo "bundle: $here"
  cat "$here/BUILD-INFO.txt" 2>/dev/null
  echo
  echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
  uname -a
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1
    timeout 20 nvidia-smi 2>&1
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
{
  echo "# gpu-check ($mode, budget ${budget}s) $(date -u '+%Y-%m-%dT%H:%M:%SZ')"
  echo "# GPU: ${gpu:-none seen by nvidia-smi}"
} >"$summary"
echo "gpu-check ($mode): budget ${budget}s; report in $report"
echo "GPU: ${gpu:-none seen by nvidia-smi}"
grep -E '^lib.*: ' "$report/env.txt" | sed 's/^/  /'

failed=0
skipped=0
passed=0
phase_no=0
current=""
child=""

# phase N TITLE: starts phase N (1-6); steps from then on leave the later phases their floors.
reserve=0
phase() {
  local i
  phase_no="$1"
  reserve=0
  for ((i = phase_no; i < ${#floors[@]}; i++)); do
    reserve=$((reserve + floors[i]))
  done
  echo
  echo "==== $1. $2"
}

# record STATUS NAME SECS CAP NOTE: the step's line in summary.txt, in place of its RUN line.
record() {
  local line
  if [ "$3" = - ]; then
    line="$(printf '%-4s %-22s %16s  %s' "$1" "$2" "" "$5")"
  else
    line="$(printf '%-4s %-22s %4ss (cap %3ss)  %s' "$1" "$2" "$3" "$4" "$5")"
  fi
  if [ -n "$current" ]; then
    sed -i '$d' "$summary"
  fi
  echo "$line" >>"$summary"
  case "$1" in
    ok) passed=$((passed + 1)) ;;
    SKIP) skipped=$((skipped + 1)) ;;
    *) failed=$((failed + 1)) ;;
  esac
  echo "-- $line"
}

skip() { # skip NAME REASON
  record SKIP "$1" - - "$2"
}

# What the summary says about a finished step, from its log: a test runner's closing line, the
# sanitizer's summary, the last epoch's loss and accuracy, the bench rows; else, for a failure,
# the log's last line.
step_note() {
  local name="$1" log="$2" rc="$3" cap="$4" note=""
  case "$name" in
    test-*)
      note="$(grep -E '^test result:|^[0-9]+ passed, [0-9]+ failed' "$log" | tail -n 1 | sed 's/^test result: //; s/; finished in .*//')"
      ;;
    sanitizer-*)
      note="$(grep -E '(ERROR|RACECHECK) SUMMARY' "$log" | sed 's/^=* *//' | paste -sd';' -)"
      # Cut off by its cap, the tool prints no summary: count what it reported until then.
      if [ -z "$note" ] && [ "$rc" -ne 0 ]; then
        note="no summary; $(grep -cE '^========= (Invalid|Error|Uninitialized|Barrier|Race|Program hit|Warning)' "$log") findings printed"
      fi
      # Exit 86 is a finding; any other failure is the program's own, and says why.
      if [ "$rc" -ne 0 ] && [ "$rc" -ne 86 ] && [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ]; then
        note="${note:+$note; }$(grep -v -e '^=========' -e '^\s*$' "$log" | tail -n 1 | cut -c1-140)"
      fi
      ;;
    train)
      note="$(grep 'epoch done' "$log" | tail -n 1 |
        sed -E 's/.*epoch done//; s/ (img_s|seconds)=[^ ]*//g; s/^ +//')"
      ;;
    bench-matrix)
      local rows errors
      rows="$(grep -c '^{' "$log")"
      errors="$(grep '^{' "$log" | grep -c '"error"')"
      # No row at all: the matrix never started, and its last line says why.
      [ "$rows" -gt 0 ] && note="$rows rows, $errors failed"
      ;;
  esac
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    note="timed out at the ${cap}s cap${note:+; $note}"
  elif [ "$rc" -ne 0 ] && [ -z "$note" ]; then
    note="$(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-160)"
  fi
  echo "$note"
}

# step NAME CAP MIN CMD...: runs CMD in the bundle folder for at most CAP seconds (less if the
# budget, after the later phases' floors, is shorter; skipped under MIN), output to NAME.log.
step() {
  local name="$1" cap="$2" min="$3" log="$report/$1.log" start rc secs limit note status
  shift 3
  limit=$((deadline - SECONDS - reserve))
  [ "$limit" -gt "$cap" ] && limit="$cap"
  if [ "$limit" -lt "$min" ]; then
    skip "$name" "budget: ${limit}s left for it, needs ${min}s"
    return 0
  fi
  echo "== $name (cap ${limit}s): $*"
  printf '%-4s %-22s started at +%ss, cap %ss\n' RUN "$name" "$SECONDS" "$limit" >>"$summary"
  current="$name"
  {
    echo "\$ $*"
    echo "# $(date -u '+%Y-%m-%dT%H:%M:%SZ'), cap ${limit}s"
  } >"$log"
  start=$SECONDS
  # In the background so that a signal to this script is handled at once (see on_signal).
  (cd "$here" && exec timeout -k 5 "$limit" "$@") >>"$log" 2>&1 </dev/null &
  child=$!
  wait "$child"
  rc=$?
  child=""
  secs=$((SECONDS - start))
  [ "$rc" -eq 124 ] && echo "# timed out after ${limit}s" >>"$log"
  sed -n '3,$p' "$log" | tail -n 5 | sed 's/^/   /'
  note="$(step_note "$name" "$log" "$rc" "$limit")"
  status=ok
  [ "$rc" -ne 0 ] && status=FAIL
  record "$status" "$name" "$secs" "$limit" "exit $rc${note:+  $note}"
  current=""
  return 0
}

# Killed from outside (a time limit): stop the running step and say where the run ended.
on_signal() {
  [ -n "$child" ] && kill -TERM "$child" 2>/dev/null
  if [ -n "$current" ]; then
    sed -i '$d' "$summary"
    printf '%-4s %-22s killed by SIG%s after %ss\n' FAIL "$current" "$1" "$SECONDS" >>"$summary"
  fi
  echo "gpu-check: killed by SIG$1 after ${SECONDS}s" | tee -a "$summary" >&2
  exit 143
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal HUP' HUP

# The bench table from every JSON line so far; in bench.txt and on the console.
bench_table() {
  grep -h '^{' "$report"/bench-*.log "$report"/pytorch-*.log >"$report/bench.jsonl" 2>/dev/null
  if ! command -v python3 >/dev/null; then
    echo "(no python3: no bench table; the JSON lines are in bench.jsonl)" | tee "$report/bench.txt"
  elif [ -s "$report/bench.jsonl" ]; then
    python3 "$here/bench_report.py" "$report/bench.jsonl" >"$report/bench.txt" 2>&1
    cat "$report/bench.txt"
  fi
}

# compute-sanitizer: PATH, then a CUDA toolkit's usual places, then the NVIDIA pip wheel.
find_sanitizer() {
  local c py
  if [ -n "${COMPUTE_SANITIZER:-}" ]; then
    echo "$COMPUTE_SANITIZER"
    return
  fi
  command -v compute-sanitizer 2>/dev/null && return
  for c in ${CUDA_HOME:+"$CUDA_HOME/bin/compute-sanitizer"} /usr/local/cuda/bin/compute-sanitizer \
    /usr/local/cuda-*/bin/compute-sanitizer; do
    [ -x "$c" ] && echo "$c" && return
  done
  c="$(find /opt/nvidia -maxdepth 7 -name compute-sanitizer -type f -perm -u+x 2>/dev/null | sort -r | head -n 1)"
  [ -n "$c" ] && echo "$c" && return
  for py in "${INCEPT_PYTHON:-}" python3; do
    if [ -z "$py" ] || ! command -v "$py" >/dev/null 2>&1; then continue; fi
    c="$(timeout 20 "$py" -c 'import os, nvidia; print(next((p for b in nvidia.__path__ for p in [os.path.join(b, "cuda_sanitizer_api", "compute-sanitizer", "compute-sanitizer")] if os.access(p, os.X_OK)), ""))' 2>/dev/null)"
    [ -n "$c" ] && echo "$c" && return
  done
}

phase 1 "incept info"
step info "$cap_info" 3 ./incept info
sed -n '3,$p' "$report/info.log" | sed 's/^/   /' | head -n 40

phase 2 "train ${epochs} epochs on synthetic data (--device cuda)"
step synth-data "$cap_synth" 3 ./incept data synth --out "$work/synth" \
  --train "$synth_train" --test "$synth_test" --seed 0
if [ -f "$work/synth/test_batch.bin" ]; then
  step train "$cap_train" 5 ./incept train --device cuda --data-dir "$work/synth" \
    --epochs "$epochs" -b 128 --log-interval 8 --output "$work/runs" --experiment gpu-check
  grep -E ': (train|epoch done|mixed precision) ' "$report/train.log" | sed 's/^[^ ]* *//; s/^/   /'
  for f in summary.csv metrics.jsonl args.json; do
    [ -f "$work/runs/gpu-check/$f" ] && cp "$work/runs/gpu-check/$f" "$report/train-$f"
  done
  # Data parallelism over NCCL, where there are two GPUs: 2 ranks started as torchrun would,
  # each on GPU LOCAL_RANK; both must finish and report the same all-reduced epoch.
  gpus="$(timeout 20 nvidia-smi -L 2>/dev/null | grep -c '^GPU ')"
  if [ "${gpus:-0}" -ge 2 ]; then
    step train-2-ranks "$cap_train" 5 bash -c '
      port=$((29500 + RANDOM % 1000))
      mkdir -p "$2"
      pids=()
      for r in 0 1; do
        RANK=$r LOCAL_RANK=$r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=$port \
          ./incept train --device cuda --data-dir "$1" --epochs 1 -b 64 --log-interval 8 \
          --output "$2/rank$r" --experiment gpu-check >"$2/rank$r.log" 2>&1 &
        pids+=($!)
      done
      wait "${pids[0]}"; zero=$?; wait "${pids[1]}"; one=$?
      cat "$2/rank0.log"; echo "---- rank 1"; cat "$2/rank1.log"
      [ "$zero" -eq 0 ] && [ "$one" -eq 0 ] || exit 1
      a="$(grep -o "epoch done.*img_s" "$2/rank0.log")"; b="$(grep -o "epoch done.*img_s" "$2/rank1.log")"
      [ -n "$a" ] && [ "$a" = "$b" ] || { echo "the ranks report different epochs"; exit 1; }' \
      _ "$work/synth" "$work/ranks"
  else
    skip train-2-ranks "${gpus:-0} GPU(s): the 2-rank NCCL run needs two"
  fi
else
  skip train "no synthetic data (see synth-data.log)"
fi

phase 3 "GPU tests (INCEPT_EXPECT_GPU=1: no GPU fails them)"
if [ -f "$here/tests.txt" ]; then
  while IFS=$'\t' read -r name filter; do
    [ -n "$name" ] || continue
    cap="$cap_test"
    case "$name" in unit-*) cap="$cap_unit" ;; esac
    # --quick narrows the GPU harness (no filter of its own) to a subset.
    [ -z "$filter" ] && filter="$test_filter"
    # shellcheck disable=SC2086  # GPU_TEST_ARGS is a list of arguments
    step "test-$name" "$cap" 5 env INCEPT_EXPECT_GPU=1 "./tests/$name" ${filter:+"$filter"} ${GPU_TEST_ARGS:-}
  done <"$here/tests.txt"
else
  record FAIL tests 0 0 "no tests.txt in the bundle: rebuild it with \`make gpu-bundle\`"
fi

phase 4 "compute-sanitizer: $sanitizer_tools"
sanitizer="$(find_sanitizer)"
if [ -z "$sanitizer" ]; then
  for tool in $sanitizer_tools; do
    skip "sanitizer-$tool" "no compute-sanitizer on PATH, in /usr/local/cuda*/bin, /opt/nvidia or the NVIDIA wheels (set COMPUTE_SANITIZER)"
  done
else
  echo "compute-sanitizer: $sanitizer"
  # Two training steps and one eval batch: the instrumented kernels run 10-100x slower.
  step sanitizer-data "$cap_sandata" 3 ./incept data synth --out "$work/tiny" --train 64 --test 32 --seed 1
  for tool in $sanitizer_tools; do
    if [ ! -f "$work/tiny/test_batch.bin" ]; then
      skip "sanitizer-$tool" "no synthetic data (see sanitizer-data.log)"
      continue
    fi
    # --deterministic: cuDNN's heuristics pick the algorithms, where cudnnFind would run every
    # candidate under the instrumentation. --no-cuda-graph: every kernel is its own launch, so
    # a finding names the kernel. A finding makes the step fail (exit 86).
    step "sanitizer-$tool" "$sanitizer_cap" 10 "$sanitizer" --tool "$tool" --error-exitcode 86 \
      --print-limit 20 ./incept train --device cuda --no-cuda-graph --deterministic \
      --data-dir "$work/tiny" -b 32 --eval-batch-size 32 --epochs 1 --log-interval 1 \
      --output "$work/sanitizer" --experiment "$tool"
  done
fi

phase 5 "bench matrix"
step bench-matrix "$cap_bench" 10 ./incept bench --device cuda --matrix "${bench_args[@]}" --json
bench_table

phase 6 "PyTorch eager and torch.compile (AMP), and incept's ratios to them"
torch_py="${TORCH_PYTHON:-python3}"
probe_cap=$((deadline - SECONDS))
[ "$probe_cap" -gt "$cap_probe" ] && probe_cap="$cap_probe"
if ! command -v "$torch_py" >/dev/null; then
  skip pytorch "no $torch_py"
elif [ "$probe_cap" -lt 5 ]; then
  skip pytorch "budget spent"
else
  # Not a step of its own: a machine without torch is not a failure of this check.
  start=$SECONDS
  timeout -k 5 "$probe_cap" "$torch_py" -c '
import sys
try:
    import torch
except ImportError as e:
    sys.exit(f"no torch: {e}")
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) on {torch.cuda.get_device_name()}")
' >"$report/torch-probe.log" 2>&1 </dev/null
  rc=$?
  probe="$(grep -v '^\s*$' "$report/torch-probe.log" | tail -n 1 | cut -c1-120)"
  [ "$rc" -eq 124 ] && probe="importing torch took over ${probe_cap}s"
  if [ "$rc" -eq 0 ]; then
    record ok torch-probe $((SECONDS - start)) "$probe_cap" "$probe"
    batch_args=()
    for b in $torch_batches; do batch_args+=(-b "$b"); done
    step pytorch-eager "$cap_eager" 10 "$torch_py" ./pytorch_baseline.py "${batch_args[@]}" \
      "${torch_steps[@]}" --no-compile --json
    # torch.compile AMP, training steps only, at the first batch size: each compiled mode and
    # batch size costs a compilation of its own (tens of seconds), the most this check can
    # afford; the step is skipped rather than cut off when less is left.
    step pytorch-compile "$cap_compile" 30 "$torch_py" ./pytorch_baseline.py -b "${torch_batches%% *}" \
      "${torch_steps[@]}" --compile-only --precision amp --no-eval --json
    echo
    bench_table
  else
    skip pytorch "$torch_py: $probe"
  fi
fi

echo
echo "==== summary ($summary)"
line="$passed passed, $failed failed, $skipped skipped"
echo "# ${SECONDS}s in all" >>"$summary"
echo "$line" >>"$summary"
cat "$summary"
[ "$failed" -eq 0 ]
