# Two commands do all set-up on a fresh machine with Python 3.11 and make:
#   make run    start a roomserver on ws://127.0.0.1:8080/ws (embedded defaults, no external service)
#   make test   install everything into .venv, lint, type-check and run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8080
# The checkout goes first on sys.path: `roomserver` and the twistd dropin in twisted/plugins are found there.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: install run test lint typecheck unit compliance clean browser haproxy screenshots bench bench-deps

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.install-stamp: setup.cfg setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '.[test]'
	touch $@

# The installed copy (what `.venv/bin/twistd roomserver` runs without this Makefile's PYTHONPATH) follows the
# checkout: reinstalled, without its dependencies, whenever a file of the package changed.
PACKAGE_FILES := $(shell find roomserver twisted -type f -not -path '*/__pycache__/*' 2>/dev/null)
$(VENV)/.package-stamp: $(VENV)/.install-stamp $(PACKAGE_FILES)
	$(BIN)/python -m pip install --quiet --no-deps --force-reinstall .
	touch $@

install: $(VENV)/.package-stamp

run: install
	$(BIN)/twistd --nodaemon --pidfile= roomserver --port tcp:$(PORT):interface=127.0.0.1

lint: install
	$(BIN)/ruff check roomserver tests twisted $(wildcard autobahn-testsuite bench)
	$(BIN)/mypy
	$(BIN)/mypy --strict --ignore-missing-imports autobahn-testsuite/run.py

# The browser tests drive Debian's Chromium through Playwright (never a downloaded browser): install it when
# missing (about a minute; needs root, as on CI and the developers' machines).
CHROMIUM ?= /usr/bin/chromium
browser:
	@command -v $(CHROMIUM) >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

# tests/test_deploy.py runs deploy/haproxy.cfg in Debian's HAProxy: install it when missing (needs root).
HAPROXY ?= /usr/sbin/haproxy
haproxy:
	@command -v $(HAPROXY) >/dev/null 2>&1 || { \
	  echo "installing Debian's haproxy for the deployment tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq haproxy >/dev/null; }

test: lint browser haproxy
	$(BIN)/python -m pytest -q

# Regenerate docs/chat.png and docs/dashboard.png from a live server and Chromium.
screenshots: install browser
	$(BIN)/python -m tests.browser --screenshots docs

compliance: install
	$(BIN)/python autobahn-testsuite/run.py

# The benchmark's load generator and Node peer are a Node.js package in bench/ (npm ci installs its lock file).
bench/node_modules/.package-lock.json: bench/package.json bench/package-lock.json
	cd bench && npm ci --no-audit --no-fund

$(VENV)/.bench-stamp: setup.cfg | $(VENV)/.install-stamp
	$(BIN)/python -m pip install --quiet '.[bench]'
	touch $@

bench-deps: bench/node_modules/.package-lock.json $(VENV)/.bench-stamp

# roomserver beside its peers, alternately, medians of RUNS runs, ratios in the same run (docs/performance.md).
RUNS ?= 3
BENCH_ARGS ?=
bench: install bench-deps
	$(BIN)/python -m bench.run --runs $(RUNS) $(BENCH_ARGS)

clean:
	rm -rf bench/node_modules bench/results
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache autobahn-testsuite/reports
