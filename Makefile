# The two commands of the README: `make demo` and `make test`. Both set up the environment first
# (scripts/setup.sh: a cached, lock-keyed package venv plus this clone's thin .venv).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PACKAGES := schemas actors deployments cluster

.PHONY: setup demo test lint typecheck unit integration gpu k8s-tools k8s-check lock clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(VENV)/bin/riverbed demo $(if $(SERVE),--serve,)

lint: setup
	$(VENV)/bin/ruff check $(PACKAGES) tests
	$(VENV)/bin/ruff format --check $(PACKAGES) tests

typecheck: setup
	$(PY) -m mypy

unit: setup
	$(PY) -m pytest tests/unit -q

integration: setup
	$(PY) -m pytest tests/integration -q -m integration

gpu: setup
	$(PY) -m pytest tests/gpu -q -m gpu

# The k8s tier's binaries (kube-apiserver, etcd, the KubeRay operator), built once and cached outside
# the clone; then the manifests against them.
k8s-tools:
	bash scripts/k8s-tools.sh build

k8s-check: setup
	bash scripts/k8s-tools.sh build || echo "k8s-tools: not every binary was built (see above); its tests skip"
	$(PY) -m pytest tests/k8s tests/unit/test_k8s_render.py tests/unit/test_k8s_validate.py -q

# Lint, types, the k8s tier's API server (built once per machine, about 10 minutes), then every
# tier (the gpu tier skips itself without CUDA; the k8s tier's operator tests without its binary).
test: lint typecheck
	bash scripts/k8s-tools.sh build server || echo "k8s-tools: the API server was not built (see above); the k8s tier skips"
	$(PY) -m pytest tests -q --durations=25

# Re-pin requirements/lock.txt from requirements/base.in (then `make setup` builds a new venv).
lock:
	@bash scripts/setup.sh >/dev/null 2>&1 || true
	$${RIVERBED_CACHE:-$$HOME/.cache/riverbed}/bootstrap/uv-*/bin/uv pip compile requirements/base.in \
	  --python-version 3.11 --python-platform x86_64-unknown-linux-gnu --generate-hashes -o requirements/lock.txt

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
