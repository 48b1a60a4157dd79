"""`riverbed index copy --from A --to B [--set index.backend=milvus]`: an index copied to another
name (and, with ``--set``, another backend or backend setting), without re-embedding and without
replaying the topic.

What is copied, shard by shard (shard ``i`` of A to shard ``i`` of B: the shard count is kept, so
every chunk and document row stays where the routing puts it):

1. every chunk (vector, text, title, span, metadata, alignment), in pages read with
   ``scan_chunks`` and written as upserts;
2. every document's ledger entry (``scan_documents``): its row and the version last applied, so
   an older change arriving after the copy is refused as it would have been by A;
3. the shard's applied offsets, last: a copy stopped half way holds no offsets, so it can never
   pass for complete (copy again into a new name);
4. the consumer group's committed offsets, from ``riverbed.A`` to ``riverbed.B``: an ingest of B
   starts where A's stopped.

Both indexes' shard actors do the reading and writing (a store held by its process, like Milvus
Lite's, is reached through it). A's ingest must not run while it is copied, and B must hold
nothing yet: both are checked first, and refused naming what to do. Afterwards each shard of B
must hold as many chunks and document rows as the same shard of A, or the copy fails.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.vector_index import ShardWrite
from cluster.kafka_admin import bootstrap_servers, committed_offsets
from cluster.pipeline import running_source, shard_handles
from cluster.serving import recorded_model
from schemas.errors import ConfigError
from schemas.settings import Settings
from schemas.topology import Offsets

log = logging.getLogger(__name__)

CALL_TIMEOUT_S = 300.0


@dataclass
class CopyReport:
    source: str
    target: str
    backend: str
    chunks: list[int] = field(default_factory=list)
    documents: list[int] = field(default_factory=list)
    group_offsets: Offsets = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "from": self.source,
            "to": self.target,
            "backend": self.backend,
            "chunks": sum(self.chunks),
            "chunks_per_shard": {str(i): n for i, n in enumerate(self.chunks)},
            "documents": sum(self.documents),
            "committed_offsets": {
                t: {str(p): o for p, o in ps.items()} for t, ps in self.group_offsets.items()
            },
            "seconds": round(self.seconds, 2),
        }


def copy_index(
    source: Settings, target: Settings, *, page: int = 500, on_progress: Callable[[str], None] | None = None
) -> CopyReport:
    """Copies index ``source.index.name`` into ``target.index.name`` (see the module doc)."""
    t0 = time.monotonic()
    say = on_progress or (lambda _: None)
    a, b = source.index, target.index
    if a.name == b.name:
        raise ConfigError(f"--from and --to name the same index {a.name!r}")
    if a.n_shards != b.n_shards:
        raise ConfigError(
            f"index copy keeps the shard count: {a.name!r} has {a.n_shards} shards and the target asks for "
            f"{b.n_shards} (index.n_shards); resharding is not supported"
        )
    servers = bootstrap_servers(source)
    if running_source(source) is not None:
        raise ConfigError(f"an ingest is running for index {a.name!r}: stop it before copying the index")
    recorded = recorded_model(source)
    if recorded is None:
        raise ConfigError(f"index {a.name!r} holds no data under {source.data_dir}: nothing to copy")
    if recorded_model(target) is not None:
        raise ConfigError(f"index {b.name!r} already holds data: copy into a new index name")
    group_offsets = committed_offsets(servers, source.consumer_group)
    if committed_offsets(servers, target.consumer_group):
        raise ConfigError(
            f"consumer group {target.consumer_group!r} already has committed offsets: copy into a new "
            "index name"
        )
    model, dim = recorded
    sources, targets = shard_handles(source, model, dim), shard_handles(target, model, dim)
    report = CopyReport(a.name, b.name, b.backend)
    for shard, (src, dst) in enumerate(zip(sources, targets, strict=True)):
        chunks = _copy_pages(
            src.scan_chunks, lambda p: ShardWrite(upserts=p), dst, page, lambda r: r.chunk_id
        )
        say(f"shard {shard}: {chunks} chunks")
        documents = _copy_pages(
            src.scan_documents,
            lambda p: ShardWrite(
                documents={e.document_id: e.row for e in p if e.row is not None},
                versions={e.document_id: e.version for e in p if e.version is not None},
            ),
            dst,
            page * 10,
            lambda e: e.document_id,
        )
        ray.get(dst.apply.remote(ShardWrite(offsets=ray.get(src.offsets.remote()))), timeout=CALL_TIMEOUT_S)
        say(f"shard {shard}: {documents} documents, offsets")
        report.chunks.append(chunks)
    _check_same(sources, targets, report)
    _commit_group_offsets(servers, target.consumer_group, group_offsets)
    report.group_offsets = group_offsets
    ray.get([dst.snapshot.remote() for dst in targets], timeout=CALL_TIMEOUT_S)
    report.seconds = time.monotonic() - t0
    return report


def _copy_pages(scan: Any, to_write: Callable[[list[Any]], ShardWrite], dst: Any, page: int,
                key: Callable[[Any], str]) -> int:  # fmt: skip
    """Reads ``scan`` page by page and applies each page to ``dst``; returns the items copied. The
    next page is read while the last is written."""
    after, copied, pending = "", 0, None
    while True:
        items = ray.get(scan.remote(after, page), timeout=CALL_TIMEOUT_S)
        if pending is not None:
            ray.get(pending, timeout=CALL_TIMEOUT_S)
        if not items:
            return copied
        pending = dst.apply.remote(to_write(items))
        copied += len(items)
        after = key(items[-1])


def _check_same(sources: list[Any], targets: list[Any], report: CopyReport) -> None:
    """Each target shard must hold what its source shard holds."""
    src_stats = ray.get([s.stats.remote() for s in sources], timeout=CALL_TIMEOUT_S)
    dst_stats = ray.get([t.stats.remote() for t in targets], timeout=CALL_TIMEOUT_S)
    for shard, (s, t) in enumerate(zip(src_stats, dst_stats, strict=True)):
        for figure in ("chunks", "documents", "offsets"):
            if s[figure] != t[figure]:
                raise ConfigError(
                    f"copy of shard {shard} is incomplete: {figure} {t[figure]} in {report.target!r}, "
                    f"{s[figure]} in {report.source!r}"
                )
        if t["vectors"] != t["chunks"]:
            raise ConfigError(
                f"shard {shard} of {report.target!r}: {t['vectors']} vectors for {t['chunks']} chunks"
            )
    report.documents = [int(t["documents"]) for t in dst_stats]


def _commit_group_offsets(servers: str, group: str, offsets: Offsets) -> None:
    """Sets the (empty) group's committed offsets; raises naming any partition the broker refused."""
    from kafka import KafkaAdminClient, TopicPartition
    from kafka.errors import NoError
    from kafka.structs import OffsetAndMetadata

    if not offsets:
        return
    wanted = {
        TopicPartition(topic, partition): OffsetAndMetadata(offset, "", -1)
        for topic, parts in offsets.items()
        for partition, offset in parts.items()
    }
    admin = KafkaAdminClient(bootstrap_servers=servers, client_id="riverbed-admin")
    try:
        results = admin.alter_group_offsets(group, wanted)
    finally:
        admin.close()
    failed = {
        f"{tp.topic}[{tp.partition}]": err.__name__ for tp, err in results.items() if err is not NoError
    }
    if failed:
        raise ConfigError(f"committing offsets of group {group!r} failed: {failed}")
