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


Series = dict[str, tuple[list[float], list[float]]]


def write_plot(
    out_dir: Path,
    name: str,
    title: str,
    series: Series,
    xlabel: str,
    right_series: Series | None = None,
    hlines: dict[str, float] | None = None,
) -> Path:
    """Writes ``<name>.png``: ``series`` on the left axis, ``right_series`` and the horizontal
    reference lines ``hlines`` on a right axis."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(7, 4), dpi=120)
    for label, (xs, ys) in series.items():
        left.plot(xs, ys, marker="o", label=label)
    left.set_xlabel(xlabel)
    left.set_ylabel(" / ".join(series))
    handles, labels = left.get_legend_handles_labels()
    if right_series or hlines:
        right = left.twinx()
        for label, (xs, ys) in (right_series or {}).items():
            right.plot(xs, ys, marker="s", linestyle="--", color="tab:green", label=label)
        for label, y in (hlines or {}).items():
            right.axhline(y, color="tab:red", linestyle=":", label=label)
        right.set_ylabel(" / ".join([*(right_series or {}), *(hlines or {})]))
        h2, l2 = right.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    left.legend(handles, labels, loc="best", fontsize=8)
    left.set_title(title)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
