"""The graph shard store: provenance bookkeeping (an update replaces exactly its document's facts, a
delete removes them, a re-delivery changes nothing, an older record is refused), the view kept in
step with the store, and the store's refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import networkx as nx
import pytest

from actors.graph_extract import CO_OCCURS, MENTIONS, ChunkGraph, Mention, Relation
from actors.graph_store import GraphStore
from actors.vector_index import DocumentRow, ShardWrite
from schemas.errors import ConfigError, RetryableError
from schemas.topology import Version

MODEL = "en_core_web_sm 3.8.0 graph/1"
TOPIC = "docs"


def mention(key: str, start: int, sentence: tuple[int, int] = (0, 100), label: str = "PERSON") -> Mention:
    return Mention(key, key.title(), label, start, start + len(key), sentence)


def chunk(doc: str, number: int, keys: list[str], relations: list[tuple[str, str, str]] = ()) -> ChunkGraph:  # type: ignore[assignment]
    return ChunkGraph(
        f"{doc}#{number}",
        doc,
        number,
        tuple(mention(k, 10 * i) for i, k in enumerate(keys)),
        tuple(Relation(a, b, label, (0, 100)) for a, b, label in relations),
    )


def upsert(doc: str, offset: int, chunks: list[ChunkGraph], content: str = "h") -> ShardWrite[ChunkGraph]:
    version: Version = (TOPIC, 0, offset)
    return ShardWrite(
        upserts=chunks,
        truncate={doc: len(chunks)},
        documents={doc: DocumentRow(content, len(chunks), version)},
        versions={doc: version},
        offsets={TOPIC: {0: offset + 1}},
    )


def delete(doc: str, offset: int) -> ShardWrite[ChunkGraph]:
    return ShardWrite(
        delete_documents=[doc], versions={doc: (TOPIC, 0, offset)}, offsets={TOPIC: {0: offset + 1}}
    )


def snapshot(store: GraphStore) -> dict[str, Any]:
    """Everything the view holds, as plain data."""
    with store.reading() as g:
        return {
            "nodes": {n: {k: dict(v) for k, v in d.items()} for n, d in g.nodes(data=True)},
            "edges": {(a, b, k): dict(d["evidence"]) for a, b, k, d in g.edges(keys=True, data=True)},
        }


def rebuilt(store: GraphStore, directory: Path) -> dict[str, Any]:
    """The view a fresh open builds from the store alone."""
    store.close()
    again = GraphStore(directory, MODEL)
    try:
        return snapshot(again)
    finally:
        again.close()


TESLA = [
    chunk("tesla", 0, ["nikola tesla", "smiljan"], [("nikola tesla", "smiljan", "born in")]),
    chunk("tesla", 1, ["nikola tesla", "edison", "new york"], [("edison", "new york", CO_OCCURS)]),
]
EDISON = [chunk("edison", 0, ["edison", "menlo park"], [("edison", "menlo park", CO_OCCURS)])]


def test_facts_enter_the_view_with_their_provenance(tmp_path: Path) -> None:
    store = GraphStore(tmp_path, MODEL)
    result = store.apply(upsert("tesla", 0, TESLA))
    assert (result.upserted, result.unchanged, result.stale) == (2, 0, 0)
    store.apply(upsert("edison", 1, EDISON))
    g = store.graph
    assert set(g.nodes) == {"nikola tesla", "smiljan", "edison", "new york", "menlo park"}
    assert dict(g.nodes["edison"]["chunks"]) == {"tesla#1": 1, "edison#0": 1}
    assert dict(g.edges["nikola tesla", "smiljan", "born in"]["evidence"]) == {("tesla#0", 0, 100): 1}
    assert store.mentions(["edison"])["edison"] == [
        {"chunk_id": "edison#0", "document_id": "edison", "name": "Edison", "label": "PERSON",
         "span": [0, 6], "sentence": [0, 100]},
        {"chunk_id": "tesla#1", "document_id": "tesla", "name": "Edison", "label": "PERSON",
         "span": [10, 16], "sentence": [0, 100]},
    ]  # fmt: skip
    stats = store.stats()
    assert stats == {"entities": 5, "edges": 3, "mentions": 7, "relations": 3, "chunks": 3, "documents": 2}
    assert store.offsets() == {TOPIC: {0: 2}}
    assert store.get_document_rows(["tesla", "nope"]) == {"tesla": DocumentRow("h", 2, (TOPIC, 0, 0))}
    assert rebuilt(store, tmp_path) == snapshot_of(
        tmp_path, [upsert("tesla", 0, TESLA), upsert("edison", 1, EDISON)]
    )


def snapshot_of(directory: Path, writes: list[ShardWrite[ChunkGraph]]) -> dict[str, Any]:
    """The view of the same writes applied to a fresh store elsewhere."""
    other = GraphStore(directory.parent / f"{directory.name}-other", MODEL)
    try:
        for write in writes:
            other.apply(write)
        return snapshot(other)
    finally:
        other.close()


def test_an_update_replaces_exactly_its_document_s_facts(tmp_path: Path) -> None:
    store = GraphStore(tmp_path, MODEL)
    store.apply(upsert("tesla", 0, TESLA))
    store.apply(upsert("edison", 1, EDISON))
    # the new version has one chunk, no Smiljan, and Edison no more in New York
    shorter = [chunk("tesla", 0, ["nikola tesla", "edison"], [("nikola tesla", "edison", "meet")])]
    result = store.apply(upsert("tesla", 2, shorter, content="h2"))
    assert (result.upserted, result.deleted) == (1, 1)  # chunk 0 replaced, chunk 1 truncated
    g = store.graph
    assert "smiljan" not in g and "new york" not in g  # no provenance left
    assert not g.has_edge("edison", "new york")
    assert dict(g.nodes["edison"]["chunks"]) == {"tesla#0": 1, "edison#0": 1}  # the other document's stays
    assert g.has_edge("edison", "menlo park", CO_OCCURS)
    assert store.stats()["chunks"] == 2
    assert rebuilt(store, tmp_path) == snapshot_of(
        tmp_path, [upsert("edison", 1, EDISON), upsert("tesla", 2, shorter)]
    )


def test_a_delete_removes_the_document_s_facts_and_only_them(tmp_path: Path) -> None:
    store = GraphStore(tmp_path, MODEL)
    store.apply(upsert("tesla", 0, TESLA))
    store.apply(upsert("edison", 1, EDISON))
    result = store.apply(delete("tesla", 2))
    assert result.deleted == 2
    assert set(store.graph.nodes) == {"edison", "menlo park"}
    assert store.get_document_rows(["tesla"]) == {}
    assert store.get_document_versions(["tesla"]) == {"tesla": (TOPIC, 0, 2)}  # kept: older ones are refused
    assert store.mentions(["nikola tesla"]) == {"nikola tesla": []}
    assert rebuilt(store, tmp_path) == snapshot_of(tmp_path, [upsert("edison", 1, EDISON)])


def test_a_redelivery_changes_nothing_and_an_older_record_is_refused(tmp_path: Path) -> None:
    store = GraphStore(tmp_path, MODEL)
    store.apply(upsert("tesla", 5, TESLA))
    before = snapshot(store)
    again = store.apply(upsert("tesla", 5, TESLA))
    assert (again.upserted, again.unchanged, again.deleted, again.stale) == (0, 2, 0, 0)
    assert snapshot(store) == before
    older = store.apply(upsert("tesla", 3, [chunk("tesla", 0, ["someone else"])]))
    assert older.stale == 1 and older.upserted == 0
    assert snapshot(store) == before
    assert store.apply(delete("tesla", 4)).stale == 1
    assert snapshot(store) == before
    assert store.offsets() == {TOPIC: {0: 6}}  # max-merged: the older batches never move it back


def test_a_chunk_whose_facts_move_elsewhere_leaves_nothing_here(tmp_path: Path) -> None:
    """A shard gets every chunk of a document, with only its part of the facts: an empty part
    replaces what the chunk had here."""
    store = GraphStore(tmp_path, MODEL)
    store.apply(upsert("tesla", 0, TESLA))
    empty = [ChunkGraph("tesla#0", "tesla", 0), ChunkGraph("tesla#1", "tesla", 1)]
    result = store.apply(upsert("tesla", 1, empty, content="h2"))
    assert result.upserted == 2
    assert store.graph.number_of_nodes() == 0 and store.stats()["chunks"] == 0
    assert store.get_document_rows(["tesla"])["tesla"].content_hash == "h2"


def test_the_view_follows_a_mentions_edge_both_ways_of_a_title(tmp_path: Path) -> None:
    store = GraphStore(tmp_path, MODEL)
    titled = ChunkGraph(
        "tesla#0",
        "tesla",
        0,
        (mention("nikola tesla", 0, label="TITLE"), mention("edison", 20)),
        (Relation("nikola tesla", "edison", MENTIONS, (15, 40)),),
    )
    store.apply(upsert("tesla", 0, [titled]))
    undirected = nx.Graph(store.graph)
    assert list(undirected.neighbors("edison")) == ["nikola tesla"]


def test_another_model_s_graph_and_a_second_writer_are_refused(tmp_path: Path) -> None:
    store = GraphStore(tmp_path, MODEL)
    with pytest.raises(RetryableError, match="open by another writer"):
        GraphStore(tmp_path, MODEL)
    store.close()
    with pytest.raises(ConfigError, match=r"was built by .*another extraction model"):
        GraphStore(tmp_path, "another 1.0")


def test_the_recorded_model_is_read_without_loading_the_store(tmp_path: Path) -> None:
    from actors.graph_store import recorded_graph_model

    assert recorded_graph_model(tmp_path / "none") is None
    GraphStore(tmp_path / "g", "spacy x; extraction 2").close()
    assert recorded_graph_model(tmp_path / "g") == "spacy x; extraction 2"
