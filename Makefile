# lwq: two commands on a fresh machine (see README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

LOCK ?= constraints.txt
SCRATCH ?= .venv-upgrade
PIP_ARGS ?=

.PHONY: install demo test test-fast bench-kernels lint lock upgrade-check clean

# Reproducible: every install is held to $(LOCK), the versions the suite last passed with. torch is pinned
# by its public version, so pip takes a locally configured CPU wheel when it has one (find-links;
# seconds, offline) and the registry's default build for this platform otherwise. PIP_ARGS passes
# options to pip, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu".
$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c $(LOCK) $(PIP_ARGS) torch
	$(BIN)/pip install -q -c $(LOCK) $(PIP_ARGS) -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/lwq demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench-kernels: install
	$(BIN)/python benchmarks/kernel_speed.py

# ruff (fetched on first use) and the structure test: no import circles, imports only run down the layers
lint: install
	$(BIN)/python -m ruff --version >/dev/null 2>&1 || $(BIN)/pip install -q ruff
	$(BIN)/python -m ruff check lwq tests benchmarks
	$(BIN)/python -m pytest -q tests/test_structure.py

# rewrite the lock from .venv (run after `make test` passed on the versions you want to pin)
lock:
	$(BIN)/python .ci/lock.py write $(LOCK)

# not in CI: the newest versions pyproject.toml allows, in a scratch venv; says what moved, runs the fast tests
upgrade-check:
	rm -rf $(SCRATCH)
	$(PYTHON) -m venv $(SCRATCH)
	$(SCRATCH)/bin/pip install -q --upgrade $(PIP_ARGS) -e ".[test]"
	$(SCRATCH)/bin/python .ci/lock.py diff $(LOCK)
	$(SCRATCH)/bin/python -m pytest -q -m "not slow" -p no:cacheprovider \
		--deselect tests/test_lock.py::test_lock_pins_each_installed_requirement_of_lwq_test  # the diff above says it

clean:
	rm -rf $(VENV) $(SCRATCH) lwq-demo benchmarks/out .pytest_cache
