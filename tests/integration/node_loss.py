"""Run by ``test_pipeline_faults.py`` in a process of its own (the test session's Ray cannot be
replaced in-process): a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``), the
real pipeline and model, and the loss of the worker node that holds a shard and the embedder,
mid-ingest. A fresh node then joins (as a Kubernetes or autoscaler replacement would).

Prints one JSON line: where the actors were, how far ingest had got when the node went, and the
stores' contents afterwards.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from cluster.kafka_admin import committed_offsets
    from cluster.pipeline import Pipeline
    from schemas.settings import load_settings
    from schemas.topology import actor_name
    from tests.integration.ingest_helpers import expected_chunks, produce, read_stores, squad_documents

    settings = load_settings(overrides=json.loads(sys.argv[1]))
    n_docs = int(sys.argv[2])
    # The head can hold the light actors but not the embedder (2 CPUs): it goes to the worker,
    # which keeps room for a shard (a shard waits for room on its node rather than go elsewhere).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 << 20})
    worker = cluster.add_node(num_cpus=3, object_store_memory=100 << 20)
    ray.init(address=cluster.address, namespace=settings.ray.namespace, logging_level="WARNING")
    out: dict = {}
    try:
        docs = squad_documents(n_docs)
        produce(settings, docs)
        pipeline = Pipeline(settings)
        pipeline.start()
        shards = [
            ray.get_actor(actor_name(settings.index.name, "shard", i), namespace=settings.ray.namespace)
            for i in (0, 1)
        ]
        embedder = ray.get_actor(
            actor_name(settings.index.name, "embedder", 0), namespace=settings.ray.namespace
        )
        worker_id = worker.node_id
        out["shard_nodes"] = [ray.get(s.node.remote()) == worker_id for s in shards]
        out["embedder_on_worker"] = ray.get(embedder.node.remote()) == worker_id
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            done = sum(sum(p.values()) for p in committed_offsets(
                settings.kafka.bootstrap_servers, settings.consumer_group).values())  # fmt: skip
            if done >= 0.2 * n_docs:
                break
            pipeline.check_alive()
            time.sleep(0.1)
        out["removed_at"] = done / n_docs
        cluster.remove_node(worker, allow_graceful=False)
        cluster.add_node(num_cpus=3, object_store_memory=100 << 20)
        pipeline.wait_idle(timeout_s=600, interval_s=0.5)
        stats = ray.get([s.stats.remote() for s in shards])
        pipeline.stop()
        stored = read_stores(settings)
        expected = expected_chunks(settings, docs)
        out.update(
            per_document_matches=stored.per_document == expected,
            chunks=len(stored.chunks),
            expected_chunks=sum(expected.values()),
            vectors=[s["vectors"] for s in stats],
            store_chunks=[s["chunks"] for s in stats],
        )
    finally:
        print(json.dumps(out), flush=True)
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
