"""Run by ``test_serve_scale.py`` in a process of its own (the test session's Ray cannot be replaced
in-process): the app on a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``),
the ingress (which embeds and searches) autoscaled on ongoing requests (one replica, at most
two), and a closed-loop load of concurrent searches over HTTP until Serve has added the second
replica; then more load.

Each node has room for one ingress replica (1.5 CPUs with the retriever's on nodes of 2 CPUs:
Ray counts whole CPUs per node), so the second replica lands on the other node. Prints one
JSON line: the replicas (node, pid, and the CPU seconds their process used during the last load
window, read from the OS, which shows that requests reached each), when the second one ran, and
the load's answers by status.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections import Counter

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")

CLIENTS = 16
SCALE_WAIT_S = 240
WINDOW_S = 15


def _replicas() -> list[dict]:
    """The ingress's live replica actors: their node id and pid, read from the GCS's actor table
    (as `riverbed ps` reads it; both nodes share the address 127.0.0.1)."""
    from ray._private.state import state as global_state

    from cluster.ray_actors import _actor_table_data

    table = _actor_table_data()
    found = []
    for raw in global_state._connect_and_get_accessor().get_actor_table(None, None):
        data = table.FromString(raw)
        if data.state == table.ActorState.Value("ALIVE") and data.class_name.endswith(":Ingress"):
            found.append({"node": data.address.node_id.hex(), "pid": int(data.pid)})
    return found


def _cpu_s(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def main() -> None:
    import httpx
    import ray
    from ray.cluster_utils import Cluster

    from cluster.pipeline import Pipeline
    from cluster.serving import start_serving
    from schemas.settings import load_settings
    from tests.integration.ingest_helpers import produce, squad_documents

    settings = load_settings(overrides=json.loads(sys.argv[1]))
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "object_store_memory": 100 << 20})
    cluster.add_node(num_cpus=2, object_store_memory=100 << 20)
    ray.init(address=cluster.address, namespace=settings.ray.namespace, logging_level="WARNING")
    out: dict = {"nodes": len(ray.nodes())}
    serving = None
    try:
        produce(settings, squad_documents(40))
        pipeline = Pipeline(settings)
        pipeline.start()
        pipeline.wait_idle(timeout_s=600, interval_s=0.5)
        pipeline.stop()  # its embedder's CPU goes back: the second ingress replica needs it
        serving = start_serving(settings, ingest=False)
        statuses: Counter[int] = Counter()
        stop = threading.Event()

        def client() -> None:
            with httpx.Client(base_url=serving.url, timeout=60) as http:
                while not stop.is_set():
                    try:
                        r = http.post("/v1/search", json={"query": "Who won Super Bowl 50?", "k": 5})
                        statuses[r.status_code] += 1
                    except httpx.TransportError:
                        statuses[-1] += 1

        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        start = time.monotonic()
        for t in threads:
            t.start()
        out["first_replicas"] = len(_replicas())
        while time.monotonic() - start < SCALE_WAIT_S and len(_replicas()) < 2:
            time.sleep(1)
        out["scaled_after_s"] = round(time.monotonic() - start, 1)
        time.sleep(10)  # the new replica loads its model and joins the routing
        replicas = _replicas()
        before = {r["pid"]: _cpu_s(r["pid"]) for r in replicas}
        time.sleep(WINDOW_S)
        for r in replicas:
            r["cpu_s"] = round(_cpu_s(r["pid"]) - before[r["pid"]], 2)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        out["replicas"] = replicas
        out["statuses"] = {str(k): v for k, v in statuses.items()}
    finally:
        print(json.dumps(out), flush=True)
        if serving is not None:
            serving.stop()
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
