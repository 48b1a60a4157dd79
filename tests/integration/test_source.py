"""The documents source in this process against the real broker (no Ray): in-process embedder and shards."""

from __future__ import annotations

import threading
import time
import uuid

from actors.source import document_consumer
from actors.testing import HashEmbedder, InMemoryIndex, LocalDownstream
from tests.integration.ingest_helpers import produce, squad_documents


def test_a_source_stuck_outside_the_group_joins_again(settings):
    docs = squad_documents(30)
    produce(settings, docs)
    embedder = HashEmbedder(dim=32)
    shards = [InMemoryIndex(embedder.model_name, embedder.dim) for _ in range(2)]
    source = document_consumer(
        settings.kafka,
        settings.ingest.model_copy(update={"rejoin_after_s": 2.0}),
        settings.chunk,
        settings.embed.model,
        settings.kafka.bootstrap_servers,
        f"g-{uuid.uuid4().hex[:8]}",
        LocalDownstream(embedder, shards),
        name="stuck",
    )
    source.warm_up()
    # The fault seen with kafka-python 3.0: a member that never gets its partitions and reads nothing.
    stuck = source._member._consumer
    stuck.poll = lambda *args, **kwargs: {}
    stuck.assignment = lambda: set()
    runner = threading.Thread(target=source.run, daemon=True)
    runner.start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and sum(len(s.document_ids()) for s in shards) < len(docs):
            time.sleep(0.2)
    finally:
        source.stop()
        runner.join(timeout=60)
    assert source.stats()["rejoins"] == 1
    assert not source._member.started  # closed by run()
    assert set().union(*(s.document_ids() for s in shards)) == {d.id for d in docs}
