"""`riverbed eval compare`: retrieval reports of the same questions side by side, as a table and a
bar chart of MRR@10 and recall@10 per method.

A METHOD is one mode of one report: its label is the mode, `` + rerank`` when that run reranked,
and, when the report's embedding model is not the first report's and the mode embeds the question
(not keyword), the report's VARIANT: what its file name adds to the name the reports' file names
share (``retrieval-squad-heldout-lora.json`` beside ``retrieval-squad-heldout.json``: ``lora``), or
the model's last path part when the names share nothing. So "hybrid + rerank" and "vector (lora)"
read as what they are, not as a cached model's hash. Reports are compared only when they scored the
same questions: the same dataset, corpus, split and number of questions, and the same sample and
seed where both reports record them; anything else is a ``ConfigError`` naming the field that
differs. A method named twice (the same mode of two reports of the same model and reranking) is
shown once when the scores agree (keyword search of two embedding models), else the later one is
labelled with its variant (or file name) too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.bench.report import write_table
from cluster.eval.retrieval import report_name
from schemas.errors import ConfigError

SAME_QUESTIONS = ("dataset", "corpus", "split", "queries")
SAME_WHEN_RECORDED = ("sample", "seed")
COLUMNS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")


def read_reports(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """The retrieval reports at ``paths`` (JSON written by `riverbed eval retrieval`)."""
    if not paths:
        raise ConfigError("eval compare: name at least one retrieval report (.json)")
    reports = []
    for path in paths:
        try:
            report = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such report") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not a JSON report ({e})") from None
        if not isinstance(report, dict) or not isinstance(report.get("modes"), dict):
            raise ConfigError(
                f"{path}: not a retrieval report (no 'modes'; `riverbed eval retrieval` writes one)"
            )
        reports.append(report)
    return reports


def variants(paths: Sequence[Path]) -> list[str]:
    """Per report, what its file name adds to the dash-separated words all the names start with
    (``""`` for the one that adds nothing, and for every report when the names share no word)."""
    words = [path.stem.split("-") for path in paths]
    shared = 0
    while len(words) > 1 and all(len(w) > shared for w in words) and len({w[shared] for w in words}) == 1:
        shared += 1
    return ["-".join(w[shared:]) if shared else "" for w in words]


def methods(reports: Sequence[dict[str, Any]], paths: Sequence[Path]) -> list[tuple[str, dict[str, float]]]:
    """``(label, scores)`` per method, in report then mode order (see the module docstring)."""
    first = reports[0]
    for report, path in zip(reports[1:], paths[1:], strict=True):
        for field in SAME_QUESTIONS:
            if report.get(field) != first.get(field):
                raise ConfigError(
                    f"{path}: {field} {report.get(field)!r} differs from {paths[0]}'s {first.get(field)!r}: "
                    "compare runs over the same questions"
                )
        for field in SAME_WHEN_RECORDED:
            if field in report and field in first and report[field] != first[field]:
                raise ConfigError(
                    f"{path}: {field} {report[field]!r} differs from {paths[0]}'s {first[field]!r}: "
                    "compare runs over the same questions"
                )
    tags = variants(paths)
    rows: dict[str, dict[str, float]] = {}
    for report, path, tag in zip(reports, paths, tags, strict=True):
        model = str(report.get("model", ""))
        rerank = " + rerank" if report.get("rerank") else ""
        other_model = f" ({tag or Path(model).name or model})" if model != str(first.get("model", "")) else ""
        for mode, scores in report["modes"].items():
            label = f"{mode}{rerank}{other_model if mode != 'keyword' else ''}"
            row = {c: float(scores[c]) for c in COLUMNS if c in scores}
            if label in rows and rows[label] != row:  # e.g. another reranker: told apart by its report
                label = f"{label} [{tag or path.stem}]"
            rows.setdefault(label, row)
    if not rows:
        raise ConfigError(f"{', '.join(str(p) for p in paths)}: the reports score no mode")
    return list(rows.items())


def compare_retrieval(paths: Sequence[Path], out_dir: Path) -> dict[str, Any]:
    """Writes ``retrieval-compare-<dataset>-<split>.{md,png}`` under ``out_dir``; returns what they
    show (``methods``: label -> scores) and where they are."""
    reports = read_reports(paths)
    rows = methods(reports, paths)
    first = reports[0]
    corpus = Path(first["corpus"]).parent if first.get("corpus") else None  # the report names the file
    name = report_name("retrieval-compare", Path(first["dataset"]), corpus, str(first["split"]))
    preamble = (
        f"{first['queries']} {first['split']} questions of {first['dataset']}; "
        f"reports: {', '.join(str(p) for p in paths)}\n"
    )
    md = write_table(
        out_dir,
        name,
        ["method", *COLUMNS],
        [[label, *(f"{scores[c]:.3f}" if c in scores else "" for c in COLUMNS)] for label, scores in rows],
        preamble,
    )
    png = write_bars(
        out_dir / f"{name}.png",
        f"Retrieval by method: {first['queries']} {first['split']} questions "
        f"of {Path(first['dataset']).name}",
        [label for label, _ in rows],
        {c: [scores.get(c, 0.0) for _, scores in rows] for c in ("mrr@10", "recall@10")},
    )
    return {"methods": dict(rows), "markdown": str(md), "plot": str(png)}


def write_bars(path: Path, title: str, labels: list[str], series: dict[str, list[float]]) -> Path:
    """A horizontal grouped bar chart: one group per label, one bar per series, values printed."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    height = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.3 * len(labels) * max(len(series), 1)), dpi=120)
    for i, (name, values) in enumerate(series.items()):
        ys = [n + (i - (len(series) - 1) / 2) * height for n in range(len(labels))]
        bars = ax.barh(ys, values, height=height, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    low = min((v for values in series.values() for v in values), default=0.0)
    ax.set_xlim(max(0.0, low - 0.1), 1.06)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=len(series), fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
