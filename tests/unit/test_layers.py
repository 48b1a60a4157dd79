"""The repo's structure, checked from the source text with ``ast`` (nothing is imported).

- Layer order: ``schemas`` → ``actors`` → ``deployments`` → ``cluster``. A module imports only
  from its own layer or a lower one, at any depth (lazy imports inside functions and
  ``TYPE_CHECKING`` blocks count, as do ``importlib.import_module("...")`` calls), and never from
  ``tests`` or ``scripts``. ``schemas`` thus imports nothing of ours but itself.
- Shared names are defined once, in their home module (``schemas/topology.py``, ``schemas/ids.py``,
  ``schemas/metadata.py``, ``schemas/errors.py``), and imported everywhere else.
- ``pyproject.toml`` declares every package the layers import (in ``dependencies``, or in an
  extra for optional commands), and ``requirements/lock.txt`` pins each of them; the ``gpu``
  extra's FAISS is pinned in ``requirements/lock-gpu.txt`` instead, whose other pins are lock.txt's.
- No source file cites documents a clone does not have (the old design and style notes); the
  contracts live in the code's docstrings and in ``docs/contracts.md``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("schemas", "actors", "deployments", "cluster")
RANK = {layer: rank for rank, layer in enumerate(LAYERS)}
FIRST_PARTY = (*LAYERS, "tests", "scripts")
"""Top-level names that are ours: an import of one not in ``LAYERS`` is always wrong in a layer."""

GPU_EXTRA_SWAPS = {"faiss-cpu": "faiss-gpu-cuvs"}
"""What requirements/lock-gpu.txt (the ``gpu`` extra's environment) pins in place of lock.txt's."""

# Built by concatenation so that this file does not cite them itself.
UNSHIPPED_DOCS = ("DESIGN" + ".md", "STYLE" + ".md")
SKIPPED_DIRS = {"data", "build", "dist", "node_modules", "__pycache__"}

SHARED_NAMES = {
    "schemas/topology.py": (
        "Offsets",
        "Version",
        "SearchMode",
        "SEARCH_MODES",
        "Role",
        "ROLES",
        "actor_name",
        "shard_directory",
        "consumer_group",
        "lag",
        "is_older",
    ),
    "schemas/ids.py": ("stable_hash", "chunk_id", "split_chunk_id", "shard_of"),
    "schemas/metadata.py": (
        "MetadataValue",
        "string_problem",
        "value_problem",
        "metadata_problem",
        "loads_json",
    ),
    "schemas/errors.py": ("DeadLetterReason", "DEAD_LETTER_REASONS"),
}
KNOWN_DUPLICATES: set[tuple[str, str]] = set()
"""Copies of shared names allowed to stay (none: every copy that predated the shared modules is
gone). Never add one."""


def layer_modules() -> Iterator[Path]:
    for layer in LAYERS:
        yield from sorted((REPO / layer).rglob("*.py"))


def repo_sources() -> Iterator[Path]:
    """Every ``.py`` file of the repo outside hidden folders (virtualenvs, caches) and data."""
    for path in sorted(REPO.rglob("*.py")):
        parts = path.relative_to(REPO).parts[:-1]
        if any(p.startswith(".") or p in SKIPPED_DIRS or p.endswith(".egg-info") for p in parts):
            continue
        yield path


def module_name(relative: Path) -> str:
    """``actors/testing/memory_index.py`` → ``actors.testing.memory_index`` (``__init__`` dropped)."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, relative: Path) -> Iterator[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``source``, wherever it sits, with
    relative imports resolved against ``relative`` (the file's path from the repo root)."""
    package = module_name(relative).split(".")
    if relative.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(source, filename=str(relative))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module or ""
            else:
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    yield node.lineno, ".".join([*base, node.module])
                else:  # ``from .. import actors``: each name is a module of the base package
                    for alias in node.names:
                        yield node.lineno, ".".join([*base, alias.name])
        elif isinstance(node, ast.Call) and _is_dynamic_import(node.func):
            first = node.args[0] if node.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                yield node.lineno, first.value


def _is_dynamic_import(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("__import__", "import_module")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def layer_violations(source: str, relative: Path) -> list[str]:
    """Each import in ``source`` that reaches above the layer of ``relative`` or into ``tests``/
    ``scripts``, as ``path:line: what``."""
    own = relative.parts[0]
    found = []
    for line, module in imported_modules(source, relative):
        top = module.split(".")[0]
        if top not in FIRST_PARTY or RANK.get(top, len(LAYERS)) <= RANK[own]:
            continue
        allowed = ", ".join(LAYERS[: RANK[own] + 1])
        found.append(f"{relative}:{line}: imports {module} ({own} may import only {allowed})")
    return found


def test_every_layer_imports_only_its_own_layer_or_lower() -> None:
    checked = 0
    problems = []
    for path in layer_modules():
        relative = path.relative_to(REPO)
        problems += layer_violations(path.read_text(encoding="utf-8"), relative)
        checked += 1
    assert checked > 40, f"only {checked} modules found under {REPO}: is the layout still {LAYERS}?"
    assert not problems, "imports against the layer order:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("relative", "source"),
    [
        ("schemas/envelope.py", "from actors.chunker import Chunker\n"),
        ("schemas/envelope.py", "import deployments.app\n"),
        ("actors/source.py", "def f():\n    from cluster.pipeline import Pipeline\n"),
        ("actors/source.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import deployments\n"),
        ("actors/testing/downstream.py", "from ...cluster import pipeline\n"),
        ("actors/testing/downstream.py", "from ...deployments.app import build\n"),
        ("deployments/app.py", "from cluster.serving import start_serving\n"),
        ("deployments/app.py", "import importlib\nimportlib.import_module('cluster.cli')\n"),
        ("cluster/cli.py", "from tests.unit.conftest import settings\n"),
        ("schemas/__init__.py", "from .. import actors\n"),
    ],
)
def test_the_layer_check_catches_a_wrong_import(relative: str, source: str) -> None:
    assert layer_violations(source, Path(relative)), f"{relative} importing upwards went unnoticed"


@pytest.mark.parametrize(
    ("relative", "source"),
    [
        ("schemas/envelope.py", "from schemas.errors import PoisonMessageError\nimport pydantic\n"),
        ("schemas/envelope.py", "from .errors import PoisonMessageError\n"),
        ("actors/testing/downstream.py", "from ..vector_index import ShardWrite\nfrom schemas import ids\n"),
        ("deployments/app.py", "from actors.embedder import Embedder\nimport ray\n"),
        ("cluster/cli.py", "from deployments.app import build\nimport json\n"),
    ],
)
def test_the_layer_check_accepts_imports_from_below(relative: str, source: str) -> None:
    assert layer_violations(source, Path(relative)) == []


def module_level_names(source: str) -> Iterator[str]:
    """Names a module defines at its top level: functions, classes, assignments."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node.name
        elif isinstance(node, ast.Assign):
            yield from (t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield node.target.id


def test_shared_names_are_defined_once() -> None:
    home = {name: module for module, names in SHARED_NAMES.items() for name in names}
    copies = set()
    for path in layer_modules():
        relative = path.relative_to(REPO).as_posix()
        for name in module_level_names(path.read_text(encoding="utf-8")):
            if name in home and home[name] != relative:
                copies.add((relative, name))
    new = sorted(copies - KNOWN_DUPLICATES)
    assert not new, "define these once (in their home module) and import them:\n" + "\n".join(
        f"{path}: {name} (home: {home[name]})" for path, name in new
    )
    for module, names in SHARED_NAMES.items():
        defined = set(module_level_names((REPO / module).read_text(encoding="utf-8")))
        assert set(names) <= defined, f"{module} no longer defines {sorted(set(names) - defined)}"


def _distribution(requirement: str) -> str:
    """``"ray[serve]>=2.50"`` → ``"ray"``, normalised as package indexes do (``PyYAML`` → ``pyyaml``)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match is not None, f"unreadable requirement {requirement!r}"
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def declared_distributions() -> dict[str, set[str]]:
    """``{"": core distributions, "<extra>": that extra's}`` from pyproject.toml."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = {"": {_distribution(r) for r in project["dependencies"]}}
    for extra, requirements in project.get("optional-dependencies", {}).items():
        declared[extra] = {_distribution(r) for r in requirements}
    return declared


def third_party_imports() -> dict[str, set[str]]:
    """``{top-level module: files importing it}`` over the layers, stdlib and our own excluded."""
    found: dict[str, set[str]] = {}
    for path in layer_modules():
        relative = path.relative_to(REPO)
        for _, module in imported_modules(path.read_text(encoding="utf-8"), relative):
            top = module.split(".")[0]
            if top and top not in FIRST_PARTY and top not in sys.stdlib_module_names:
                found.setdefault(top, set()).add(relative.as_posix())
    return found


def test_pyproject_declares_every_imported_package() -> None:
    declared = declared_distributions()
    everything = set().union(*declared.values())
    providers = importlib.metadata.packages_distributions()
    missing = []
    for module, files in sorted(third_party_imports().items()):
        distributions = {_distribution(d) for d in providers.get(module, [])}
        if not distributions:
            missing.append(f"{module} (not installed; imported by {', '.join(sorted(files))})")
        elif not distributions & everything:
            missing.append(
                f"{' or '.join(sorted(distributions))} (imported as {module} by {', '.join(sorted(files))})"
            )
    assert not missing, "declare in pyproject.toml [project] dependencies or an extra:\n" + "\n".join(missing)


def _pins(lock_file: str) -> dict[str, str]:
    """``{distribution: version}`` of a lock file under requirements/."""
    lock = (REPO / "requirements" / lock_file).read_text(encoding="utf-8")
    return {
        _distribution(name): version
        for name, version in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", lock, flags=re.M)
    }


def test_every_declared_package_is_pinned_in_the_lock() -> None:
    pinned, pinned_gpu = set(_pins("lock.txt")), set(_pins("lock-gpu.txt"))
    declared = declared_distributions()
    unpinned = sorted(
        (extra or "dependencies", name)
        for extra, names in declared.items()
        for name in names - (pinned_gpu if extra == "gpu" else pinned)
    )
    assert not unpinned, f"declared in pyproject.toml but not pinned in its lock file: {unpinned}"


def test_the_gpu_lock_is_the_lock_with_faiss_for_cuda() -> None:
    """lock-gpu.txt (``make lock-gpu``) runs the versions lock.txt runs, FAISS swapped: the two
    FAISS wheels install the same package, so the CPU one must be absent, not merely shadowed."""
    cpu, gpu = _pins("lock.txt"), _pins("lock-gpu.txt")
    differing = sorted(name for name in cpu.keys() & gpu.keys() if cpu[name] != gpu[name])
    assert not differing, f"lock-gpu.txt pins other versions than lock.txt: {differing}"
    assert not cpu.keys() - gpu.keys() - GPU_EXTRA_SWAPS.keys(), "lock-gpu.txt misses lock.txt's packages"
    assert not GPU_EXTRA_SWAPS.keys() & gpu.keys(), "lock-gpu.txt must not pin faiss-cpu"
    assert set(GPU_EXTRA_SWAPS.values()) <= gpu.keys()
    assert all(gpu[new] == cpu[old] for old, new in GPU_EXTRA_SWAPS.items()), "FAISS versions differ"
    assert declared_distributions()["gpu"] == set(GPU_EXTRA_SWAPS.values())
    assert declared_distributions()["cpu"] == set(GPU_EXTRA_SWAPS)


def test_no_source_cites_documents_a_clone_does_not_have() -> None:
    citing = []
    for path in repo_sources():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if any(doc in line for doc in UNSHIPPED_DOCS):
                citing.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not citing, (
        "state the contract in the code or in docs/contracts.md instead of citing a file that is "
        "not in the repo:\n" + "\n".join(citing)
    )
