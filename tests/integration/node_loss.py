"""Run by ``test_pipeline_faults.py`` in a process of its own (the test session's Ray cannot be
replaced in-process): a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``), the
real pipeline and model, and the loss of the worker node that holds a shard and the embedder,
mid-ingest. A fresh node then joins (as a Kubernetes or autoscaler replacement would).

Prints one JSON line: where the actors were, how far ingest had got when the node went, and the
stores' contents afterwards.

``--lose-disk``: the lost node's disk goes with it (the index's data directory is deleted as the
node goes), which only a backend keeping nothing on the node survives (Milvus by URI). Then a
second node is lost while queries run, and every answer must be complete or an error: never a
partial result.
"""

from __future__ import annotations

import json
import os
import shutil
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
    lose_disk = "--lose-disk" in sys.argv[3:]
    # The head can hold the light actors but not the embedder (2 CPUs): it goes to the worker,
    # which keeps room for a shard (a shard waits for room on its node rather than go elsewhere).
    # --lose-disk: a head with no CPUs, so that every actor (shards included) runs on the worker.
    head_cpus = 0 if lose_disk else 1
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": head_cpus, "object_store_memory": 100 << 20}
    )
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
        if lose_disk:
            shutil.rmtree(settings.data_dir)
        replacement = cluster.add_node(num_cpus=3, object_store_memory=100 << 20)
        pipeline.wait_idle(timeout_s=600, interval_s=0.5)
        stats = ray.get([s.stats.remote() for s in shards])
        pipeline.stop()
        if lose_disk:
            out["query_loss"] = lose_a_node_mid_query(settings, cluster, replacement)
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


def lose_a_node_mid_query(settings, cluster, node) -> dict:
    """Queries all shards in a loop while the node holding a shard is lost (and its disk with it):
    every answer must be the full one, or an error naming the shard; never fewer hits."""
    import asyncio

    import numpy as np
    import ray

    from deployments.retriever import RayShards
    from deployments.searcher import Searcher
    from schemas.errors import IndexUnavailableError
    from schemas.topology import actor_name

    shards = [ray.get_actor(actor_name(settings.index.name, "shard", i), namespace=settings.ray.namespace)
              for i in range(settings.index.n_shards)]  # fmt: skip
    on_node = [ray.get(s.node.remote()) == node.node_id for s in shards]
    vectors = np.random.default_rng(0).standard_normal((4, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    searcher = Searcher(settings.serve.search, RayShards(settings))

    def ask() -> list[list[str]] | str:
        try:
            ranked = asyncio.run(searcher.search_many(["q"] * 4, vectors, 10, None, "vector"))
        except IndexUnavailableError as exc:
            return f"unavailable: {exc}"
        return [[r.hit.chunk_id for r in hits] for hits in ranked]

    full = ask()
    answers: list = []
    start = time.monotonic()
    removed_at: int | None = None
    while time.monotonic() - start < 60:
        answers.append(ask())
        if removed_at is None and time.monotonic() - start > 2:
            cluster.remove_node(node, allow_graceful=False)
            shutil.rmtree(settings.data_dir, ignore_errors=True)
            cluster.add_node(num_cpus=3, object_store_memory=100 << 20)
            removed_at = len(answers)
        if removed_at is not None and answers[-1] == full and len(answers) > removed_at + 20:
            break
    return {
        "shards_on_node": on_node,
        "shards_moved": [ray.get(s.node.remote()) != node.node_id for s in shards],
        "answers_after_loss": 0 if removed_at is None else len(answers) - removed_at,
        "answers": len(answers),
        "full": sum(a == full for a in answers),
        "unavailable": sum(isinstance(a, str) for a in answers),
        "partial": [a for a in answers if not isinstance(a, str) and a != full][:3],
        "last_is_full": answers[-1] == full,
    }


if __name__ == "__main__":
    main()
