#!/usr/bin/env bash
# Builds target/gpu-bundle/: everything a GPU machine without a Rust toolchain (or internet) needs
# to run the GPU checks, in one small folder to copy over:
#
#   incept              release binary, --features cudnn (PTX embedded)
#   tests/<name>        GPU test executables (debug info stripped)
#   tests.txt           what gpu-check.sh runs: <name> [libtest filter]
#   fixtures/           the golden fixtures the GPU tests read
#   pytorch_baseline.py, seed_model.py, bench_report.py
#                       PyTorch's figures on the same card, and the table of ratios
#   gpu-check.sh        run it there: ./gpu-check.sh [--quick] [report-dir]
#   BUILD-INFO.txt      how it was built
#
# Which tests: integration tests whose target name matches $GPU_TESTS (regex, default `gpu|cuda`,
# `.` for all), plus the library's unit tests filtered by $GPU_UNIT_FILTER (default `cuda`;
# `none` leaves them out). cuDNN, cuBLAS and the driver are not bundled: gpu-check.sh finds them
# on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO="${CARGO:-cargo}"
target_dir="${CARGO_TARGET_DIR:-target}"
bundle="${GPU_BUNDLE_DIR:-$target_dir/gpu-bundle}"
gpu_tests="${GPU_TESTS:-gpu|cuda}"
unit_filter="${GPU_UNIT_FILTER:-cuda}"
limit_mib=64

# A CUDA compiler for build.rs: the toolkit if there is one, else the PyPI wheels.
if [ -z "${INCEPT_PYTHON:-}${INCEPT_NVRTC:-}${CUDA_HOME:-}${CUDA_PATH:-}" ] &&
  ! command -v nvcc >/dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  INCEPT_PYTHON="$(scripts/cuda-venv.sh)"
  export INCEPT_PYTHON
fi

echo "== cargo build --release --features cudnn"
"$CARGO" build --release --features cudnn
# Only the test targets the bundle takes: the others (the kernel emulation's C++ build among
# them) would cost minutes of release build for nothing.
targets=()
while read -r t; do
  targets+=(--test "$t")
done < <("$CARGO" metadata --no-deps --format-version 1 | python3 -c '
import json, re, sys
pattern = re.compile(sys.argv[1])
for pkg in json.load(sys.stdin)["packages"]:
    for t in pkg["targets"]:
        if "test" in t["kind"] and pattern.search(t["name"]):
            print(t["name"])' "$gpu_tests")
[ "$unit_filter" != none ] && targets+=(--lib)
if [ "${#targets[@]}" -eq 0 ]; then
  echo "gpu-bundle: warning: no test target matched GPU_TESTS='$gpu_tests'" >&2
fi
echo "== cargo test --release --features cudnn --no-run ${targets[*]}"
json="$(mktemp)"
trap 'rm -f "$json"' EXIT
if [ "${#targets[@]}" -gt 0 ]; then
  "$CARGO" test --release --features cudnn --no-run --message-format=json "${targets[@]}" >"$json"
fi

rm -rf "$bundle"
mkdir -p "$bundle/tests"
# (name, executable, filter) of every test executable cargo built, chosen as described above.
python3 - "$json" "$gpu_tests" "$unit_filter" >"$bundle/tests.list.tmp" <<'PY'
import json, re, sys
path, pattern, unit_filter = sys.argv[1], re.compile(sys.argv[2]), sys.argv[3]
for line in open(path):
    line = line.strip()
    if not line.startswith("{"):
        continue
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    if not msg.get("profile", {}).get("test"):
        continue
    target = msg["target"]
    kinds, name = target["kind"], target["name"]
    if "test" in kinds and pattern.search(name):
        print(f"{name}\t{msg['executable']}\t")
    elif "lib" in kinds and unit_filter != "none":
        print(f"unit-{name}\t{msg['executable']}\t{unit_filter}")
PY

strip_copy() { # strip_copy SRC DEST: copy without debug info (keeps symbol names for backtraces)
  if command -v objcopy >/dev/null; then
    objcopy --strip-debug "$1" "$2"
  else
    cp "$1" "$2"
  fi
  chmod +x "$2"
}

: >"$bundle/tests.txt"
n=0
while IFS=$'\t' read -r name exe filter; do
  strip_copy "$exe" "$bundle/tests/$name"
  printf '%s\t%s\n' "$name" "$filter" >>"$bundle/tests.txt"
  n=$((n + 1))
done <"$bundle/tests.list.tmp"
rm -f "$bundle/tests.list.tmp"
if [ "$n" -eq 0 ]; then
  echo "gpu-bundle: warning: no test executable matched GPU_TESTS='$gpu_tests'" >&2
fi

strip_copy "$target_dir/release/incept" "$bundle/incept"
cp scripts/gpu-check.sh "$bundle/gpu-check.sh"
# The PyTorch baseline and the seed model it times; the golden fixtures for the GPU tests.
cp benches/pytorch_baseline.py benches/bench_report.py tests/fixtures/seed_model.py "$bundle/"
mkdir -p "$bundle/fixtures"
cp tests/fixtures/*.safetensors "$bundle/fixtures/"
chmod +x "$bundle/gpu-check.sh"

# The newest build script output: older ones stay behind after a change of build.rs.
out_dir=""
for d in "$target_dir"/release/build/incept-*/out; do
  if [ -d "$d" ] && { [ -z "$out_dir" ] || [ "$d" -nt "$out_dir" ]; }; then out_dir="$d"; fi
done
{
  echo "built: $(date -u '+%Y-%m-%dT%H:%M:%SZ') on $(uname -srm)"
  echo "rustc: $(rustc --version 2>/dev/null || echo '?')"
  if [ -n "$out_dir" ] && [ -f "$out_dir/kernels.rs" ]; then
    echo "kernels: $(head -n 1 "$out_dir/kernels.rs" | sed 's|^// ||')"
  fi
  echo "INCEPT_PYTHON=${INCEPT_PYTHON:-} CUDA_HOME=${CUDA_HOME:-}"
  if [ -n "${INCEPT_PYTHON:-}" ]; then
    "$INCEPT_PYTHON" -m pip list 2>/dev/null | grep -i '^nvidia-' || true
  fi
  echo "tests:"
  sed 's/^/  /' "$bundle/tests.txt"
} >"$bundle/BUILD-INFO.txt"

size_kib="$(du -sk "$bundle" | cut -f1)"
echo "gpu-bundle: $bundle ($((size_kib / 1024)) MiB; incept + $n test executables)"
du -h "$bundle"/incept "$bundle"/tests/* 2>/dev/null | sed 's/^/  /'
if [ "$size_kib" -ge $((limit_mib * 1024)) ]; then
  echo "gpu-bundle: $((size_kib / 1024)) MiB is over the ${limit_mib} MiB a GPU session can carry" >&2
  exit 1
fi
