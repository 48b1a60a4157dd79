#!/usr/bin/env bash
# Sets up Riverbed's Python environment in two layers:
#
#   1. ${RIVERBED_CACHE:-~/.cache/riverbed}/venvs/<key>: every third-party package, pinned by
#      requirements/lock.txt (+ requirements/nodeps.txt). <key> is a hash of those files and the
#      Python version, so a changed lock builds a new venv and an unchanged one is reused as is.
#      RIVERBED_GPU=1 (`make setup GPU=1`) takes requirements/lock-gpu.txt instead: the same pins
#      with FAISS for CUDA 13 (faiss-gpu-cuvs) in place of faiss-cpu, which cannot share a venv with it.
#      The choice holds for later runs of this clone until RIVERBED_GPU=0 (`make setup GPU=0`).
#   2. ./.venv: a thin per-clone venv that sees the cached packages through a .pth file and holds
#      only Riverbed itself (editable), so two clones never fight and .venv/bin/riverbed works.
#
# A second run with nothing changed only checks markers and takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
CACHE=${RIVERBED_CACHE:-$HOME/.cache/riverbed}
PYTHON=${PYTHON:-python3.11}

die() { echo "setup: $*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || die "$PYTHON not found. Riverbed needs Python 3.11 \
(install it, e.g. 'apt-get install python3.11 python3.11-venv' or pyenv, or set PYTHON=/path/to/python3.11)."
pyver=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$pyver" = "3.11" ] || die "$PYTHON is Python $pyver; the lock file is built for 3.11 (set PYTHON=/path/to/python3.11)."

# The lock: RIVERBED_GPU when it is set, else the one this clone's .venv was last built from (so a
# `make setup GPU=1` holds for the `make test` after it), else lock.txt.
gpu=${RIVERBED_GPU-}
if [ -z "$gpu" ] && [ -f .venv/.riverbed-lock ]; then
  [ "$(cat .venv/.riverbed-lock)" = requirements/lock-gpu.txt ] && gpu=1 || gpu=0
fi
case "${gpu:-0}" in
  1|true|yes) LOCK=requirements/lock-gpu.txt ;;
  0|false|no) LOCK=requirements/lock.txt ;;
  *) die "RIVERBED_GPU=$gpu: use 1 (FAISS for CUDA 13, requirements/lock-gpu.txt) or 0 (faiss-cpu)." ;;
esac

mkdir -p "$CACHE"
key=$( (cat "$LOCK" requirements/nodeps.txt; echo "py$pyver uv$UV_VERSION") | sha256sum | cut -c1-16)
venv="$CACHE/venvs/$key"
uv_home="$CACHE/bootstrap/uv-$UV_VERSION"
uv="$uv_home/bin/uv"
export UV_CACHE_DIR="$CACHE/uv"

if [ ! -x "$uv" ]; then
  echo "setup: installing uv $UV_VERSION into $uv_home" >&2
  rm -rf "$uv_home"
  "$PYTHON" -m venv "$uv_home"
  "$uv_home/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION"
fi

# One builder at a time per cache: a second clone waits for the first instead of racing it.
exec 9>"$CACHE/.setup.lock"
flock 9

if [ ! -f "$venv/.complete" ]; then
  echo "setup: building the package venv $venv from $LOCK (first time for this lock: several minutes)" >&2
  rm -rf "$venv"
  "$uv" venv --quiet --python "$PYTHON" "$venv"
  "$uv" pip sync --quiet --python "$venv/bin/python" "$LOCK"
  "$uv" pip install --quiet --python "$venv/bin/python" --no-deps -r requirements/nodeps.txt
  date -u +%FT%TZ > "$venv/.complete"
fi

# Bytecode for every cached package, written once here: a Python run with PYTHONDONTWRITEBYTECODE
# set (CI's environment sets it) never writes it, and without it each process compiles what it
# imports (torch, transformers, sentence-transformers, scikit-learn: about 20 s of CPU in every Ray
# worker that loads a model, most of an integration test's time). Marked apart from .complete so a
# venv built before this step gets it too. A few files under torch/testing hold Python 3.12 syntax
# and are never imported: compileall's non-zero exit for them is expected.
if [ ! -f "$venv/.bytecode" ]; then
  echo "setup: compiling the package venv's bytecode (once per venv, about 2 minutes)" >&2
  "$venv/bin/python" -m compileall -q -j 0 "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" >/dev/null 2>&1 || true
  date -u +%FT%TZ > "$venv/.bytecode"
fi

if [ ! -f .venv/.riverbed-key ] || [ "$(cat .venv/.riverbed-key)" != "$venv" ] || [ ! -x .venv/bin/riverbed ]; then
  echo "setup: creating ./.venv on top of $venv" >&2
  rm -rf .venv
  "$uv" venv --quiet --python "$PYTHON" .venv
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  cached_site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # addsitedir (not a plain path line) so the cached site-packages' own .pth files run too.
  echo "import site; site.addsitedir('$cached_site')" > "$site/_riverbed_packages.pth"
  "$uv" pip install --quiet --python .venv/bin/python --no-deps -e .
  # Console scripts of the cached packages (pytest, ruff, mypy, ray) run with this venv's python.
  for tool in pytest ruff mypy ray serve; do
    [ -e "$venv/bin/$tool" ] && [ ! -e ".venv/bin/$tool" ] || continue
    if [ "$(head -c2 "$venv/bin/$tool")" = "#!" ]; then
      printf '#!/bin/sh\nexec "%s/.venv/bin/python" "%s" "$@"\n' "$PWD" "$venv/bin/$tool" > ".venv/bin/$tool"
      chmod +x ".venv/bin/$tool"
    else
      ln -s "$venv/bin/$tool" ".venv/bin/$tool"  # a native binary (ruff)
    fi
  done
  echo "$venv" > .venv/.riverbed-key
fi
echo "$LOCK" > .venv/.riverbed-lock
echo "setup: ready (.venv -> $venv)" >&2
