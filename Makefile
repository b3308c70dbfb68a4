# Two set-up commands that work on a fresh machine:
#   make run   - create .venv, install cvmig, run a local live migration with defaults
#   make test  - create .venv with the test dependencies and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { apt-get update -q && apt-get install -y -q python3 python3-venv; }
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "cvmig needs Python 3.11+"'
	@$(PYTHON) -m venv --help >/dev/null 2>&1 || { apt-get update -q && apt-get install -y -q python3-venv; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/cvmig migrate

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
