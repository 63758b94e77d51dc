#!/usr/bin/env bash
# Assembles the PTX that build.rs generated with ptxas for real GPUs (default sm_80 and sm_90),
# so a kernel that NVRTC/nvcc accepted but the driver's JIT would reject fails here, without a GPU.
#
#   scripts/ptx-check.sh [PTX files or folders...]
#
# Without arguments: the OUT_DIR of the newest `cargo build --features cudnn` (the incept-*/out
# folder under target/*/build whose kernels.rs is newest). Architectures: $PTX_CHECK_ARCHS.
# ptxas: $PTXAS, else $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin, PATH, else the pip
# wheel nvidia-cuda-nvcc-cu12 (nvidia/cuda_nvcc/bin/ptxas) of $INCEPT_PYTHON or python3.
set -euo pipefail
cd "$(dirname "$0")/.."
archs="${PTX_CHECK_ARCHS:-sm_80 sm_90}"

find_ptxas() {
  if [ -n "${PTXAS:-}" ]; then echo "$PTXAS"; return; fi
  local root
  for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
    if [ -n "$root" ] && [ -x "$root/bin/ptxas" ]; then echo "$root/bin/ptxas"; return; fi
  done
  if command -v ptxas >/dev/null; then command -v ptxas; return; fi
  local py site
  for py in "${INCEPT_PYTHON:-}" python3; do
    [ -n "$py" ] && command -v "$py" >/dev/null || continue
    while IFS= read -r site; do
      if [ -n "$site" ] && [ -x "$site/nvidia/cuda_nvcc/bin/ptxas" ]; then
        echo "$site/nvidia/cuda_nvcc/bin/ptxas"; return
      fi
    done < <("$py" -c 'import site, sys
d = []
try: d += site.getsitepackages()
except Exception: pass
try: d.append(site.getusersitepackages())
except Exception: pass
print("\n".join(d + [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]))' 2>/dev/null || true)
  done
  return 1
}

if ! ptxas="$(find_ptxas)"; then
  cat >&2 <<'MSG'
ptx-check: ptxas not found. Install the CUDA toolkit (set CUDA_HOME), or
  pip install nvidia-cuda-nvcc-cu12   (e.g. into the venv of scripts/cuda-venv.sh)
and set INCEPT_PYTHON to that venv's python (or PTXAS to the ptxas binary).
MSG
  exit 1
fi

files=()
if [ $# -gt 0 ]; then
  for arg in "$@"; do
    if [ -d "$arg" ]; then
      for f in "$arg"/*.ptx; do [ -e "$f" ] && files+=("$f"); done
    else
      files+=("$arg")
    fi
  done
else
  target="${CARGO_TARGET_DIR:-target}"
  newest="$(ls -t "$target"/*/build/incept-*/out/kernels.rs "$target"/*/*/build/incept-*/out/kernels.rs 2>/dev/null | head -n 1 || true)"
  if [ -z "$newest" ]; then
    echo "ptx-check: no PTX under $target/*/build/incept-*/out: run \`cargo build --features cudnn\` first" >&2
    exit 1
  fi
  out="$(dirname "$newest")"
  for f in "$out"/*.ptx; do [ -e "$f" ] && files+=("$f"); done
  echo "ptx-check: $out"
  for cu in cuda/*.cu cuda/*.cuh; do
    if [ -e "$cu" ] && [ "$cu" -nt "$newest" ]; then
      echo "ptx-check: warning: $cu changed after that build; run \`cargo build --features cudnn\` again" >&2
    fi
  done
fi
if [ ${#files[@]} -eq 0 ]; then
  echo "ptx-check: no .ptx files to check (is cuda/ empty?)" >&2
  exit 1
fi

echo "ptx-check: $("$ptxas" --version | tail -n 1) ($ptxas)"
failed=0
for f in "${files[@]}"; do
  version="$(sed -n 's/^\.version[[:space:]]*//p' "$f" | head -n 1)"
  for arch in $archs; do
    if log="$("$ptxas" -arch="$arch" "$f" -o /dev/null 2>&1)"; then
      echo "ok    $(basename "$f") (PTX ISA $version) $arch"
    else
      echo "FAIL  $(basename "$f") (PTX ISA $version) $arch:"
      echo "$log" | sed 's/^/      /'
      failed=$((failed + 1))
    fi
  done
done
if [ "$failed" -gt 0 ]; then
  echo "ptx-check: $failed failed" >&2
  exit 1
fi
n_archs="$(wc -w <<<"$archs")"
echo "ptx-check: ${#files[@]} files x $n_archs architectures passed"
