# TPI developer entry points. Every target installs what it lacks (hack/ensure-deps.sh).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
# Versions and paths are hack/lib/common.sh's (one place for make and the scripts); make's own
# K8S_VERSION=..., CACHE=..., VENV=... still win, and the paths below follow them.
HACK_DEFAULTS := $(shell bash hack/lib/common.sh print K8S_VERSION CACHE)
K8S_VERSION ?= $(word 1,$(HACK_DEFAULTS))
CACHE ?= $(word 2,$(HACK_DEFAULTS))
HACK_PATHS := $(shell K8S_VERSION='$(K8S_VERSION)' TPI_CACHE='$(CACHE)' bash hack/lib/common.sh print VENV BIN KUBECONFIG_ADMIN)
VENV ?= $(word 1,$(HACK_PATHS))
PY := $(VENV)/bin/python
BIN := $(word 2,$(HACK_PATHS))
export PATH := $(BIN):$(PATH)
export KUBECONFIG := $(word 3,$(HACK_PATHS))

.PHONY: help deps venv tools lint lint-py lint-shell crds test test-unit test-integration test-unit-integration e2e cluster-up cluster-down demo bench clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-22s %s\n", $$1, $$2}'

deps: ## install apt packages, the virtualenv and the Kubernetes tools
	hack/ensure-deps.sh

venv:
	hack/ensure-deps.sh venv

tools:
	hack/ensure-deps.sh tools

lint: venv lint-py lint-shell ## every static check: ruff, mypy (strict, core layers), import-linter contracts, shellcheck

# ruff (checks and formatting) everywhere; mypy strict on tpi_contract, the operator's api/ and core/ and the runtime's
# model/TP/loader/config/settings modules ([tool.mypy]); the layer contracts ([tool.importlinter]).
lint-py: venv
	$(VENV)/bin/ruff check operator runtime contract tests bench hack
	$(VENV)/bin/ruff format --check operator runtime contract tests bench hack
	$(VENV)/bin/mypy
	PYTHONPATH=contract:operator:runtime $(VENV)/bin/lint-imports

lint-shell: ## shellcheck every script in hack/ and .ci/ (following what they source)
	command -v shellcheck >/dev/null || hack/ensure-deps.sh apt
	shellcheck -x $$(grep -rlE '^#!/usr/bin/env bash|^# shellcheck shell=bash' hack .ci)

crds: venv ## regenerate crds/ (and the chart's copy) from the pydantic models
	$(PY) hack/gen_crds.py

test: deps lint test-unit-integration e2e ## every test tier (the README's test command)

test-unit: venv tools ## unit tier: pure functions, runtime on real gloo processes, chart with real helm
	hack/test-unit.sh

test-integration: deps cluster-up ## integration tier: operator and heartbeat against the real local apiserver (the 10-min soak runs alongside)
	hack/test-integration.sh

test-unit-integration: deps cluster-up ## the unit tier beside the integration tier, at a lower CPU priority (what make test runs)
	hack/test-integration.sh --with-unit

e2e: deps ## real-pod tier (a real kubelet node; see README); E2E_ARGS: extra pytest args
	hack/e2e.sh $(E2E_ARGS)

cluster-up: tools ## bring up the local control plane with kwok fake nodes
	hack/cluster.sh up

cluster-down: ## stop the local cluster and delete its state
	hack/cluster.sh down

demo: deps ## bring everything up and print a completion from a TPInferenceCluster
	hack/demo.sh

bench: venv ## benchmarks (runtime vs HF transformers generate and serve; operator at scale)
	$(PY) bench/bench_runtime.py
	$(PY) bench/bench_serving.py
	$(MAKE) cluster-up
	$(PY) bench/bench_operator.py

clean: cluster-down ## remove build leftovers in the clone (caches in ~/.cache/tpi stay)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info operator/*.egg-info runtime/*.egg-info _out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
