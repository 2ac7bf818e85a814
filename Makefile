# Set-up and entry points. `make demo` and `make test` each do the whole set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TTA := $(VENV)/bin/tta
STAMP := $(VENV)/.tta-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
FMNIST_C := data/fashion-mnist-c
# From the checkout, data lives in ./data (an installed runtime defaults to the per-user data folder).
export TTA_DATA_DIR ?= $(CURDIR)/data
# Main job defaults: the continual benchmark on a documented subset (DEMO_LIMIT images per domain).
# Adapters: the strongest of the settings x seeds table that fit the ~5-minute budget, source and BN as
# references; DEMO_PRESET=tuned: the values `tta tune` chose on the validation corruptions
# (presets/tuned.yaml; adapters without an entry there run at paper defaults). BENCHMARKS.md, "Main job".
DEMO_ADAPTERS ?= source,bn,tent,roid
DEMO_LIMIT ?= 2000
DEMO_PRESET ?= tuned
ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo demo-full test test-all setup data data-all data-val bench bench-table clean

demo: setup data
	$(TTA) bench --adapters $(DEMO_ADAPTERS) --limit $(DEMO_LIMIT) --preset $(DEMO_PRESET) --out runs/demo $(ARGS)

demo-full: setup data
	$(TTA) bench --adapters $(DEMO_ADAPTERS) --full --preset $(DEMO_PRESET) --out runs/demo-full $(ARGS)

test: setup $(FMNIST)
	$(PY) -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-all: setup $(FMNIST)
	$(PY) -m pytest -q $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard CMakeLists.txt) $(shell find csrc -type f 2>/dev/null)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q --no-build-isolation -e '.[torch,test]'
	touch $@

$(FMNIST):
	$(SUDO) apt-get update -q
	$(SUDO) apt-get install -y -q dataset-fashion-mnist

data: setup $(FMNIST)
	$(TTA) make-c --dataset fashion-mnist --out $(FMNIST_C) --severities 5

# Every severity (the gradual setting) and the validation corruptions (`tta tune`, stream fmnist-c-val).
data-all: setup $(FMNIST)
	$(TTA) make-c --dataset fashion-mnist --out $(FMNIST_C) --severities 1-5

data-val: setup $(FMNIST)
	$(TTA) make-c --dataset fashion-mnist --out data/fashion-mnist-c-val --corruptions validation --severities 5

# The settings x seeds table of BENCHMARKS.md: many CPU-hours (BENCHMARKS.md, "Settings x seeds");
# resumable (a rerun skips finished cells); ARGS="--ray" spreads it over a local Ray instance.
bench-table: setup data-all data-val
	nice -n 10 $(TTA) matrix bench/matrix.yaml --out runs/matrix $(ARGS)

bench: setup data
	nice -n 10 $(PY) -m pytest bench/bench_ops.py -q --benchmark-json=runs/bench_ops.json
	$(PY) bench/bench_ops.py runs/bench_ops.json
	$(PY) bench/bench_adapters.py --rounds 5 --warmup 1 --engine-overhead
	$(PY) bench/bench_corruptions.py
	$(PY) bench/bench_edge.py

clean:
	rm -rf build dist runs $(VENV) *.egg-info
