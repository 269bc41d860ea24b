# Two commands: `make run` (set up, then serve on 0.0.0.0:5050 with SQLite under ./var)
# and `make test` (set up, lint, then the whole test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup run test lint demo bench clean

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "WCMS needs Python 3.11 or newer ($(PYTHON) is $$($(PYTHON) -V))"; exit 1; }
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing python3-venv (Debian/Ubuntu)"; \
	    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && rm -rf $(VENV) && $(PYTHON) -m venv $(VENV); \
	  else echo "cannot create a venv: run 'sudo apt-get install python3-venv', then make again"; exit 1; fi; }
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[server,client,dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

setup: $(STAMP)

run: setup
	$(BIN)/wcms db upgrade
	$(BIN)/wcms admin bootstrap
	$(BIN)/wcms server run

lint: setup
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

demo: setup
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
