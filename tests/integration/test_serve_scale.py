"""Scale-out of the query path: on a two-node Ray cluster, Serve adds an ingress replica (which
embeds and searches in its own process: ``serve.search_in_ingress``, the default) under load
(autoscaling on ongoing requests), places it on the other node, and requests reach both (each
replica's process used CPU while the load ran, as the OS counts it). One machine cannot serve
more queries this way; what this shows is that the app routes and scales."""

from __future__ import annotations

import json

from schemas.settings import Settings
from tests.integration.conftest import free_port, run_cluster_script


def test_the_query_path_scales_out_to_a_second_node_under_load(pipeline_settings: Settings):
    overrides = pipeline_settings.model_dump(mode="json")
    overrides["embed"]["num_cpus"] = 1
    overrides["serve"].update(
        port=free_port(),
        ingest=False,
        # 1.2 + the retriever's 0.3 CPUs a replica: one fits on a node of 2 CPUs, not two
        ingress={"num_replicas": "auto", "min_replicas": 1, "max_replicas": 2, "num_cpus": 1.2,
                 "target_ongoing_requests": 1, "upscale_delay_s": 1, "max_ongoing_requests": 32},
        retriever={"num_cpus": 0.3},
    )  # fmt: skip
    out = run_cluster_script("tests.integration.serve_scale", json.dumps(overrides))
    assert out["nodes"] == 2 and out["first_replicas"] == 1, out
    replicas = out["replicas"]
    assert len(replicas) == 2 and len({r["node"] for r in replicas}) == 2, out  # one on each node
    assert all(r["cpu_s"] > 0.5 for r in replicas), out  # both answered searches in the window
    assert out["statuses"].get("200", 0) > 0 and set(out["statuses"]) == {"200"}, out  # no errors
