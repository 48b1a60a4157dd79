"""Merging shard results, reciprocal rank fusion, and the matched terms explain reports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from actors.chunker import clean_text
from actors.faiss_index import FaissIndex
from actors.processor import Item, Record
from actors.testing import HashEmbedder
from actors.testing.downstream import LocalDownstream
from actors.text_processor import TextProcessor
from actors.vector_index import Hit
from deployments.fusion import fuse, matched_terms, merge_shards
from schemas.envelope import DocumentEnvelope
from schemas.settings import ChunkConfig, FaissConfig
from tests.contract.helpers import scratch_dir


def hit(cid: str, score: float, text: str = "t", start: int = 0) -> Hit:
    return Hit(cid, cid.split("#")[0], 0, text, None, start, start + len(text), {}, score)


def test_merge_shards_takes_the_global_top_k_once_each():
    a = [hit("a#0", 0.9), hit("c#0", 0.5)]
    b = [hit("b#0", 0.7), hit("a#0", 0.8), hit("d#0", 0.1)]
    merged = merge_shards([a, b], 3)
    assert [h.chunk_id for h in merged] == ["a#0", "b#0", "c#0"]
    assert merged[0].score == 0.9


def test_merge_shards_breaks_ties_by_chunk_id():
    assert [h.chunk_id for h in merge_shards([[hit("z#0", 1.0)], [hit("b#0", 1.0)]], 2)] == ["b#0", "z#0"]


def test_rrf_rewards_agreement_and_keeps_both_ranks():
    vector = [hit("a#0", 0.9), hit("b#0", 0.8), hit("c#0", 0.7)]
    keyword = [hit("c#0", 12.0), hit("b#0", 10.0), hit("d#0", 9.0)]
    fused = fuse(vector, keyword, k=4, rrf_k=60)
    # c: 1/63 + 1/61 = 0.032266 beats b: 2/62 = 0.032258; both beat a (1/61) and d (1/63)
    assert [r.hit.chunk_id for r in fused] == ["c#0", "b#0", "a#0", "d#0"]
    b = fused[1]
    assert (b.vector_rank, b.keyword_rank) == (2, 2)
    assert b.score == pytest.approx(2 / 62)
    assert (b.vector_score, b.keyword_score) == (0.8, 10.0)
    assert fused[3].vector_rank is None and fused[3].keyword_rank == 3


def test_rrf_weights_shift_the_order():
    vector = [hit("a#0", 0.9), hit("b#0", 0.1)]
    keyword = [hit("b#0", 5.0), hit("a#0", 1.0)]
    assert fuse(vector, keyword, 2, vector_weight=2.0)[0].hit.chunk_id == "a#0"
    assert fuse(vector, keyword, 2, keyword_weight=2.0)[0].hit.chunk_id == "b#0"
    # equal weights tie on score: the better vector rank wins
    assert fuse(vector, keyword, 2)[0].hit.chunk_id == "a#0"


def test_rrf_with_one_empty_side_keeps_the_other_order():
    vector = [hit("a#0", 0.9), hit("b#0", 0.8)]
    assert [r.hit.chunk_id for r in fuse(vector, [], 5)] == ["a#0", "b#0"]


def test_matched_terms_are_in_document_coordinates():
    h = hit("a#1", 1.0, text="Cats were sleeping; the cat sleeps.", start=100)
    found = matched_terms("sleeping cats", h)
    assert [f["term"] for f in found] == ["Cats", "sleeping", "cat", "sleeps"]
    first = found[0]
    assert (first["start"], first["end"]) == (100, 104)


# -- matched terms in the document's own text ---------------------------------------------------

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
DIM = 16
MESSY = (
    "  The Cafe\u0301   au lait\r\nof Ro\u0308ntgen\x00 street\t\t(since 1901),\r\n\r\n"
    "served\x07 every\u00a0 morning; the ca\x00fe\u0301 opens   early.  "
)


@pytest.fixture(scope="module")
def processor() -> TextProcessor:
    processor = TextProcessor(ChunkConfig(), MODEL)
    processor.warm_up()
    return processor


@pytest.fixture
def index() -> Iterator[FaissIndex]:
    with scratch_dir() as directory:
        index = FaissIndex(directory / "shard-000", MODEL, DIM, FaissConfig(kind="flat", omp_threads=1))
        yield index
        index.close()


def ingest(processor: TextProcessor, index: FaissIndex, offset: int, **fields: object) -> int:
    """Writes one document through the processor as the consumer would; returns its chunks written."""
    downstream = LocalDownstream(HashEmbedder(dim=DIM), [index])
    envelope = DocumentEnvelope.model_validate({"kind": "document", **fields})
    item = Item(Record("docs", 0, offset, None, None), envelope)
    units, failed = processor.prepare([item], downstream.stored([envelope.id]))
    assert not failed
    for unit in units:
        unit.vectors = downstream.embed(unit.inputs).result()
    writes = processor.writes(units, 1)
    written = downstream.write(writes.phase1)[0].upserted
    downstream.write(writes.phase2)
    return written


def test_matched_terms_slice_the_document_to_the_words_as_written(processor, index) -> None:
    ingest(processor, index, 0, id="messy", text=MESSY)
    [hit] = index.keyword_search(["cafe roentgen street lait since morning opens"], 5)[0]
    assert hit.alignment and hit.text.startswith("The Café au lait of Röntgen street")
    found = matched_terms("café röntgen street lait since morning opens", hit)
    assert [f["term"] for f in found] == [
        "Café",
        "lait",
        "Röntgen",
        "street",
        "since",
        "morning",
        "café",
        "opens",
    ]
    written = [MESSY[f["start"] : f["end"]] for f in found]  # type: ignore[misc]
    assert written == [
        "Cafe\u0301",
        "lait",
        "Ro\u0308ntgen",
        "street",
        "since",
        "morning",
        "ca\x00fe\u0301",
        "opens",
    ]
    for f, as_written in zip(found, written, strict=True):
        assert clean_text(as_written) == f["term"] == hit.text[f["text_start"] : f["text_end"]]  # type: ignore[misc]
    # The vector side returns the same chunk with the same alignment.
    [vector_hit] = index.search(HashEmbedder(dim=DIM).embed([hit.text]), 1)[0]
    assert vector_hit.alignment == hit.alignment


def test_a_whitespace_edit_that_keeps_the_cleaned_text_moves_the_terms(processor, index) -> None:
    assert ingest(processor, index, 0, id="d", text="Some  text here.") == 1
    assert ingest(processor, index, 1, id="d", text="Some text  here.") == 1  # not skipped as unchanged
    [hit] = index.keyword_search(["here"], 1)[0]
    [term] = matched_terms("here", hit)
    assert (term["start"], term["end"]) == (11, 15)


def test_matched_terms_of_a_chunk_with_no_alignment_have_offsets_only_where_exact() -> None:
    plain = Hit("a#0", "a", 0, "cat naps", None, 10, 18, {}, 1.0, alignment=None)
    assert [(f["start"], f["end"]) for f in matched_terms("cat", plain)] == [(10, 13)]
    accented = Hit("b#0", "b", 0, "café naps", None, 10, 20, {}, 1.0, alignment=None)
    [term] = matched_terms("café", accented)
    assert (term["term"], term["start"], term["end"], term["text_start"], term["text_end"]) == (
        "café",
        None,
        None,
        0,
        4,
    )


def test_matched_terms_follow_a_stored_alignment() -> None:
    # "a cat" from "a \r\n cat": the run "\r\n " (source 1..5) became one space
    h = hit("d#0", 1.0, text="a cat", start=20)
    aligned = Hit(**{**h.__dict__, "end": 27, "alignment": "[[0,0],[1,1,4],[2,4]]"})
    [term] = matched_terms("cats", aligned)
    assert (term["start"], term["end"], term["text_start"]) == (24, 27, 2)
