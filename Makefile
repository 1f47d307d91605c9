# TPI developer entry points. Every target installs what it lacks (hack/ensure-deps.sh).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CACHE ?= $(HOME)/.cache/tpi
VENV ?= $(CACHE)/venv
PY := $(VENV)/bin/python
K8S_VERSION ?= v1.34.4
BIN := $(CACHE)/k8s-$(K8S_VERSION)/bin
export PATH := $(BIN):$(PATH)
export KUBECONFIG := $(CACHE)/cluster/kubeconfig
PYTEST := $(PY) -m pytest

.PHONY: help deps venv tools lint lint-py crds test test-unit test-integration e2e cluster-up cluster-down demo bench clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

deps: ## install apt packages, the virtualenv and the Kubernetes tools
	hack/ensure-deps.sh

venv:
	hack/ensure-deps.sh venv

tools:
	hack/ensure-deps.sh tools

lint: venv lint-py ## every static check: ruff, mypy (strict, core layers), import-linter contracts

# ruff everywhere; mypy strict on tpi_contract, the operator's api/ and core/ and the runtime's
# model/TP/loader/config/settings modules ([tool.mypy]); the layer contracts ([tool.importlinter]).
lint-py: venv
	$(VENV)/bin/ruff check operator runtime contract tests bench hack
	$(VENV)/bin/mypy
	PYTHONPATH=contract:operator:runtime $(VENV)/bin/lint-imports

crds: venv ## regenerate crds/ (and the chart's copy) from the pydantic models
	$(PY) hack/gen_crds.py

test: deps lint test-unit test-integration e2e ## every test tier (the README's test command)

test-unit: venv tools ## unit tier: pure functions, runtime on real gloo processes, chart with real helm
	$(PYTEST) tests/unit -q

test-integration: deps cluster-up ## integration tier: operator and heartbeat against the real local apiserver
	$(PYTEST) tests/integration -q -m integration

e2e: deps ## real-pod tier (a real kubelet node; see README); E2E_ARGS: extra pytest args
	hack/e2e.sh $(E2E_ARGS)

cluster-up: tools ## bring up the local control plane with kwok fake nodes
	hack/cluster.sh up

cluster-down: ## stop the local cluster and delete its state
	hack/cluster.sh down

demo: deps ## bring everything up and print a completion from a TPInferenceCluster
	hack/demo.sh

bench: venv ## benchmarks (runtime vs HF transformers; operator at scale)
	$(PY) bench/bench_runtime.py
	$(MAKE) cluster-up
	$(PY) bench/bench_operator.py

clean: cluster-down ## remove build leftovers in the clone (caches in ~/.cache/tpi stay)
	rm -rf .pytest_cache .ruff_cache build dist *.egg-info operator/*.egg-info runtime/*.egg-info _out
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
