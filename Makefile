# Common tasks. `make test` is what CI runs (through .ci/run).
CARGO ?= cargo
PYTHON ?= python3

.PHONY: build test lint fmt bench bench-pytorch train

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
