# Two commands for a fresh machine:  `make run`  (install + start)  and  `make test`  (install + test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install install-dev system-deps run dev test lint bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.runtime: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements-dev.txt
	touch $(VENV)/.runtime $@

install: $(VENV)/.runtime
install-dev: $(VENV)/.dev

run: install  ## start the server with the settings from the environment and .env
	$(BIN)/python main.py

dev: install  ## development server that reloads on code changes
	$(BIN)/uvicorn main:app --reload --reload-dir real_time_audio --host 127.0.0.1 --port 8000

system-deps:  ## espeak-ng, which the speech tests use to synthesize speech (installed when root)
	@command -v espeak-ng >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get install -y -qq espeak-ng >/dev/null 2>&1 || \
	     (apt-get update -qq >/dev/null && apt-get install -y -qq espeak-ng >/dev/null)); \
	  else echo "espeak-ng is missing: install it (apt-get install espeak-ng) or the speech tests are skipped"; fi; }

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: install-dev system-deps lint  ## lint, type-check and run the whole test suite
	$(BIN)/python -m pytest

bench: install-dev  ## batched vs sequential inference on the tiny architecture (needs ../shared)
	$(BIN)/python bench/batch_vs_sequential.py
