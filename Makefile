# Single entry point: CI calls `make test`; a newcomer runs `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on disk; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0
# What ruff and mypy check (Markdown is excluded in pyproject.toml).
LINT_PATHS := src tests examples benchmarks docs/conf.py

.PHONY: install test test-slow test-notebooks notebooks demo docs lint format typecheck bench gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install $(TORCH_PIN)
	$(BIN)/pip install -e '.[test,experiments]'
	touch $@

# Each optional extra gets its own stamp, so `make test` never waits for them.
$(VENV)/.installed-%: $(VENV)/.installed
	$(BIN)/pip install -e '.[$*]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

# Executes examples/*.ipynb (slow-marked tests) and checks what they print.
test-notebooks: $(VENV)/.installed-notebooks
	$(BIN)/python -m pytest -q -m slow tests/test_notebooks.py

# Re-executes the notebooks and stores their outputs (run after editing one).
notebooks: $(VENV)/.installed-notebooks
	cd examples && OMP_NUM_THREADS=1 ../$(BIN)/jupyter execute --inplace *.ipynb

# --resume: a second `make demo` finishes or reuses the first one's runs instead of refusing.
demo: install
	$(BIN)/lossprune sweep --preset digits-quick --resume

# HTML documentation in docs/_build/html; any Sphinx warning is an error.
docs: $(VENV)/.installed-docs
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

# lint-imports: the layer contract of pyproject.toml (docs/architecture.md).
lint: $(VENV)/.installed-lint
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/lint-imports

format: $(VENV)/.installed-lint
	$(BIN)/ruff check --fix $(LINT_PATHS)
	$(BIN)/ruff format $(LINT_PATHS)

# Type hints of the public API (files and options in [tool.mypy] of pyproject.toml).
typecheck: $(VENV)/.installed-lint
	$(BIN)/mypy

# Benchmarks against curvlinops and BackPACK, in the project's own .venv (torch 2.13.0). Both
# declare torchvision, which would pull another torch; only backpack/utils/examples.py imports
# it, and nothing here imports that file. So they install with --no-deps, beside the small
# pure-Python packages they import (the `bench` extra of pyproject.toml).
BENCH_BASELINES ?= curvlinops-for-pytorch==3.0.1 backpack-for-pytorch==1.7.1
BENCH_ARGS ?= --quick --out benchmarks/results-cpu-quick.json

$(VENV)/.installed-bench-baselines: $(VENV)/.installed-bench
	$(BIN)/pip install --no-deps $(BENCH_BASELINES)
	touch $@

bench: $(VENV)/.installed-bench-baselines
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# ONE command for a lent GPU (benchmarks/gpu_check.py): CUDA tests, the quick benchmark, 2:4
# speed, QM at π = 140 and a 1B-parameter Llama pruning run, JSON into benchmarks/. It runs on
# the GPU machine's own Python (torch, transformers, pytest; no .venv, nothing installed).
# `make gpu-check GPU_CHECK_ARGS="--device cpu --smoke"` runs every step at tiny sizes here.
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=src $(PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache docs/_build
