"""Writing a benchmark's results: JSON for machines, a markdown table for people."""

from __future__ import annotations

import json
import platform
import uuid
from pathlib import Path
from typing import Any

from actors.backends import BACKENDS
from schemas.errors import ConfigError
from schemas.settings import Settings, load_settings


def parse_backends(spec: str) -> list[str]:
    """``"faiss,milvus"`` → ``["faiss", "milvus"]``, in the order given, each known, none twice."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if not names or unknown or len(set(names)) != len(names):
        raise ConfigError(f"--backend {spec!r} must list distinct backends of {', '.join(sorted(BACKENDS))}")
    return names


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


def write_table(
    out_dir: Path, name: str, headers: list[str], rows: list[list[str]], preamble: str = ""
) -> Path:
    """Writes ``<name>.md`` under ``out_dir``: ``preamble`` (markdown, may be empty), then one
    table with ``headers`` and ``rows`` (cells already formatted; a ``|`` in one is escaped);
    returns its path. Raises ``ValueError`` when a row's length differs from the header's."""
    for i, row in enumerate(rows):
        if len(row) != len(headers):
            raise ValueError(f"{name}.md: row {i} has {len(row)} cells, the header {len(headers)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [preamble.rstrip() + "\n"] if preamble.strip() else []
    lines += [_row(headers), f"|{'---|' * len(headers)}", *(_row(r) for r in rows)]
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    return md


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


Series = dict[str, tuple[list[float], list[float]]]


def write_plot(
    out_dir: Path,
    name: str,
    title: str,
    series: Series,
    xlabel: str,
    right_series: Series | None = None,
    hlines: dict[str, float] | None = None,
    ylabel: str | None = None,
    ylog: bool = False,
) -> Path:
    """Writes ``<name>.png``: ``series`` on the left axis, ``right_series`` and the horizontal
    reference lines ``hlines`` on a right axis. ``ylabel`` names the left axis (default: the
    series' labels); ``ylog`` makes it logarithmic."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(7, 4), dpi=120)
    for label, (xs, ys) in series.items():
        left.plot(xs, ys, marker="o", label=label)
    left.set_xlabel(xlabel)
    left.set_ylabel(ylabel if ylabel is not None else " / ".join(series))
    if ylog:
        left.set_yscale("log")
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
    return _save(fig, out_dir, name)


def write_curves(
    out_dir: Path,
    name: str,
    title: str,
    panels: dict[str, Series],
    xlabel: str,
    hlines: dict[str, dict[str, float]] | None = None,
    log_axes: bool = False,
) -> Path:
    """Writes ``<name>.png``: one panel per entry of ``panels`` (its y-axis label -> series), side
    by side; a series keeps its colour in every panel, and its reference line in ``hlines[panel]``
    (dotted) takes the colour of the series of the same label. ``log_axes``: both axes logarithmic."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=120, squeeze=False)
    colours: dict[str, str] = {}
    for ax, (ylabel, series) in zip(axes[0], panels.items(), strict=True):
        for label, (xs, ys) in series.items():
            colour = colours.setdefault(label, f"C{len(colours)}")
            ax.plot(xs, ys, marker="o", color=colour, label=label)
        for label, y in ((hlines or {}).get(ylabel) or {}).items():
            colour = colours.setdefault(label, f"C{len(colours)}")
            ax.axhline(y, color=colour, linestyle=":", label=f"{label}, in-process")
        if log_axes:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            xs_all = sorted({x for xs, _ in series.values() for x in xs})
            ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    axes[0][0].legend(loc="best", fontsize=7)  # one legend: a label has one colour in every panel
    fig.suptitle(title)
    return _save(fig, out_dir, name)


def write_bars(out_dir: Path, name: str, title: str, panels: dict[str, dict[str, float]]) -> Path:
    """Writes ``<name>.png``: one small bar chart per panel (its title -> {bar label: value}), side
    by side, each on its own scale, so measures in different units share one figure. A bar label
    keeps its colour in every panel."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.6), dpi=120, squeeze=False)
    palette = [
        f"tab:{c}"
        for c in ("blue", "orange", "green", "red", "purple", "brown", "pink", "gray", "olive", "cyan")
    ]
    labels_seen = list(dict.fromkeys(label for bars in panels.values() for label in bars))
    color = {label: palette[i % len(palette)] for i, label in enumerate(labels_seen)}
    for ax, (panel, bars) in zip(axes[0], panels.items(), strict=True):
        labels, values = list(bars), list(bars.values())
        drawn = ax.bar(labels, values, color=[color[label] for label in labels])
        ax.bar_label(drawn, fmt="%.3g", fontsize=7)
        ax.set_title(panel, fontsize=9)
        ax.tick_params(axis="x", labelsize=7, labelrotation=20)
        ax.margins(y=0.15)
    fig.suptitle(title, fontsize=10)
    return _save(fig, out_dir, name)


def write_ratio_bars(
    out_dir: Path,
    name: str,
    title: str,
    unit: str,
    raw: tuple[str, float],
    pipeline: float,
    target: float = 0.9,
) -> Path:
    """Writes ``<name>.png``: a pipeline's rate next to the raw computation's (``raw``: its label
    and rate, in ``unit``), and their ratio next to its ``target``."""
    label, rate = raw
    return write_bars(
        out_dir,
        name,
        title,
        {
            unit: {label: rate, "pipeline": pipeline},
            "pipeline / raw": {"pipeline": pipeline / rate, "target": target},
        },
    )


def _save(fig: Any, out_dir: Path, name: str) -> Path:
    """Lays out ``fig``, writes it to ``<out_dir>/<name>.png`` and frees it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = out_dir / f"{name}.png"
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def image_run_settings(base: Settings, prefix: str, **serve_search: Any) -> Settings:
    """``base`` for a throwaway index ``<prefix>-<run>`` with topics of its own
    (``<prefix>.<run>.documents|images|dead_letter``) and its images ingested, so an image bench or
    evaluation never touches the user's index; ``serve_search`` overrides ``serve.search`` fields."""
    run = uuid.uuid4().hex[:8]
    dump = base.model_dump(mode="json")
    dump["index"]["name"] = f"{prefix}-{run}"
    dump["images"]["ingest"] = True
    dump["serve"]["search"].update(serve_search)
    dump["kafka"]["topics"].update(
        {kind: f"{prefix}.{run}.{kind}" for kind in ("documents", "images", "dead_letter")}
    )
    return load_settings(overrides=dump)
