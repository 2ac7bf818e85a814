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
DEMO_ADAPTERS ?= source,bn,alpha-bn,tent,adanpc
DEMO_LIMIT ?= 2000
ARGS ?=
PYTEST_ARGS ?=

.PHONY: demo demo-full test test-all setup data bench clean

demo: setup data
	$(TTA) bench --adapters $(DEMO_ADAPTERS) --limit $(DEMO_LIMIT) --out runs/demo $(ARGS)

demo-full: setup data
	$(TTA) bench --adapters $(DEMO_ADAPTERS) --full --out runs/demo-full $(ARGS)

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

bench: setup data
	nice -n 10 $(PY) -m pytest bench/bench_ops.py -q --benchmark-json=runs/bench_ops.json
	$(PY) bench/bench_ops.py runs/bench_ops.json
	$(PY) bench/bench_adapters.py --rounds 5 --warmup 1 --engine-overhead
	$(PY) bench/bench_corruptions.py
	$(PY) bench/bench_edge.py

clean:
	rm -rf build dist runs $(VENV) *.egg-info
