#!/usr/bin/env bash
# Creates (or reuses) a Python venv holding the NVIDIA CUDA 12 wheels that build.rs needs for
# `--features cudnn` on a machine without the CUDA toolkit: NVRTC (compiles cuda/*.cu to PTX),
# the runtime headers (cuda_fp16.h, cuda_bf16.h), ptxas (scripts/ptx-check.sh) and the NVTX 3
# headers (cuda/nvtx.c). With INCEPT_CUDA_WHEELS it makes any other set, e.g. the CUDA 13
# runtime libraries that .ci/run checks `incept info` against.
#
#   export INCEPT_PYTHON="$(scripts/cuda-venv.sh)"     # prints the venv's python, nothing else
#
# Folder: $1, else $INCEPT_CUDA_VENV, else ${TMPDIR:-/tmp}/incept-cuda-venv (outside the repo, so
# cargo and the GPU bundle never see it). Progress goes to stderr.
#
# Versions: CUDA 12.4. NVRTC 12.x emits PTX ISA 8.x with x = its minor version (12.8 -> 8.7,
# 12.9 -> 8.8), and a driver older than that CUDA release refuses to load the PTX. PTX from
# NVRTC 12.4 (ISA 8.4) loads on any driver from R550 (CUDA 12.4) on, which covers the GPU
# machines we know of; a newer NVRTC would demand a newer driver for no gain in these
# kernels. Override with INCEPT_CUDA_WHEELS="nvidia-cuda-nvrtc-cu12==X ...".
set -euo pipefail

venv="${1:-${INCEPT_CUDA_VENV:-${TMPDIR:-/tmp}/incept-cuda-venv}}"
wheels="${INCEPT_CUDA_WHEELS:-nvidia-cuda-nvrtc-cu12==12.4.127 nvidia-cuda-runtime-cu12==12.4.127 nvidia-cuda-nvcc-cu12==12.4.131 nvidia-nvtx-cu12==12.4.127}"
python="${PYTHON3:-python3}"
log() { echo "cuda-venv: $*" >&2; }

if ! command -v "$python" >/dev/null; then
  log "$python not found: install Python 3 (apt-get install python3 python3-venv)"
  exit 1
fi

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
  rm -rf "$venv"
  if ! "$python" -m venv "$venv" >/dev/null 2>&1; then
    rm -rf "$venv"
    # Debian/Ubuntu ship venv (ensurepip) separately.
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
      log "python3 -m venv unavailable: installing python3-venv with apt-get"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq >&2
      apt-get install -y -qq python3-venv >&2 || apt-get install -y -qq "python${pyver}-venv" >&2
      "$python" -m venv "$venv" >&2
    else
      log "python3 -m venv failed: install python3-venv (as root: apt-get install python3-venv)"
      exit 1
    fi
  fi
  log "created $venv"
fi

# Install only when the pinned set is not already there (pip's own check is slower).
stamp="$venv/.incept-wheels"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wheels" ]; then
  log "pip install $wheels"
  # shellcheck disable=SC2086  # $wheels is a list of requirement specifiers
  "$venv/bin/python" -m pip install --disable-pip-version-check -q $wheels >&2
  echo "$wheels" >"$stamp"
fi
echo "$venv/bin/python"
