"""Writing a benchmark's results: JSON for machines, a markdown table for people."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    import os

    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def write_report(out_dir: Path, name: str, result: dict[str, Any], rows: list[tuple[str, str]]) -> Path:
    """Writes ``<name>.json`` and ``<name>.md`` under ``out_dir``; returns the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    lines = ["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md
