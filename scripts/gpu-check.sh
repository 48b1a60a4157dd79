#!/usr/bin/env bash
# The GPU tier on a lent GPU machine that has torch, transformers and sentence-transformers but no
# registry: installs the few small wheels carried in CARRY/wheels, then runs tests/gpu against the
# model carried in CARRY/minilm (an fp16 copy of all-MiniLM-L6-v2), then the embedder benchmark.
# Prepare CARRY with scripts/gpu-carry.sh. Results go to $OUT (or ./out) as gpu-*.txt / .json.
set -uo pipefail
cd "$(dirname "$0")/.."
CARRY=${1:-out/gpu-carry}
OUT=${OUT:-out}
mkdir -p "$OUT"
site=/tmp/riverbed-site
python3 -m pip install -q --no-index --find-links "$CARRY/wheels" --target "$site" \
  pydantic pydantic-settings pyyaml pytest pytest-timeout 2>&1 | tail -3
export PYTHONPATH="$site:$PWD"
export RIVERBED_TEST_MODEL="$PWD/$CARRY/minilm"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu-device.txt"
python3 -m pytest tests/gpu -m gpu -p no:cacheprovider -o addopts="" -q 2>&1 | tee "$OUT/gpu-tests.txt" | tail -20
python3 -m cluster.bench.embedder --model "$RIVERBED_TEST_MODEL" --repeat 5 > "$OUT/gpu-bench.json" 2> "$OUT/gpu-bench.err"
tail -c 3000 "$OUT/gpu-bench.json"; tail -5 "$OUT/gpu-bench.err"
