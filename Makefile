# The two commands of the quickstart (`make run`, `make test`) need only Python >= 3.11 and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
ARGS   ?=
# Test processes (pytest-xdist, whole files per process): the suite mostly waits on the
# nats-server, broker and PostgreSQL processes it starts, so 4 run well on 2 cores.
# PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 4

.PHONY: run test lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamp files record which extras are installed, so `make run` after `make test` does not reinstall;
# an edited build hook or C accelerator (broker/codecs/_lazy.c) reinstalls, which recompiles it.
$(VENV)/.installed: pyproject.toml hatch_build.py broker/codecs/_lazy.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml hatch_build.py broker/codecs/_lazy.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@ $(VENV)/.installed

$(VENV)/.installed-dev: pyproject.toml hatch_build.py broker/codecs/_lazy.c | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@ $(VENV)/.installed-test $(VENV)/.installed

run: $(VENV)/.installed
	$(BIN)/broker serve $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(ARGS)

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/ingress.py $(ARGS)
	$(BIN)/python benchmarks/registry.py
	$(BIN)/python benchmarks/codecs.py
	$(BIN)/python benchmarks/replay.py
	$(BIN)/python benchmarks/routing.py
	$(BIN)/python benchmarks/auth.py
	$(BIN)/python benchmarks/sensitive.py

clean:
	rm -rf $(VENV) .broker .pytest_cache .mypy_cache .ruff_cache
