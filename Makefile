# Two commands: `make run` (set up, then serve on 0.0.0.0:5050 with SQLite under ./var)
# and `make test` (set up, lint, then the whole test suite).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: setup run test pytest test-wine lint demo bench screenshots mutants clean

# The suite runs in TEST_WORKERS processes (pytest-xdist): most tests wait on real servers and
# clients, not on the CPU, so more workers than cores pays. Worksteal: a worker that runs out of
# tests takes half of a busy one's (the default hands out fixed shares: with a few 30-50 s tests
# in one share, one worker ran alone for the last minute). Tests marked `serial` measure latency
# under load and run alone afterwards.
TEST_WORKERS ?= 6

# Python caches compiled modules in __pycache__ unless told not to (some machines' environments
# do): without the cache every server, client and test process compiles the same sources again.
unexport PYTHONDONTWRITEBYTECODE

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
	$(BIN)/ruff check src tests bench scripts tools
	$(BIN)/ruff format --check src tests bench scripts tools
	$(BIN)/mypy

test: lint pytest

# PYTEST_SELECT narrows both phases, e.g. "and not no_database" (CI's PostgreSQL pass).
# The Windows client under Wine is its own run (make test-wine, CI's third step): it needs
# Wine set up (tools/wine/setup.sh) and a few minutes of its own.
pytest: setup
	$(BIN)/pytest -n $(TEST_WORKERS) --dist worksteal -m "not serial and not wine $(PYTEST_SELECT)" $(PYTEST_ARGS)
	$(BIN)/pytest -m "serial and not wine $(PYTEST_SELECT)" $(PYTEST_ARGS)

# The Windows service, installer and install chain under Wine (tests/wine); fails, instead of
# skipping, when Wine is missing. Each test process boots its own copy of one prefix.
WINE_WORKERS ?= 2
test-wine: setup
	WCMS_REQUIRE_WINE=1 WCMS_TEST_PORT_BASE=8000 $(BIN)/pytest -n $(WINE_WORKERS) -m wine $(PYTEST_ARGS)

# Delete each named guard in turn (tools/mutants.py) and show a test fails for each.
mutants: setup
	bash tools/mutants.sh

# The dashboard screenshots in docs/screenshots (needs Chromium: apt-get install chromium).
screenshots: setup
	WCMS_SCREENSHOTS_DIR=$(CURDIR)/docs/screenshots $(BIN)/pytest -q tests/browser/test_screenshots.py

demo: setup
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
