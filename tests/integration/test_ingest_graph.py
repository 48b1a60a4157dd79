"""The knowledge graph built through the stream: real Kafka, real Ray actors, the real chunker and
spaCy pipeline. What the graph shards hold afterwards is compared, fact by fact, with the graph
made directly from the documents that are left (the chunker, the extractor and document_graph in
this process): exact provenance after updates and deletes, and after killing the extractor and a
graph shard mid-stream. A graph shard whose store was lost refuses to answer."""

from __future__ import annotations

import shutil
from collections import Counter

import pytest
import ray

from cluster.kafka_admin import committed_offsets
from cluster.pipeline import Pipeline, open_graph_shards, release_shards, reset_graph
from cluster.stats import index_stats
from schemas.envelope import DocumentEnvelope
from schemas.errors import IndexUnavailableError
from schemas.settings import Settings, load_settings
from schemas.topology import actor_name, shard_directory
from tests.integration.ingest_helpers import Fact, expected_graph, kill_mid_stream, produce, squad_documents


def with_graph(settings: Settings, n_shards: int = 2, poll_max_records: int = 256) -> Settings:
    dump = settings.model_dump(mode="json")
    dump["graph"].update({"enabled": True, "n_shards": n_shards})
    dump["ingest"]["poll_max_records"] = poll_max_records
    return load_settings(overrides=dump)


def stored_graph(settings: Settings) -> tuple[Counter[Fact], set[Fact]]:
    """Mentions and relations the graph shards hold, read through the shard actors (a relation is
    on the shards of both its ends: a set)."""
    side = settings.graph_side()
    mentions: Counter[Fact] = Counter()
    relations: set[Fact] = set()
    for i in range(side.index.n_shards):
        shard = ray.get_actor(actor_name(side.index.name, "shard", i), namespace=side.ray.namespace)
        for g in ray.get(shard.chunk_graphs.remote(ray.get(shard.chunk_ids.remote()))):
            mentions.update((g.chunk_id, m.key, m.label, str(m.start), str(m.end)) for m in g.mentions)
            relations.update((g.chunk_id, r.source, r.target, r.label) for r in g.relations)
    return mentions, relations


def final_documents(
    docs: list[DocumentEnvelope], updated: dict[str, DocumentEnvelope], deleted: set[str]
) -> list[DocumentEnvelope]:
    return [updated.get(d.id, d) for d in docs if d.id not in deleted]


def updates_and_deletes(
    docs: list[DocumentEnvelope],
) -> tuple[dict[str, DocumentEnvelope], list[str], list[str]]:
    """30 documents rewritten (a new last sentence naming other entities; one shorter), 20
    deleted by an envelope and 10 by a tombstone."""
    updated = {}
    for i, d in enumerate(docs[:30]):
        text = (
            d.text[: len(d.text) // 3]
            if i == 0
            else d.text + " Later, Marie Curie visited Vienna with Albert Einstein."
        )
        updated[d.id] = DocumentEnvelope(id=d.id, title=d.title, text=text, metadata=d.metadata)
    return updated, [d.id for d in docs[30:50]], [d.id for d in docs[50:60]]


def test_the_graph_built_through_kafka_holds_each_document_s_facts_exactly(pipeline_settings):
    s = with_graph(pipeline_settings)
    docs = squad_documents(300)
    updated, deleted, tombstoned = updates_and_deletes(docs)
    produce(s, docs)
    produce(s, [*updated.values(), *(DocumentEnvelope(id=d, op="delete") for d in deleted)], tombstoned)
    pipeline = Pipeline(s)
    pipeline.start()
    try:
        progress = pipeline.wait_idle(timeout_s=900, interval_s=0.5)
    finally:
        pipeline.stop()
    assert progress.graph is not None
    left = final_documents(docs, updated, {*deleted, *tombstoned})
    expected_mentions, expected_relations = expected_graph(s, left)
    mentions, relations = stored_graph(s)
    assert sum(expected_mentions.values()) > 2000 and len(expected_relations) > 2000  # a real graph
    assert mentions == expected_mentions
    assert relations == expected_relations
    keys = {key for _, key, *_ in mentions}
    assert {"marie curie", "albert einstein", "vienna"} <= keys
    # `riverbed stats` counts the graph from its stores' rows, and the graph's group has no lag
    graph = index_stats(s)["graph"]
    assert graph["documents"] == len(left) and graph["mentions"] == sum(expected_mentions.values())
    assert graph["lag"] == 0
    # the text index was built beside it, by its own group
    assert committed_offsets(s.kafka.bootstrap_servers, s.consumer_group) == progress.committed


def test_killing_the_extractor_and_a_graph_shard_mid_stream_loses_and_duplicates_nothing(pipeline_settings):
    s = with_graph(pipeline_settings, poll_max_records=32)  # batches small enough to kill between
    side = s.graph_side()
    docs = squad_documents(300, prefix="k-")
    produce(s, docs)
    pipeline = Pipeline(s)
    pipeline.start()
    try:  # the extractor is the graph side's embedder 0
        kill_mid_stream(pipeline, s, side.index.name, side.consumer_group, len(docs))
    finally:
        pipeline.stop()
    expected_mentions, expected_relations = expected_graph(s, docs)
    mentions, relations = stored_graph(s)
    assert mentions == expected_mentions
    assert relations == expected_relations


def ingest(s: Settings) -> None:
    pipeline = Pipeline(s)
    pipeline.start()
    try:
        pipeline.wait_idle(timeout_s=600, interval_s=0.5)
    finally:
        pipeline.stop()


def test_a_graph_shard_that_lost_its_store_refuses_to_answer_until_the_graph_is_reset(pipeline_settings):
    """The graph's group committed every record; shard 1's directory is then lost. Restarted, that
    shard neither serves nor writes (as a vector shard would not), and says why; shard 0 serves.
    `riverbed graph reset` then forgets the graph (group, actors, stores) and leaves the text
    index's group alone; the next ingest builds the whole graph again from the topic."""
    s = with_graph(pipeline_settings)
    side = s.graph_side()
    docs = squad_documents(30, prefix="l-")
    produce(s, docs)
    ingest(s)
    assert release_shards(side) == side.index.n_shards
    for i in range(side.index.n_shards):  # gone when it returns: the next open makes new ones
        with pytest.raises(ValueError):
            ray.get_actor(actor_name(side.index.name, "shard", i), namespace=side.ray.namespace)
    shutil.rmtree(shard_directory(side.data_dir, 1))
    shards = open_graph_shards(s)  # the model read from shard 0's store
    with pytest.raises(IndexUnavailableError, match="holds no store"):
        ray.get(shards[1].known.remote(["x"]))
    assert ray.get(shards[0].stats.remote())["chunks"] > 0

    text_offsets = committed_offsets(s.kafka.bootstrap_servers, s.consumer_group)
    assert committed_offsets(s.kafka.bootstrap_servers, side.consumer_group) == text_offsets
    done = reset_graph(s)
    assert done["group"] == "deleted" and done["actors_stopped"] == side.index.n_shards, done
    assert not side.data_dir.exists() and open_graph_shards(s) == []
    assert committed_offsets(s.kafka.bootstrap_servers, side.consumer_group) == {}
    assert committed_offsets(s.kafka.bootstrap_servers, s.consumer_group) == text_offsets
    ingest(s)
    expected_mentions, expected_relations = expected_graph(s, docs)
    mentions, relations = stored_graph(s)
    assert sum(expected_mentions.values()) > 100
    assert mentions == expected_mentions and relations == expected_relations
    assert reset_graph(s)["group"] == "deleted"
    assert reset_graph(s) == {"index": s.index.name, "group": "absent", "actors_stopped": 0, "removed": None}


def test_a_graph_built_by_another_model_refuses_the_start_and_leaves_no_ingest_running(pipeline_settings):
    """The text side's embedder and sources start beside the graph's extractor; when the extractor
    then says that the graph's stores were built by another model, the start is refused with the
    way out, and every actor it started (text, graph) is stopped: a later start is not told that an
    ingest is running."""
    import time

    from actors.graph_store import GraphStore
    from cluster.pipeline import GraphModelChangedError, live_ingest_actors, running_source

    s = with_graph(pipeline_settings)
    side = s.graph_side()
    directory = shard_directory(side.data_dir, 0)
    directory.mkdir(parents=True)
    GraphStore(directory, "spacy/another_pipeline 0.0 (extraction 1)").close()
    produce(s, squad_documents(5, prefix="m-"))
    pipeline = Pipeline(s)
    with pytest.raises(GraphModelChangedError, match=r"was built by 'spacy/another_pipeline.*graph reset"):
        pipeline.start()
    deadline = time.monotonic() + 20  # a killed actor is DEAD a moment later
    while live_ingest_actors(s) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert live_ingest_actors(s) == [] and running_source(s) is None
