# Two commands for a fresh machine: `make demo` (plait's main job) and `make test` (the test suite).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "torch>=2.13,<2.14" -e ".[dev]"
	touch $(STAMP)

.PHONY: demo test lint
demo: $(STAMP)
	$(BIN)/plait demo

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
