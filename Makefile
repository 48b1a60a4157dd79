# The two commands of the README: `make demo` and `make test`. Both set up the environment first
# (scripts/setup.sh: a cached, lock-keyed package venv plus this clone's thin .venv).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PACKAGES := schemas actors deployments cluster

.PHONY: setup demo test lint typecheck unit integration gpu k8s-tools k8s-check lock lock-gpu clean

# GPU=1: the venv of requirements/lock-gpu.txt (FAISS for CUDA 13 instead of faiss-cpu), kept by
# every later target of this clone until GPU=0.
setup:
	@$(if $(GPU),RIVERBED_GPU=$(GPU) ,)bash scripts/setup.sh

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

# Re-pin requirements/lock.txt from requirements/base.in (then `make setup` builds a new venv), and
# requirements/lock-gpu.txt beside it: base.in with faiss-gpu-cuvs (CUDA 13, as the lock's torch) in
# place of faiss-cpu, held to lock.txt's pins (FAISS's version included) so both environments run the
# same versions; the override drops the faiss-cpu other packages ask for (txtai, the bench peer), whose
# `faiss` module it provides (`make lock-gpu` alone re-derives it from the current lock.txt).
UV = $${RIVERBED_CACHE:-$$HOME/.cache/riverbed}/bootstrap/uv-*/bin/uv
UV_COMPILE = --python-version 3.11 --python-platform x86_64-unknown-linux-gnu --generate-hashes
lock:
	@bash scripts/setup.sh >/dev/null 2>&1 || true
	$(UV) pip compile requirements/base.in $(UV_COMPILE) -o requirements/lock.txt
	@$(MAKE) --no-print-directory lock-gpu

lock-gpu:
	@bash scripts/setup.sh >/dev/null 2>&1 || true
	@uv=$$(realpath "$$(ls -d $(UV) | tail -1)") && tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT \
	  && { grep -q '^faiss-cpu$$' requirements/base.in \
	       || { echo "lock-gpu: requirements/base.in has no line 'faiss-cpu' to swap" >&2; exit 1; }; } \
	  && sed 's/^faiss-cpu$$/faiss-gpu-cuvs/' requirements/base.in > "$$tmp/gpu.in" \
	  && grep -oE '^[A-Za-z0-9._-]+==[^ ]+' requirements/lock.txt > "$$tmp/pins.txt" \
	  && sed -n 's/^faiss-cpu==/faiss-gpu-cuvs==/p' "$$tmp/pins.txt" >> "$$tmp/pins.txt" \
	  && echo "faiss-cpu; python_version < '0'" > "$$tmp/no-faiss-cpu.txt" \
	  && (cd "$$tmp" && "$$uv" pip compile gpu.in -c pins.txt --override no-faiss-cpu.txt $(UV_COMPILE) \
	      --no-header --quiet -o "$(CURDIR)/requirements/lock-gpu.txt")

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
