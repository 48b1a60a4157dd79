"""`riverbed stats`: what an index holds, read from each shard's store (through its backend, never
its files) and from the broker, so it works when nothing else is running (no Ray, no serving app).
A store that another process holds (Milvus Lite: one process per data dir) is asked through its
running shard actor instead."""

from __future__ import annotations

from typing import Any

from actors.backends import StoreUnreadableError, backend_for
from actors.dead_letters import read_dead_letter_counts
from actors.graph_store import stored_counts
from cluster.kafka_admin import bootstrap_servers, committed_offsets, end_offsets
from schemas.errors import ConfigError
from schemas.settings import Settings
from schemas.topology import actor_name, lag, shard_directory


def index_stats(settings: Settings, *, broker: bool = True) -> dict[str, Any]:
    """``{"documents", "chunks", "chunks_per_shard", "images", "images_per_shard", "dead_letters",
    "committed_offsets", "lag"}``, and ``graph`` (:func:`graph_counts`, with the graph's consumer
    group's ``lag`` on the documents topic) when the index has a knowledge graph.

    ``documents`` counts distinct live document ids (each has one row, on its registry shard);
    ``images`` distinct live image ids, from the shards of the index beside it that holds them
    (:meth:`~schemas.settings.Settings.image_side`). ``committed_offsets`` and ``lag`` cover both
    consumer groups (the documents topic's and the images topic's). Broker figures need a running
    broker (the embedded one is started if it is not running)."""
    documents, per_shard = _count(settings)
    images, images_per_shard = _count(settings.image_side())
    out: dict[str, Any] = {
        "index": settings.index.name,
        "documents": documents,
        "chunks": sum(per_shard.values()),
        "chunks_per_shard": per_shard,
        "images": images,
        "images_per_shard": images_per_shard,
        "dead_letters": {"total": 0, "by_reason": {}},
        "committed_offsets": {},
    }
    if broker:
        servers = bootstrap_servers(settings)
        topics = settings.kafka.topics
        by_reason = read_dead_letter_counts(servers, topics.dead_letter)
        out["dead_letters"] = {"total": sum(by_reason.values()), "by_reason": by_reason}
        committed = committed_offsets(servers, settings.consumer_group)
        committed.update(committed_offsets(servers, settings.image_side().consumer_group))
        out["committed_offsets"] = {
            t: {str(p): o for p, o in parts.items()} for t, parts in committed.items()
        }
        ends = end_offsets(servers, [topics.documents, topics.images])
        out["lag"] = lag(ends, committed)
    graph = graph_counts(settings)
    if graph is not None:
        if broker:
            graph_committed = committed_offsets(servers, settings.graph_side().consumer_group)
            graph["lag"] = lag({topics.documents: ends.get(topics.documents, {})}, graph_committed)
        out["graph"] = graph
    return out


def graph_counts(settings: Settings) -> dict[str, Any] | None:
    """The knowledge graph's figures from its stores' row counts (None when the index has no
    graph): ``documents`` (each has one registry row), ``mentions`` (each on its entity's shard),
    and per shard the ``chunks`` with facts there and the ``relations`` (an edge is on the shards
    of both its ends, so these are not summed)."""
    side = settings.graph_side()
    per_shard: dict[str, dict[str, int]] = {}
    for shard in range(side.index.n_shards):
        counts = stored_counts(shard_directory(side.data_dir, shard))
        if counts is not None:
            per_shard[str(shard)] = counts
    if not per_shard:
        return None
    return {
        "documents": sum(c["documents"] for c in per_shard.values()),
        "mentions": sum(c["mentions"] for c in per_shard.values()),
        "per_shard": {i: {"chunks": c["chunks"], "relations": c["relations"]} for i, c in per_shard.items()},
    }


def _count(settings: Settings) -> tuple[int, dict[str, int]]:
    """``(distinct ids, records per shard)`` of the index ``settings`` names."""
    ids = 0
    per_shard: dict[str, int] = {}
    for shard in range(settings.index.n_shards):
        figures = shard_figures(settings, shard)
        if figures is not None:
            per_shard[str(shard)] = figures[0]
            ids += figures[1]  # rows on each id's registry shard: each id once
    return ids, per_shard


def shard_figures(settings: Settings, shard: int) -> tuple[int, int] | None:
    """``(chunks, documents)`` of one shard's store, None when it has none yet."""
    try:
        state = backend_for(settings.index).stored_state(
            settings.index,
            shard_directory(settings.data_dir, shard),
            index_name=settings.index.name,
            shard=shard,
        )
    except StoreUnreadableError as exc:
        live = _live_shard_stats(settings, shard)
        if live is None:
            raise ConfigError(f"index {settings.index.name!r}, shard {shard}: {exc}") from exc
        return int(live["chunks"]), int(live["documents"])
    return None if state is None else (state.chunks, state.documents)


def _live_shard_stats(settings: Settings, shard: int) -> dict[str, Any] | None:
    """The running shard actor's own figures, or None when no Ray cluster or no such actor runs."""
    import ray

    from cluster.ray_runtime import connect

    try:
        connect(settings, start=False)
        actor = ray.get_actor(
            actor_name(settings.index.name, "shard", shard), namespace=settings.ray.namespace
        )
    except Exception:  # no cluster to ask, or no such actor: the caller reports the store's error
        return None
    return dict(ray.get(actor.stats.remote(), timeout=60))
