# Two commands do all set-up on a fresh machine with Python 3.11 and make:
#   make run    start a roomserver on ws://127.0.0.1:8080/ws (embedded defaults, no external service)
#   make test   install everything into .venv, lint, type-check and run the tests
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8080
# The checkout goes first on sys.path: `roomserver` and the twistd dropin in twisted/plugins are found there.
export PYTHONPATH := $(CURDIR)$(if $(PYTHONPATH),:$(PYTHONPATH))

.PHONY: install run test lint typecheck unit compliance clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.install-stamp: setup.cfg setup.py | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '.[test]'
	touch $@

install: $(VENV)/.install-stamp

run: install
	$(BIN)/twistd --nodaemon --pidfile= roomserver --port tcp:$(PORT):interface=127.0.0.1

lint: install
	$(BIN)/ruff check roomserver tests twisted $(wildcard autobahn-testsuite bench)
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

compliance: install
	$(BIN)/python autobahn-testsuite/run.py

clean:
	rm -rf $(VENV) build *.egg-info twisted/plugins/dropin.cache autobahn-testsuite/reports
