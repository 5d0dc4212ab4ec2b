# The two commands: `make run` (kernel + 8 agents on the embedded model) and `make test`.
# Both create .venv here. The first install compiles llama.cpp (~9 min on 2 cores); pip caches
# the wheel, so later installs take seconds.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF

.PHONY: run test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	@echo "installing aios (the first time this compiles llama.cpp: about 9 minutes)"
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	@echo "installing aios with dev extras (the first time this compiles llama.cpp: about 9 minutes)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/aios run --agents 8

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check aios tests bench
	$(BIN)/ruff format --check aios tests bench
	$(BIN)/mypy

test: lint
	.ci/install-system
	$(BIN)/pytest

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
