"""`riverbed bench batching`: token-budget batches next to fixed batches of 32, same texts, one run.

# MIX: SQuAD v1.1 passages, each followed by its questions, in file order (long and short texts
#   arrive interleaved, as on a stream that carries both), cut to at most 300 tokens (or the
#   model's ``max_seq_length``, if smaller) and kept from 5 tokens up, as the model counts them;
#   a cap takes whole passage groups at an even stride over the file
# PADDING: real / padded tokens of each strategy's batches, from the token counts alone
# TOKEN BUDGET: ``Embedder(settings.embed).embed(texts)``, as the pipeline calls it (its default
#   budget), then a sweep of budgets
# FIXED 32, ARRIVAL: ``encode`` on each consecutive slice of 32 texts, as a naive micro-batcher does
# FIXED 32, SORTED: ``SentenceTransformer.encode(texts, batch_size=32)``, which sorts the texts by
#   characters before cutting batches (length bucketing of its own)
# AGREEMENT: min cosine of every token-budget run against the sorted reference's vectors
#
# Same model, device, precision (fp16 on CUDA, fp32 on CPU) and torch threads for every strategy;
# each is warmed up, then all are timed in turn for ROUNDS rounds and each keeps its fastest pass.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from actors.batching import plan_batches
from actors.embedder import Embedder
from actors.models import resolve_model
from cluster.bench.report import machine, write_plot
from schemas.settings import Settings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

MIN_TOKENS = 5
MAX_TOKENS = 300
FIXED_BATCH = 32
TARGET_RATIO = 1.3
# texts=None embeds the whole mix (12,637 texts, 476k tokens) on a GPU and 1,500 of it on a CPU,
# where the arrival-order baseline alone runs ~5x longer than a token-budget pass (~5 minutes in all
# on 2 idle cores; the whole mix would take ~40).
DEFAULT_CPU_TEXTS = 1500
# Timed passes per measurement, the fastest kept: a shared machine's noise only ever slows a pass.
ROUNDS = 2
SWEEP = {"cpu": (512, 1024, 2048, 4096, 8192, 16384), "cuda": (8192, 16384, 32768, 65536)}
WARM_UP_TEXTS = 256


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# MIX -------------------------------------------------------------------------------------------


def interleave(
    passages: Sequence[tuple[str, str]], questions: Sequence[tuple[str, str]]
) -> list[tuple[str, str]]:
    """``(kind, text)`` in arrival order: each passage ``(id, text)`` as ``("passage", text)``,
    followed by its questions ``(passage id, text)`` as ``("question", text)``, both in the given
    order. Questions whose passage is absent come last."""
    by_passage: dict[str, list[str]] = {}
    for passage_id, text in questions:
        by_passage.setdefault(passage_id, []).append(text)
    mix: list[tuple[str, str]] = []
    for passage_id, text in passages:
        mix.append(("passage", text))
        mix.extend(("question", q) for q in by_passage.pop(passage_id, []))
    for orphans in by_passage.values():
        mix.extend(("question", q) for q in orphans)
    return mix


def load_mix(dataset: Path) -> list[tuple[str, str]]:
    """The SQuAD mix of a BEIR-layout folder (``corpus.jsonl``, ``queries.jsonl``, ``qrels.tsv``)
    in arrival order (:func:`interleave`). A question belongs to the passage of its first qrels row."""
    with (dataset / "corpus.jsonl").open(encoding="utf-8") as f:
        passages = [(row["id"], row["text"]) for row in map(json.loads, f)]
    owner: dict[str, str] = {}
    with (dataset / "qrels.tsv").open(encoding="utf-8") as f:
        next(f, None)  # header
        for line in f:
            query_id, corpus_id, *_ = line.rstrip("\n").split("\t")
            owner.setdefault(query_id, corpus_id)
    with (dataset / "queries.jsonl").open(encoding="utf-8") as f:
        questions = [(owner.get(row["id"], ""), row["text"]) for row in map(json.loads, f)]
    return interleave(passages, questions)


def spread(mix: Sequence[tuple[str, str]], cap: int | None) -> list[tuple[str, str]]:
    """About ``cap`` texts of ``mix`` (``(kind, text)``), as whole groups (a passage and the
    questions after it) taken at an even stride over the file, in order: the file's share of
    passages is kept, where its first ``cap`` texts would over-represent its opening articles.
    ``None``, or a cap at least the mix's size, keeps all of it."""
    if cap is None or cap >= len(mix):
        return list(mix)
    groups: list[list[tuple[str, str]]] = []
    for item in mix:
        if item[0] == "passage" or not groups:
            groups.append([])
        groups[-1].append(item)
    stride = max(1, len(mix) // cap)
    return [item for group in groups[::stride] for item in group]


def cut_to_tokens(text: str, offsets: Sequence[tuple[int, int]], n_ids: int, max_tokens: int) -> str:
    """``text`` cut after its last token when the tokenizer truncated it at ``max_tokens`` ids
    (``n_ids`` of them, ``offsets`` their character spans, specials ``(0, 0)``); else as is."""
    if n_ids < max_tokens:
        return text
    return text[: max((end for _, end in offsets), default=0)]


def fit_mix(
    texts: Sequence[str],
    tokenizer: Any,
    count_tokens: Callable[[Sequence[str]], list[int]],
    max_tokens: int,
    min_tokens: int = MIN_TOKENS,
) -> tuple[list[int], list[str], list[int], list[bool]]:
    """Cuts ``texts`` to ``max_tokens`` (``tokenizer``: a Hugging Face fast tokenizer, for the
    character offsets) and keeps those that ``count_tokens`` puts at ``min_tokens..max_tokens``.

    Returns, for the kept texts in order: their indices in ``texts``, their texts as cut, their
    token counts, and whether each was cut."""
    encoded = tokenizer(
        list(texts), truncation=True, max_length=max_tokens, return_offsets_mapping=True, padding=False
    )
    cut = [
        cut_to_tokens(text, offsets, len(ids), max_tokens)
        for text, offsets, ids in zip(texts, encoded["offset_mapping"], encoded["input_ids"], strict=True)
    ]
    lengths = count_tokens(cut)
    kept = [i for i, n in enumerate(lengths) if min_tokens <= n <= max_tokens]
    return kept, [cut[i] for i in kept], [lengths[i] for i in kept], [cut[i] != texts[i] for i in kept]


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """min / p50 / p90 / max / mean / total tokens of ``lengths``."""
    a = np.asarray(lengths, dtype=np.int64)
    return {
        "min": int(a.min()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "max": int(a.max()),
        "mean": round(float(a.mean()), 1),
        "total": int(a.sum()),
    }


# PADDING ---------------------------------------------------------------------------------------


def arrival_batches(n: int, size: int) -> list[list[int]]:
    """Consecutive slices of ``size`` indices of ``range(n)``: a fixed micro-batcher."""
    return [list(range(start, min(start + size, n))) for start in range(0, n, size)]


def sorted_batches(texts: Sequence[str], size: int) -> list[list[int]]:
    """The batches ``SentenceTransformer.encode(texts, batch_size=size)`` runs: indices sorted by
    descending character length (its ``np.argsort``), then slices of ``size``."""
    order = np.argsort([-len(text) for text in texts]).tolist()
    return [order[start : start + size] for start in range(0, len(order), size)]


def padded_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Tokens the forward passes compute: each batch padded to its longest text."""
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in batches if batch)


def padding_efficiency(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Real tokens / padded tokens of ``batches`` (1.0: no padding)."""
    padded = padded_tokens(lengths, batches)
    return sum(lengths[i] for batch in batches for i in batch) / padded if padded else 1.0


def _plan_stats(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> dict[str, Any]:
    covered = sorted(i for batch in batches for i in batch)
    return {
        "batches": len(batches),
        "padded_tokens": padded_tokens(lengths, batches),
        "padding_efficiency": round(padding_efficiency(lengths, batches), 4),
        "each_text_once": covered == list(range(len(lengths))),
    }


# TIMING ----------------------------------------------------------------------------------------


Embed = Callable[[list[str]], np.ndarray]


def _race(
    contenders: dict[str, Embed], texts: list[str]
) -> tuple[dict[str, list[float]], dict[str, np.ndarray]]:
    """Warms each contender up, then times :data:`ROUNDS` rounds in which every contender embeds
    all of ``texts`` once, in turn: a noisy neighbour slows all of them alike, not whichever ran
    while it was busy. Returns the seconds of each pass and each contender's vectors."""
    for name, embed in contenders.items():
        _say(f"warming up {name}")
        embed(texts[:WARM_UP_TEXTS])
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    vectors: dict[str, np.ndarray] = {}
    passes, done = ROUNDS * len(contenders), 0
    for _ in range(ROUNDS):
        for name, embed in contenders.items():
            t0 = time.perf_counter()
            vectors[name] = embed(texts)
            seconds[name].append(time.perf_counter() - t0)
            done += 1
            _say(f"[{done}/{passes}] {name}: {len(texts) / seconds[name][-1]:.1f} texts/s")
    return seconds, vectors


def _rates(
    seconds: list[float], vectors: np.ndarray, lengths: Sequence[int], reference: np.ndarray
) -> dict[str, Any]:
    """The fastest pass's rates, and the min cosine of the (unit) vectors to ``reference``'s."""
    best = min(seconds)
    return {
        "seconds": round(best, 3),
        "seconds_per_pass": [round(x, 3) for x in seconds],
        "texts_per_s": round(len(lengths) / best, 1),
        "tokens_per_s": round(sum(lengths) / best, 1),
        "rows": int(vectors.shape[0]),
        "all_finite": bool(np.isfinite(vectors).all()),
        "min_cosine_to_reference": round(float((vectors * reference).sum(axis=1).min()), 6),
    }


def _encode_arrival(model: SentenceTransformer, texts: list[str]) -> np.ndarray:
    slices = arrival_batches(len(texts), FIXED_BATCH)
    # Quarters, on a long pass only: it is the slowest strategy by far.
    step = -(-len(slices) // 4) if len(slices) >= 20 else len(slices) + 1
    parts = []
    for k, batch in enumerate(slices):
        chunk = [texts[i] for i in batch]
        parts.append(
            model.encode(chunk, batch_size=FIXED_BATCH, normalize_embeddings=True, show_progress_bar=False)
        )
        if (k + 1) % step == 0 and k + 1 < len(slices):
            _say(f"    fixed 32 arrival: {k + 1}/{len(slices)} batches")
    return np.concatenate(parts)


def _encode_sorted(model: SentenceTransformer, texts: list[str]) -> np.ndarray:
    return np.asarray(
        model.encode(texts, batch_size=FIXED_BATCH, normalize_embeddings=True, show_progress_bar=False)
    )


# REPORT ----------------------------------------------------------------------------------------


def _markdown(result: dict[str, Any]) -> str:
    t, s = result["tokens"], result["strategies"]
    lines = [
        f"# bench batching: token-budget vs fixed batches of {FIXED_BATCH}",
        "",
        f"{result['texts']} texts of SQuAD v1.1 ({result['passages']} passages interleaved with "
        f"{result['questions']} questions, in arrival order), {MIN_TOKENS}-{result['max_tokens']} tokens "
        f"as the model counts them: min {t['min']}, p50 {t['p50']:g}, p90 {t['p90']:g}, max {t['max']}, "
        f"total {t['total']} ({result['cut_to_max_tokens']} passages cut to {result['max_tokens']} tokens). "
        f"Model {result['model']} on {result['device']}, {result['threads']} torch threads; each rate is "
        f"the fastest of {ROUNDS} timed passes (strategies in turn, after a warm-up).",
        "",
        "| strategy | batches | padding efficiency | texts/s | tokens/s | token-budget speed-up | "
        "min cosine to reference |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {
        "token_budget": f"token budget {s['token_budget']['max_batch_tokens']} (Embedder.embed, default)",
        "fixed32_arrival": f"fixed {FIXED_BATCH}, arrival order (encode per slice)",
        "fixed32_sorted": f"fixed {FIXED_BATCH}, sorted (encode(all, batch_size={FIXED_BATCH}))",
    }
    for key, label in labels.items():
        row = s[key]
        speed_up = s["token_budget"]["texts_per_s"] / row["texts_per_s"]
        lines.append(
            f"| {label} | {row['batches']} | {row['padding_efficiency']:.1%} | {row['texts_per_s']} | "
            f"{row['tokens_per_s']} | {speed_up:.2f}x | {row.get('min_cosine_to_reference', 1.0)} |"
        )
    lines += [
        "",
        "Token-budget sweep (same texts; speed-up against each fixed baseline):",
        "",
        "| max_batch_tokens | batches | padding efficiency | texts/s | vs arrival | vs sorted | min cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    arrival, ordered = s["fixed32_arrival"]["texts_per_s"], s["fixed32_sorted"]["texts_per_s"]
    for row in result["sweep"]:
        rate = row["texts_per_s"]
        lines.append(
            f"| {row['max_batch_tokens']} | {row['batches']} | {row['padding_efficiency']:.1%} | {rate} | "
            f"{rate / arrival:.2f}x | {rate / ordered:.2f}x | {row['min_cosine_to_reference']} |"
        )
    lines += ["", f"Target: token-budget >= {TARGET_RATIO}x fixed-size on mixed lengths. {result['summary']}"]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Mix:
    texts: list[str]
    lengths: list[int]
    passages: int
    cut: int
    dropped: int
    max_tokens: int


def _build_mix(dataset: Path, cap: int | None, tokenizer: Any, embedder: Embedder) -> _Mix:
    head = spread(load_mix(dataset), cap)
    max_tokens = min(MAX_TOKENS, embedder.max_seq_length)
    kept, texts, lengths, was_cut = fit_mix(
        [t for _, t in head], tokenizer, embedder.count_tokens, max_tokens
    )
    kept, texts, lengths, was_cut = kept[:cap], texts[:cap], lengths[:cap], was_cut[:cap]
    if not texts:
        raise ValueError(f"no text of {MIN_TOKENS}-{max_tokens} tokens in {dataset}")
    scanned = len(head) if cap is None or len(kept) < cap else kept[-1] + 1
    passages = sum(head[i][0] == "passage" for i in kept)
    return _Mix(texts, lengths, passages, sum(was_cut), scanned - len(kept), max_tokens)


def bench_batching(settings: Settings, dataset: Path, texts: int | None, out_dir: Path) -> dict[str, Any]:
    """Runs the comparison, writes ``batching.json``, ``batching.md`` and ``batching.png`` under
    ``out_dir``, and returns the JSON (``summary``: one line). ``texts`` caps the mix (:func:`spread`,
    then its first ``texts``); ``None`` takes all of it on a GPU and :data:`DEFAULT_CPU_TEXTS` on a CPU."""
    if texts is not None and texts < 1:
        raise ValueError(f"texts must be positive, got {texts}")
    import torch
    from sentence_transformers import SentenceTransformer

    # MODEL: one thread count for every strategy (torch threads are process-wide, set by warm_up)
    config = settings.embed.model_copy(
        update={"num_cpus": settings.embed.num_cpus or float(torch.get_num_threads())}
    )
    embedder = Embedder(config)
    embedder.warm_up()
    device = embedder.device
    reference_model = SentenceTransformer(resolve_model(config.model).location, device=device)
    if device == "cuda":
        reference_model.half()  # the Embedder's precision on CUDA
    reference_model.eval()
    _say(f"model {config.model} on {device}, {torch.get_num_threads()} threads")

    # MIX
    if texts is None and device == "cpu":
        texts = DEFAULT_CPU_TEXTS
    mix = _build_mix(dataset, texts, reference_model.tokenizer, embedder)
    corpus, lengths = mix.texts, mix.lengths
    tokens = length_stats(lengths)
    _say(
        f"mix: {len(corpus)} texts ({mix.passages} passages), tokens min {tokens['min']} "
        f"p50 {tokens['p50']:g} p90 {tokens['p90']:g} max {tokens['max']} total {tokens['total']}"
    )

    # STRATEGIES: fixed 32 sorted (whose vectors are the reference), the token budget as the
    # pipeline runs it (the config's budget, or the device's default), fixed 32 in arrival order,
    # and the sweep of other budgets; timed round-robin
    embedders = {embedder.batch_limits[0]: embedder}
    for budget in SWEEP.get(device, ()):
        if budget not in embedders:
            embedders[budget] = Embedder(config.model_copy(update={"max_batch_tokens": budget}))
            embedders[budget].warm_up()
    default_key = f"token budget {embedder.batch_limits[0]}"
    contenders: dict[str, Embed] = {
        "fixed 32 sorted": lambda batch: _encode_sorted(reference_model, batch),
        default_key: embedder.embed,
        "fixed 32 arrival": lambda batch: _encode_arrival(reference_model, batch),
    }
    contenders.update(
        {f"token budget {b}": e.embed for b, e in sorted(embedders.items()) if e is not embedder}
    )
    seconds, vectors = _race(contenders, corpus)
    reference = vectors["fixed 32 sorted"]

    def measured(name: str, batches: list[list[int]]) -> dict[str, Any]:
        return {**_plan_stats(lengths, batches), **_rates(seconds[name], vectors[name], lengths, reference)}

    fixed_sorted = measured("fixed 32 sorted", sorted_batches(corpus, FIXED_BATCH))
    fixed_arrival = measured("fixed 32 arrival", arrival_batches(len(corpus), FIXED_BATCH))
    sweep = []
    for budget, budgeted in sorted(embedders.items()):
        tokens_cap, size = budgeted.batch_limits
        row = measured(f"token budget {budget}", plan_batches(lengths, tokens_cap, size))
        sweep.append({"max_batch_tokens": tokens_cap, "max_batch_size": size, **row})
    default = next(row for row in sweep if row["max_batch_tokens"] == embedder.batch_limits[0])

    # REPORT
    ratio_arrival = default["texts_per_s"] / fixed_arrival["texts_per_s"]
    ratio_sorted = default["texts_per_s"] / fixed_sorted["texts_per_s"]
    best = max(sweep, key=lambda row: row["texts_per_s"])
    summary = (
        f"batching: token budget {default['max_batch_tokens']} {default['texts_per_s']} texts/s = "
        f"{ratio_arrival:.2f}x fixed-32 in arrival order, {ratio_sorted:.2f}x fixed-32 sorted "
        f"(padding efficiency {default['padding_efficiency']:.0%} vs "
        f"{fixed_arrival['padding_efficiency']:.0%} / {fixed_sorted['padding_efficiency']:.0%}; "
        f"{len(corpus)} texts, min cosine {default['min_cosine_to_reference']}); best budget "
        f"{best['max_batch_tokens']} {best['texts_per_s'] / fixed_sorted['texts_per_s']:.2f}x sorted; "
        f"report in {out_dir}/batching.md"
    )
    result: dict[str, Any] = {
        "summary": summary,
        "dataset": str(dataset),
        "texts": len(corpus),
        "passages": mix.passages,
        "questions": len(corpus) - mix.passages,
        "min_tokens": MIN_TOKENS,
        "max_tokens": mix.max_tokens,
        "cut_to_max_tokens": mix.cut,
        "dropped_out_of_range": mix.dropped,
        "tokens": tokens,
        "model": config.model,
        "device": device,
        "threads": torch.get_num_threads(),
        "batch_limits": [default["max_batch_tokens"], default["max_batch_size"]],
        "strategies": {
            "token_budget": default,
            "fixed32_arrival": fixed_arrival,
            "fixed32_sorted": fixed_sorted,
        },
        "ratio_vs_fixed32_arrival": round(ratio_arrival, 3),
        "ratio_vs_fixed32_sorted": round(ratio_sorted, 3),
        "target": {
            "ratio": TARGET_RATIO,
            "met_vs_fixed32_arrival": ratio_arrival >= TARGET_RATIO,
            "met_vs_fixed32_sorted": ratio_sorted >= TARGET_RATIO,
        },
        "sweep": sweep,
        "machine": machine(),
    }
    _write(out_dir, result)
    return result


def _write(out_dir: Path, result: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "batching.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / "batching.md").write_text(_markdown(result))
    sweep, s = result["sweep"], result["strategies"]
    budgets = [row["max_batch_tokens"] / 1024 for row in sweep]
    # The fixed baselines as flat series on the same axis (write_plot's hlines take a second axis
    # with a scale of its own, which would not compare).
    write_plot(
        out_dir,
        "batching",
        f"texts/s, {result['texts']} mixed-length texts ({result['device']})",
        {
            "token budget": (budgets, [row["texts_per_s"] for row in sweep]),
            f"fixed {FIXED_BATCH} arrival": (budgets, [s["fixed32_arrival"]["texts_per_s"]] * len(sweep)),
            f"fixed {FIXED_BATCH} sorted": (budgets, [s["fixed32_sorted"]["texts_per_s"]] * len(sweep)),
        },
        "max_batch_tokens (thousands of padded tokens per forward pass)",
    )
