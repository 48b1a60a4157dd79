#!/usr/bin/env bash
# Builds out/gpu-carry for scripts/gpu-check.sh: small wheels (any CPython 3.11-3.13) and an fp16
# copy of the default model (45 MB, under the GPU machine's 64 MiB carry limit).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=out/gpu-carry
mkdir -p "$dest/wheels"
for py in 3.11 3.12 3.13; do
  .venv/bin/python -m pip download -q --only-binary=:all: --python-version "$py" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    pydantic pydantic-settings pyyaml pytest pytest-timeout -d "$dest/wheels"
done
.venv/bin/python - <<'PY'
from sentence_transformers import SentenceTransformer
from actors.models import resolve_model
model = SentenceTransformer(resolve_model("sentence-transformers/all-MiniLM-L6-v2").location, device="cpu")
model.half().save("out/gpu-carry/minilm")
PY
rm -f "$dest/minilm/README.md"
du -sh "$dest"
