"""`riverbed stats`: what an index holds, read from the shard stores and the broker directly, so it
works when nothing else is running (no Ray, no serving app)."""

from __future__ import annotations

from typing import Any

from actors.dead_letters import read_dead_letter_counts
from actors.shard_store import DB_NAME, ShardStore
from cluster.kafka_admin import bootstrap_servers, committed_offsets, end_offsets
from schemas.settings import Settings
from schemas.topology import lag


def index_stats(settings: Settings, *, broker: bool = True) -> dict[str, Any]:
    """``{"documents", "chunks", "chunks_per_shard", "dead_letters", "committed_offsets", ...}``.

    ``documents`` counts distinct live document ids (each has one row, on its registry shard).
    Broker figures need a running broker (the embedded one is started if it is not running)."""
    shard_dirs = sorted(settings.data_dir.glob("shard-*"))
    documents = 0
    per_shard: dict[str, int] = {}
    for directory in shard_dirs:
        if not (directory / DB_NAME).exists():
            continue
        store = ShardStore.read_only(directory)
        try:
            per_shard[directory.name.removeprefix("shard-").lstrip("0") or "0"] = store.count()
            documents += store.document_count()  # rows on each id's registry shard: each id once
        finally:
            store.close()
    out: dict[str, Any] = {
        "index": settings.index.name,
        "documents": documents,
        "chunks": sum(per_shard.values()),
        "chunks_per_shard": per_shard,
        "dead_letters": {"total": 0, "by_reason": {}},
        "committed_offsets": {},
    }
    if broker:
        servers = bootstrap_servers(settings)
        topics = settings.kafka.topics
        by_reason = read_dead_letter_counts(servers, topics.dead_letter)
        out["dead_letters"] = {"total": sum(by_reason.values()), "by_reason": by_reason}
        committed = committed_offsets(servers, settings.consumer_group)
        out["committed_offsets"] = {
            t: {str(p): o for p, o in parts.items()} for t, parts in committed.items()
        }
        ends = end_offsets(servers, [topics.documents])
        out["lag"] = lag(ends, committed)
    return out
