# The two commands: `make run` (kernel + 8 agents on the embedded model) and `make test`.
# Both create .venv here. The first install compiles llama.cpp (~9 min on 2 cores) into a wheel
# cache keyed by how and for which CPU it was built (~/.cache/aios/wheels), so later installs
# take seconds. Extra CMAKE_ARGS from the environment are added to the build (and to its key).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench clean llama

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Every time (a second when nothing changed): llama-cpp-python built for this machine, with
# AMX switched off on x86-64 (it faults in many VMs); rebuilt when the CPU, the compiler or
# CMAKE_ARGS change. See aios/llm/build.py.
llama: | $(BIN)/python
	$(BIN)/python -m aios.llm.build

$(VENV)/.installed: pyproject.toml | llama
	$(BIN)/pip install -q -e '.[embedded]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | llama
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
