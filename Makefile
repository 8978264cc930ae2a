# Single entry point: CI calls `make test`; a newcomer runs `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch lies on disk; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install test test-slow demo lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install $(TORCH_PIN)
	$(BIN)/pip install -e '.[test,experiments]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

demo: install
	$(BIN)/lossprune sweep --preset digits-quick

lint: install
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check src tests

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
