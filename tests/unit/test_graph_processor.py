"""The graph processor with the real chunker, spaCy extractor and graph shard stores, in process:
what two shards hold together is each document's graph; an update leaves exactly the new facts,
a delete none, a re-delivery changes nothing, unchanged content is not extracted again."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from actors.graph_extract import Extractor, document_graph
from actors.graph_processor import GraphProcessor
from actors.graph_store import GraphStore
from actors.processor import Item, Record
from actors.testing.downstream import LocalDownstream
from schemas.envelope import DocumentEnvelope
from schemas.ids import shard_of
from schemas.settings import ChunkConfig, GraphConfig

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TOPIC = "docs"
CHUNK = ChunkConfig(max_tokens=32, overlap_tokens=0)
TESLA = (
    "Nikola Tesla was born in Smiljan. Tesla worked for Thomas Edison in New York City. Edison "
    "later built a laboratory in Menlo Park, New Jersey. Westinghouse bought Tesla's patents."
)
EDISON = "Thomas Edison founded General Electric. Edison lived in Menlo Park with Mina Miller."


class Harness:
    def __init__(self, tmp_path: Path, n_shards: int = 2) -> None:
        self.extractor = Extractor(GraphConfig())
        self.stores = [GraphStore(tmp_path / f"shard-{i}", "test") for i in range(n_shards)]
        self.downstream = LocalDownstream(self.extractor, self.stores)
        self.processor = GraphProcessor(CHUNK, MINILM)
        self.offset = 0
        self.extracted = 0

    def send(self, *envelopes: DocumentEnvelope, offset: int | None = None) -> list[int]:
        """One batch through prepare, extraction and both write phases; the phase 1 results'
        upserted counts, per shard."""
        items = []
        for env in envelopes:
            at = self.offset if offset is None else offset
            items.append(Item(Record(TOPIC, 0, at, env.id.encode(), b"{}"), env))
            self.offset = max(self.offset, at + 1)
        units, failed = self.processor.prepare(items, self.downstream.stored([i.id for i in items]))
        assert not failed
        for unit in units:
            if unit.inputs:
                unit.vectors = self.downstream.embed(unit.inputs).result()
                self.extracted += len(unit.inputs)
        writes = self.processor.writes(units, len(self.stores))
        results = self.downstream.write(writes.phase1)
        self.downstream.write(writes.phase2)
        return [results[i].upserted for i in sorted(results)]

    def mentions(self) -> Counter[tuple[str, str, int, int]]:
        """Every mention the shards hold: (chunk id, key, start, end)."""
        return Counter(
            (g.chunk_id, m.key, m.start, m.end)
            for store in self.stores
            for g in store.chunk_graphs(store.chunk_ids())
            if g is not None
            for m in g.mentions
        )

    def relations(self) -> set[tuple[str, str, str, str]]:
        return {
            (g.chunk_id, r.source, r.target, r.label)
            for store in self.stores
            for g in store.chunk_graphs(store.chunk_ids())
            if g is not None
            for r in g.relations
        }

    def expected(
        self, *envelopes: DocumentEnvelope
    ) -> tuple[Counter[tuple[str, str, int, int]], set[tuple[str, str, str, str]]]:
        """The same documents' graphs, made directly (chunker, extractor, document_graph)."""
        mentions: Counter[tuple[str, str, int, int]] = Counter()
        relations: set[tuple[str, str, str, str]] = set()
        for env in envelopes:
            doc = self.processor.text.chunker.chunk(env)
            chunks = doc.chunks
            for g in document_graph(
                env.id, env.title, chunks, self.extractor.extract([c.text for c in chunks])
            ):
                mentions.update((g.chunk_id, m.key, m.start, m.end) for m in g.mentions)
                relations.update((g.chunk_id, r.source, r.target, r.label) for r in g.relations)
        return mentions, relations


@pytest.fixture
def harness(tmp_path: Path) -> Harness:
    return Harness(tmp_path)


def test_the_shards_hold_each_document_s_graph_and_each_entity_lives_on_its_shard(harness: Harness) -> None:
    tesla = DocumentEnvelope(id="tesla", title="Nikola Tesla", text=TESLA)
    edison = DocumentEnvelope(id="edison", title="Thomas Edison", text=EDISON)
    harness.send(tesla, edison)
    mentions, relations = harness.expected(tesla, edison)
    tesla_chunks = {c for c, *_ in mentions if c.startswith("tesla#")}
    assert len(mentions) > 10 and len(tesla_chunks) >= 2
    assert harness.mentions() == mentions
    assert harness.relations() == relations
    for i, store in enumerate(harness.stores):
        assert all(shard_of(key, 2) == i for key, chunks in store.graph.nodes(data="chunks") if chunks)
        # both ends' shards hold an edge
        for a, b, label in store.graph.edges(keys=True):
            assert i in (shard_of(a, 2), shard_of(b, 2)), (a, b, label)
    rows = {**harness.stores[0].get_document_rows(["tesla", "edison"]),
            **harness.stores[1].get_document_rows(["tesla", "edison"])}  # fmt: skip
    assert sorted(rows) == ["edison", "tesla"] and rows["tesla"].n_chunks == len(tesla_chunks)


def test_an_update_leaves_the_new_facts_a_delete_none_a_redelivery_nothing_new(harness: Harness) -> None:
    tesla = DocumentEnvelope(id="tesla", title="Nikola Tesla", text=TESLA)
    edison = DocumentEnvelope(id="edison", title="Thomas Edison", text=EDISON)
    harness.send(tesla, edison)
    shorter = DocumentEnvelope(id="tesla", title="Nikola Tesla", text="Nikola Tesla admired Mark Twain.")
    harness.send(shorter)
    assert harness.mentions() == harness.expected(shorter, edison)[0]
    assert harness.relations() == harness.expected(shorter, edison)[1]
    keys = {key for _, key, _, _ in harness.mentions()}
    assert "smiljan" not in keys and "westinghouse" not in keys and "mark twain" in keys
    # the same record again (a re-delivery after a crash): nothing changes
    before = (harness.mentions(), harness.relations())
    assert harness.send(shorter, offset=harness.offset - 1) == [0, 0]
    assert (harness.mentions(), harness.relations()) == before
    # an older record arriving late is refused
    harness.send(tesla, offset=0)
    assert (harness.mentions(), harness.relations()) == before
    # a delete (op), then a tombstone-like op of the other
    harness.send(DocumentEnvelope(id="tesla", op="delete"))
    assert harness.mentions() == harness.expected(edison)[0]
    harness.send(DocumentEnvelope(id="edison", op="delete"))
    assert harness.mentions() == Counter() and harness.relations() == set()
    assert all(store.graph.number_of_nodes() == 0 for store in harness.stores)


def test_unchanged_content_is_not_extracted_again(harness: Harness) -> None:
    edison = DocumentEnvelope(id="edison", title="Thomas Edison", text=EDISON)
    harness.send(edison)
    extracted, before = harness.extracted, harness.mentions()
    harness.send(edison)  # a new record of the same content
    assert harness.extracted == extracted
    assert harness.mentions() == before
    versions = [store.get_document_versions(["edison"]) for store in harness.stores]
    assert versions == [{"edison": (TOPIC, 0, 1)}] * 2  # its version still moved on every shard
