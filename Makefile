# lwq: two commands on a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test test-fast bench-kernels lint clean

# torch: keep one that is already installed; else take a local CPU wheel when pip is configured with
# one (find-links; seconds, offline), else the registry's default build for this platform.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q --no-index torch 2>/dev/null || $(BIN)/pip install -q torch
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/lwq demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench-kernels: install
	$(BIN)/python benchmarks/kernels.py

# ruff (fetched on first use) and the structure test: no import circles, imports only run down the layers
lint: install
	$(BIN)/python -m ruff --version >/dev/null 2>&1 || $(BIN)/pip install -q ruff
	$(BIN)/python -m ruff check lwq tests benchmarks
	$(BIN)/python -m pytest -q tests/test_structure.py

clean:
	rm -rf $(VENV) lwq-demo benchmarks/out .pytest_cache
