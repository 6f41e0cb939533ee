# mtls-mesh — every target creates and uses .venv itself; a new machine needs only Python 3.11+ and make.
.DEFAULT_GOAL := help
.PHONY: help venv pki pki-force run call demo test test-unit lint fmt clean

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PORTS  ?= 8443,8444,8445
PYTEST_ARGS ?=
comma  := ,

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-10s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is needed (PYTHON=$(PYTHON))")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(VENV)/.installed ## create .venv with the runtime and dev dependencies

pki: $(VENV)/.installed ## create pki/out/: CA, identities, allow-lists (keeps what exists)
	$(PY) -m pki init

pki-force: $(VENV)/.installed ## throw pki/out/ away and make a new CA and identities
	$(PY) -m pki init --force

run: pki ## run A, B, C on 127.0.0.1 (PORTS=8443,8444,8445); Ctrl-C stops all three
	$(PY) -m services.local --ports $(PORTS)

call: $(VENV)/.installed ## call service-a as the client (while `make run` is going)
	$(PY) -m client https://127.0.0.1:$(firstword $(subst $(comma), ,$(PORTS)))/chain

demo: $(VENV)/.installed ## the whole story: start the mesh, call it, show who is refused, stop
	$(PY) -m client.demo

test: lint ## lint, then every test (unit and end-to-end with real uvicorn processes)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(VENV)/.installed ## ruff format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean: ## remove .venv, caches and the generated PKI
	rm -rf $(VENV) pki/out .pytest_cache .ruff_cache *.egg-info
