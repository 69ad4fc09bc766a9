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

## make run: start the main job (for now a forward proxy on 127.0.0.1:18080, SOCKS5 on :11080)
run: $(STAMP)
	@echo "pyegress: HTTP proxy on 127.0.0.1:18080, SOCKS5 on 127.0.0.1:11080 (Ctrl-C stops)"
	@echo "try:  curl -x http://127.0.0.1:18080 https://pypi.org/simple/ -o /dev/null -w '%{http_code}\n'"
	@echo "      curl --socks5-hostname 127.0.0.1:11080 http://example.com/"
	$(VENV)/bin/pyegress -L http://127.0.0.1:18080 -L socks5://127.0.0.1:11080

## make test: lint, type-check, then the whole test suite
test: $(STAMP) lint typecheck
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check pyegress tests benchmarks
	$(VENV)/bin/ruff format --check pyegress tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -q -m "not external and not root"

## make bench: the benchmark report (benchmarks/README.md)
bench: $(STAMP)
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache
