"""The pure helpers of `riverbed bench batching`: building the mix, the batches each strategy
runs, padding efficiency. No model (the tokenizer-facing helpers get a fake one)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actors.batching import plan_batches
from cluster.bench.batching import (
    arrival_batches,
    cut_to_tokens,
    fit_mix,
    interleave,
    length_stats,
    load_mix,
    padded_tokens,
    padding_efficiency,
    sorted_batches,
    spread,
)


def test_interleave_puts_each_passage_before_its_questions_in_file_order():
    passages = [("p1", "P one"), ("p2", "P two"), ("p3", "P three")]
    questions = [("p1", "q1a"), ("p2", "q2a"), ("p1", "q1b"), ("gone", "orphan"), ("p2", "q2b")]
    assert interleave(passages, questions) == [
        ("passage", "P one"),
        ("question", "q1a"),
        ("question", "q1b"),
        ("passage", "P two"),
        ("question", "q2a"),
        ("question", "q2b"),
        ("passage", "P three"),
        ("question", "orphan"),
    ]


def test_load_mix_reads_a_beir_folder(tmp_path: Path):
    (tmp_path / "corpus.jsonl").write_text(
        "".join(json.dumps({"id": i, "title": "t", "text": f"passage {i}"}) + "\n" for i in ("a", "b"))
    )
    (tmp_path / "queries.jsonl").write_text(
        "".join(json.dumps({"id": q, "text": f"question {q}"}) + "\n" for q in ("1", "2", "3"))
    )
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n1\tb\t1\n2\ta\t1\n3\tb\t1\n")
    assert [text for _, text in load_mix(tmp_path)] == [
        "passage a",
        "question 2",
        "passage b",
        "question 1",
        "question 3",
    ]


def _groups(n_groups: int, questions: int) -> list[tuple[str, str]]:
    mix = []
    for g in range(n_groups):
        mix.append(("passage", f"p{g}"))
        mix.extend(("question", f"q{g}.{k}") for k in range(questions))
    return mix


def test_spread_takes_whole_groups_at_a_stride_and_keeps_their_share():
    mix = _groups(20, 4)  # 100 texts, one passage in five
    sample = spread(mix, 25)
    assert sample == [item for g in range(0, 20, 4) for item in mix[g * 5 : g * 5 + 5]]
    assert sum(kind == "passage" for kind, _ in sample) * 5 == len(sample)


@pytest.mark.parametrize("cap", [None, 100, 500])
def test_spread_keeps_everything_when_the_cap_does_not_bind(cap: int | None):
    mix = _groups(20, 4)
    assert spread(mix, cap) == mix


def test_cut_to_tokens_cuts_after_the_last_kept_token_only_when_truncated():
    text = "alpha beta gamma delta"
    offsets = [(0, 0), (0, 5), (6, 10), (0, 0)]  # [CLS] alpha beta [SEP]
    assert cut_to_tokens(text, offsets, n_ids=4, max_tokens=4) == "alpha beta"
    assert cut_to_tokens(text, offsets, n_ids=4, max_tokens=6) == text


class _WordTokenizer:
    """Words as tokens, plus [CLS] and [SEP], like a fast tokenizer's __call__ with offsets."""

    def __call__(self, texts, truncation, max_length, return_offsets_mapping, padding):
        ids, offsets = [], []
        for text in texts:
            spans, start = [], 0
            for word in text.split():
                start = text.index(word, start)
                spans.append((start, start + len(word)))
                start += len(word)
            spans = [(0, 0), *spans[: max_length - 2], (0, 0)]
            offsets.append(spans)
            ids.append(list(range(len(spans))))
        return {"input_ids": ids, "offset_mapping": offsets}


def _count(texts):
    return [len(t.split()) + 2 for t in texts]


def test_fit_mix_cuts_long_texts_and_drops_short_ones_in_order():
    texts = ["a b c", "w " * 20, "one two three four five six", "x"]
    kept, cut, lengths, was_cut = fit_mix(texts, _WordTokenizer(), _count, max_tokens=8, min_tokens=5)
    assert kept == [0, 1, 2]
    assert cut == ["a b c", "w w w w w w", "one two three four five six"]
    assert lengths == [5, 8, 8]
    assert was_cut == [False, True, False]


def test_length_stats():
    stats = length_stats([5, 10, 20, 300])
    assert (stats["min"], stats["max"], stats["total"]) == (5, 300, 335)
    assert stats["p50"] == 15.0


def test_arrival_batches_are_consecutive_slices():
    assert arrival_batches(70, 32) == [list(range(32)), list(range(32, 64)), list(range(64, 70))]
    assert arrival_batches(0, 32) == []


def test_sorted_batches_follow_character_length_like_encode():
    texts = ["aa", "a", "aaaa", "aaa", "aaaaa"]
    assert sorted_batches(texts, 2) == [[4, 2], [3, 0], [1]]


def test_padding_counts_every_batch_at_its_longest_text():
    lengths = [10, 200, 12, 11]
    assert padded_tokens(lengths, [[0, 1], [2, 3]]) == 2 * 200 + 2 * 12
    assert padding_efficiency(lengths, [[0, 1], [2, 3]]) == pytest.approx(233 / 424)
    assert padding_efficiency(lengths, [[i] for i in range(4)]) == 1.0
    assert padding_efficiency([], []) == 1.0


def test_token_budget_pads_less_than_fixed_batches_on_a_mixed_stream():
    # A long passage, then short questions, over and over: every arrival slice of 32 holds a
    # passage, so nearly all of it is padding; the token-budget plan groups neighbours in length.
    lengths = [200 if i % 6 == 0 else 15 for i in range(600)]
    fixed = padding_efficiency(lengths, arrival_batches(len(lengths), 32))
    budget = padding_efficiency(lengths, plan_batches(lengths, 2048, 256))
    assert fixed < 0.25
    assert budget > 0.95
