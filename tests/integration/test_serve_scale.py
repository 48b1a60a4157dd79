"""Scale-out of the query path: on a two-node Ray cluster, Serve adds a retriever replica under
load (autoscaling on ongoing requests), places it on the other node, and requests reach both
(each replica's process used CPU while the load ran, as the OS counts it). One machine cannot
serve more queries this way; what this shows is that the app routes and scales."""

from __future__ import annotations

import json
import subprocess
import sys

from schemas.settings import Settings
from tests.integration.conftest import REPO, free_port


def test_the_retriever_scales_out_to_a_second_node_under_load(pipeline_settings: Settings):
    overrides = pipeline_settings.model_dump(mode="json")
    overrides["embed"]["num_cpus"] = 1
    overrides["serve"].update(
        port=free_port(),
        ingest=False,
        retriever={"num_replicas": "auto", "min_replicas": 1, "max_replicas": 2, "num_cpus": 1.5,
                   "target_ongoing_requests": 1, "upscale_delay_s": 1, "max_ongoing_requests": 32},
    )  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "tests.integration.serve_scale", json.dumps(overrides)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (exit {result.returncode}):\n{result.stderr[-4000:]}"
    out = json.loads(lines[-1])
    assert result.returncode == 0, result.stderr[-4000:]
    assert out["nodes"] == 2 and out["first_replicas"] == 1, out
    replicas = out["replicas"]
    assert len(replicas) == 2 and len({r["node"] for r in replicas}) == 2, out  # one on each node
    assert all(r["cpu_s"] > 0.5 for r in replicas), out  # both answered searches in the window
    assert out["statuses"].get("200", 0) > 0 and set(out["statuses"]) == {"200"}, out  # no errors
