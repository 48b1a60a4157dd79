"""What each Ray Train worker does to train Riverbed's text models, and the pure parts.

Each model starts from an encoder (``finetune.*.base_model``) with a new head (a base trained
with another head, such as the reader's span head under the reranker, loses that head):

- **Reranker** (a cross-encoder, one logit): each step takes ``batch_size`` questions; each brings
  its gold passage and ``negatives`` passages drawn (seeded, a fresh draw every epoch) from those
  mined for it; the (question, passage) pairs of a question form one softmax over its group, the
  loss the cross-entropy of the gold passage (a listwise loss: the model learns to put the gold
  passage above the near misses that retrieval confuses it with).
- **Embedder** (a sentence-transformers bi-encoder, fine-tuned as a whole): each step embeds
  ``batch_size`` questions and their gold chunks plus ``negatives`` mined chunks each; every
  question's softmax runs over all chunks of the step (its own gold one the target, the batch's
  others and the mined ones negatives), on cosine similarities times ``scale``.
- **Reader** (start and end logits per token): SQuAD-style windows of question + passage
  (:func:`reader_features`); a window that does not hold the answer, and every window of an
  unanswerable question, points at the first token, whose start + end score is the window's
  no-answer score. The loss is the mean of the start and end cross-entropies.

Schedule: AdamW (no weight decay on biases and norms), linear warm-up then linear decay
(:func:`lr_factor`). Several workers split each epoch's batches (data-parallel through
``prepare_model``) and run the same number of steps; rank 0 sends progress and saves the model
(``save_pretrained``, with its tokenizer) as the run's checkpoint.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from actors.embedder import cpu_threads
from actors.reranker import pair_text
from schemas.settings import (
    EmbedderFinetuneConfig,
    ReaderFinetuneConfig,
    RerankerFinetuneConfig,
    TextFinetuneConfig,
)

CONFIGS: dict[str, type[TextFinetuneConfig]] = {
    "reranker": RerankerFinetuneConfig,
    "reader": ReaderFinetuneConfig,
    "embedder": EmbedderFinetuneConfig,
}

PROGRESS_EVERY_S = 5.0


# PURE PARTS
def lr_factor(step: int, total: int, warmup: int) -> float:
    """The learning rate's share of its peak at ``step``: linear from 0 over ``warmup`` steps,
    then linear down to 0 at ``total``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def epoch_batches(
    n: int, batch_size: int, rng: random.Random, rank: int = 0, world: int = 1
) -> list[list[int]]:
    """This worker's batches of one epoch: ``range(n)`` shuffled, cut in batches, dealt round
    robin to ``world`` workers, each getting the same number (the remainder is dropped)."""
    order = list(range(n))
    rng.shuffle(order)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    per_worker = len(batches) // world if world > 1 else len(batches)
    return batches[rank::world][:per_worker]


@dataclass(frozen=True)
class RerankGroup:
    """One training question: its text, the passage that answers it and the mined near misses,
    each passage a ``(title, text)``."""

    query: str
    positive: tuple[str | None, str]
    negatives: tuple[tuple[str | None, str], ...]


def group_pairs(
    groups: Sequence[RerankGroup], batch: Sequence[int], negatives: int, rng: random.Random
) -> tuple[list[tuple[str, str]], int]:
    """The (question, passage) pairs of ``batch``: per group its positive first, then
    ``negatives`` of its mined passages drawn without replacement (with replacement when it has
    fewer). Returns the pairs and the group size (``1 + negatives``)."""
    pairs: list[tuple[str, str]] = []
    for i in batch:
        group = groups[i]
        drawn = _draw(group.negatives, negatives, rng)
        for title, text in (group.positive, *drawn):
            pairs.append((group.query, pair_text(title, text)))
    return pairs, 1 + negatives


def _draw(pool: Sequence[Any], n: int, rng: random.Random) -> list[Any]:
    """``n`` of ``pool`` without replacement, or with it when the pool is smaller."""
    if not n or not pool:
        return []
    return rng.sample(list(pool), n) if len(pool) >= n else [rng.choice(pool) for _ in range(n)]


@dataclass(frozen=True)
class ReaderExample:
    """One reading question: the question, the passage, and where the answer starts in it
    (characters; -1: the passage does not answer it) and its text."""

    question: str
    context: str
    answer_start: int
    answer_text: str


def reader_features(
    tokenizer: Any, examples: Sequence[ReaderExample], max_tokens: int, stride: int
) -> dict[str, list[Any]]:
    """SQuAD-style windows: per example, question + passage windows of at most ``max_tokens``
    (passages too long for one overlap by ``stride`` tokens), and each window's
    ``start_positions`` / ``end_positions`` (token indices of the answer; 0, the first token, when
    the window does not hold all of it or there is none). Also ``example`` (which example each
    window is) and ``offset_mapping`` (None for tokens outside the passage)."""
    encoded = tokenizer(
        [e.question for e in examples],
        [e.context for e in examples],
        truncation="only_second",
        max_length=max_tokens,
        stride=stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        padding=False,
    )
    starts, ends, offsets = [], [], []
    for w, source in enumerate(encoded["overflow_to_sample_mapping"]):
        sequence_ids = encoded.sequence_ids(w)
        window = [o if sequence_ids[t] == 1 else None for t, o in enumerate(encoded["offset_mapping"][w])]
        offsets.append(window)
        example = examples[source]
        start_token = end_token = 0
        if example.answer_start >= 0:
            a, b = example.answer_start, example.answer_start + len(example.answer_text)
            inside = [t for t, o in enumerate(window) if o is not None]
            if inside and window[inside[0]][0] <= a and window[inside[-1]][1] >= b:  # type: ignore[index]
                start_token = next(t for t in inside if window[t][1] > a)  # type: ignore[index]
                end_token = next(t for t in reversed(inside) if window[t][0] < b)  # type: ignore[index]
        starts.append(start_token)
        ends.append(end_token)
    return {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        **({"token_type_ids": encoded["token_type_ids"]} if "token_type_ids" in encoded else {}),
        "start_positions": starts,
        "end_positions": ends,
        "example": list(encoded["overflow_to_sample_mapping"]),
        "offset_mapping": offsets,
    }


def pad_batch(features: dict[str, list[Any]], batch: Sequence[int], pad_id: int) -> dict[str, Any]:
    """Tensors of the windows in ``batch``, padded to the longest of them."""
    import torch

    width = max(len(features["input_ids"][i]) for i in batch)
    out: dict[str, Any] = {}
    for key, pad in (("input_ids", pad_id), ("attention_mask", 0), ("token_type_ids", 0)):
        if key in features:
            out[key] = torch.tensor(
                [features[key][i] + [pad] * (width - len(features[key][i])) for i in batch], dtype=torch.long
            )
    for key in ("start_positions", "end_positions"):
        out[key] = torch.tensor([features[key][i] for i in batch], dtype=torch.long)
    return out


# THE WORKER
def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's per-worker function. ``config``: ``kind`` (reranker or reader), ``finetune``
    (its settings as a dict), ``base`` (the encoder's files), ``groups`` (reranker: RerankGroup
    fields) or ``examples`` (reader: ReaderExample fields), ``queue`` (progress, or None)."""
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    kind = config["kind"]
    finetune = CONFIGS[kind].model_validate(config["finetune"])
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        torch.set_num_threads(cpu_threads(finetune.num_cpus))
    torch.manual_seed(finetune.seed)
    tokenizer = AutoTokenizer.from_pretrained(config["base"])
    queue = config.get("queue")

    def tell(event: dict[str, Any]) -> None:
        if queue is not None and rank == 0:
            queue.put(event)

    step_fn: Callable[[Any, list[int], random.Random], Any]
    model: Any
    groups = [
        RerankGroup(g["query"], tuple(g["positive"]), tuple(tuple(n) for n in g["negatives"]))
        for g in config.get("groups", [])
    ]
    if kind == "embedder":
        assert isinstance(finetune, EmbedderFinetuneConfig)
        from sentence_transformers import SentenceTransformer

        embed_config = finetune
        st = SentenceTransformer(config["base"], device=str(device))
        st.max_seq_length = min(st.max_seq_length or finetune.max_tokens, finetune.max_tokens)
        if finetune.lora_rank is not None:
            from peft import LoraConfig, get_peft_model

            # adapters on the encoder (peft picks the attention projections of known architectures);
            # every other weight frozen; merged back before saving (see below)
            lora = LoraConfig(r=finetune.lora_rank, lora_alpha=finetune.lora_alpha)
            encoder: Any = st[0]
            encoder.model = get_peft_model(encoder.model, lora)
        model = st
        count = len(groups)

        def vectors(m: Any, texts: list[str]) -> Any:
            features = st.preprocess(texts)
            features = {k: v.to(device) if hasattr(v, "to") else v for k, v in features.items()}
            return torch.nn.functional.normalize(m(features)["sentence_embedding"], dim=-1)

        def step_fn(m: Any, batch: list[int], rng: random.Random) -> Any:
            queries = [groups[i].query for i in batch]
            chunks = [groups[i].positive[1] for i in batch]
            for i in batch:
                pool = groups[i].negatives
                chunks += [text for _, text in _draw(pool, embed_config.negatives, rng)]
            scores = vectors(m, queries) @ vectors(m, chunks).T * embed_config.scale
            return torch.nn.functional.cross_entropy(scores, torch.arange(len(batch), device=device))

    elif kind == "reranker":
        assert isinstance(finetune, RerankerFinetuneConfig)
        rerank = finetune
        model = AutoModelForSequenceClassification.from_pretrained(config["base"], num_labels=1)
        count = len(groups)

        def step_fn(m: Any, batch: list[int], rng: random.Random) -> Any:
            pairs, size = group_pairs(groups, batch, rerank.negatives, rng)
            encoded = tokenizer(
                [q for q, _ in pairs], [p for _, p in pairs], truncation="only_second",
                max_length=rerank.max_tokens, padding=True, return_tensors="pt",
            ).to(device)  # fmt: skip
            logits = m(**encoded).logits.view(len(batch), size)
            target = torch.zeros(len(batch), dtype=torch.long, device=device)
            return torch.nn.functional.cross_entropy(logits, target)

    else:
        assert isinstance(finetune, ReaderFinetuneConfig)
        model = AutoModelForQuestionAnswering.from_pretrained(config["base"])
        examples = [ReaderExample(**e) for e in config["examples"]]
        features = reader_features(tokenizer, examples, finetune.max_tokens, finetune.stride)
        count = len(features["input_ids"])
        pad_id = tokenizer.pad_token_id or 0

        def step_fn(m: Any, batch: list[int], rng: random.Random) -> Any:
            tensors = {k: v.to(device) for k, v in pad_batch(features, batch, pad_id).items()}
            return m(**tensors).loss

    model = ray.train.torch.prepare_model(model)
    core: Any = model.module if hasattr(model, "module") else model
    history = _fit(model, core, finetune, count, step_fn, rank, world, tell)
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0 and kind == "embedder":
            if hasattr(core[0].model, "merge_and_unload"):  # LoRA: a plain model, loadable anywhere
                core[0].model = core[0].model.merge_and_unload()
            core.save(directory)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        elif rank == 0:
            core.save_pretrained(directory)
            tokenizer.save_pretrained(directory)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report({**history[-1], "history": history}, checkpoint=checkpoint)


def _fit(
    model: Any,
    core: Any,
    finetune: TextFinetuneConfig,
    count: int,
    step_fn: Callable[[Any, list[int], random.Random], Any],
    rank: int,
    world: int,
    tell: Callable[[dict[str, Any]], None],
) -> list[dict[str, Any]]:
    """``finetune.epochs`` passes over ``count`` items; returns each epoch's metrics."""
    import ray.train
    import torch

    trained = [p for p in core.parameters() if p.requires_grad]  # not the weights LoRA freezes
    decay = [p for p in trained if p.ndim >= 2]
    rest = [p for p in trained if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": finetune.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=finetune.lr,
    )
    rng = random.Random(finetune.seed)
    plans = [epoch_batches(count, finetune.batch_size, rng, rank, world) for _ in range(finetune.epochs)]
    total = sum(len(plan) for plan in plans)
    warmup = int(finetune.warmup_fraction * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total, warmup))
    draws = random.Random(finetune.seed + 1 + rank)
    history: list[dict[str, Any]] = []
    started, step, last_told = time.monotonic(), 0, 0.0
    model.train()
    for epoch, plan in enumerate(plans):
        epoch_started, losses = time.monotonic(), []
        for batch in plan:
            loss = step_fn(model, batch, draws)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            step += 1
            if time.monotonic() - last_told >= PROGRESS_EVERY_S:
                last_told = time.monotonic()
                recent = losses[-20:]
                tell(
                    {"kind": "step", "epoch": epoch + 1, "epochs": len(plans), "step": step, "steps": total,
                     "loss": sum(recent) / len(recent), "elapsed_s": last_told - started}
                )  # fmt: skip
        now = time.monotonic()
        metrics = {
            "epoch": epoch + 1, "steps": step, "loss": sum(losses) / max(1, len(losses)),
            "epoch_s": now - epoch_started, "elapsed_s": now - started,
        }  # fmt: skip
        history.append(metrics)
        tell({"kind": "epoch", "epochs": len(plans), **metrics})
        if epoch + 1 < len(plans):
            ray.train.report(metrics)
    return history
