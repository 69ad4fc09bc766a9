# The commands a person runs are the ones CI runs (README, .ci/run).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $(STAMP)

## make run: the local demo: sidecar + mutual-TLS h2 link + DMZ + origin (pyegress/demo.py)
run: $(STAMP)
	$(PY) -m pyegress.demo

## make test: lint, type-check, then the whole test suite
test: $(STAMP) lint typecheck
	$(PY) -m pytest -q

LINTED := $(wildcard pyegress tests benchmarks)

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -q -m "not external and not root"

## make bench: the benchmark report (benchmarks/README.md); BENCH_ARGS=--quick for a smoke run
bench: $(STAMP)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
