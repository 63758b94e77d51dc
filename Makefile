# Common tasks. CI runs .ci/run (fmt, clippy on both feature sets, `cargo test`, the cudnn build
# and ptx-check).
CARGO ?= cargo
PYTHON ?= python3

# `--features cudnn` compiles cuda/*.cu with nvcc or NVRTC (see build.rs). Without a CUDA
# toolkit, `make cuda-venv` installs NVRTC from PyPI into CUDA_VENV; once it exists, make uses it.
CUDA_VENV ?= $(or $(TMPDIR),/tmp)/incept-cuda-venv
ifeq ($(origin INCEPT_PYTHON),undefined)
ifneq ($(wildcard $(CUDA_VENV)/bin/python),)
export INCEPT_PYTHON := $(CUDA_VENV)/bin/python
endif
endif

.PHONY: build test lint fmt bench bench-pytorch train cuda-venv build-cudnn ptx-check gpu-bundle gpu-check

build:
	$(CARGO) build --release

test:
	$(CARGO) test

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --features cudnn -- -D warnings

fmt:
	$(CARGO) fmt --all

# incept's CPU throughput alone.
bench: build
	./target/release/incept bench --device cpu -b 128

# incept and PyTorch side by side (PYTHON must have torch).
bench-pytorch:
	PYTHON=$(PYTHON) benches/cpu_vs_pytorch.sh 3 128

# NVRTC, CUDA headers and ptxas from PyPI (no CUDA toolkit needed), into CUDA_VENV.
cuda-venv:
	scripts/cuda-venv.sh $(CUDA_VENV) >/dev/null

# The GPU build (compiles cuda/*.cu to PTX; runs anywhere, no GPU needed).
build-cudnn:
	$(CARGO) build --features cudnn

# Assemble the PTX of the last cudnn build with ptxas for sm_80 and sm_90.
ptx-check:
	scripts/ptx-check.sh

# target/gpu-bundle/: release binary + GPU test executables + gpu-check.sh, to copy to a GPU
# machine that has no Rust toolchain.
gpu-bundle:
	scripts/gpu-bundle.sh

# The GPU check from the bundle (info, training, GPU tests, compute-sanitizer, bench matrix,
# PyTorch ratios); report in target/gpu-check/. GPU_CHECK_ARGS=--quick: the short version.
GPU_CHECK_ARGS ?=
gpu-check:
	@test -x target/gpu-bundle/gpu-check.sh || { echo "no target/gpu-bundle: run \`make gpu-bundle\` first (on a machine with cargo)"; exit 1; }
	target/gpu-bundle/gpu-check.sh $(GPU_CHECK_ARGS) target/gpu-check
