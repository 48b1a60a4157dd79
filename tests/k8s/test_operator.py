"""The rendered RayService against the real KubeRay operator: it builds the Ray cluster the
settings describe. No Pod runs here (no kubelet), so what is checked is what the operator makes of
the manifest: the RayCluster, one Pod per wanted replica of each group with the settings' image,
resources and ``ray start`` parameters, the autoscaler, the key from the Secret, the shared data
claim, readiness probes on Serve's proxy (whose tool the image has), and the head Service with
Serve's port."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import yaml

from cluster.k8s_render import SERVE_PORT, backfill, render
from tests.k8s.control_plane import ControlPlane
from tests.k8s.test_apiserver import CONFIG
from tests.unit.test_dockerfile import args_of


def objects(plane: ControlPlane, kind: str, namespace: str) -> list[dict[str, Any]]:
    return json.loads(plane.kubectl("get", kind, "-n", namespace, "-o", "json").stdout)["items"]


def wait_for_pods(plane: ControlPlane, namespace: str, count: int, timeout_s: float = 120) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    pods = objects(plane, "pods", namespace)
    while len(pods) < count and time.monotonic() < deadline:
        time.sleep(1)
        pods = objects(plane, "pods", namespace)
    return pods


def ray_start(pod: dict[str, Any]) -> str:
    return pod["spec"]["containers"][0]["args"][0]


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_the_operator_builds_the_cluster_the_settings_describe(
    control_plane, operator_log, namespace, overlay
):
    k8s = CONFIG.k8s
    docs = render(CONFIG, overlay, namespace)
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(docs))
    groups = {"cpu": k8s.workers} | ({"gpu": k8s.gpu_workers} if overlay == "gpu" else {})
    wanted = 1 + sum(g.min_replicas for g in groups.values())
    pods = wait_for_pods(control_plane, namespace, wanted)
    assert len(pods) == wanted, (pods, control_plane.tail(operator_log))

    (cluster,) = objects(control_plane, "rayclusters", namespace)
    assert cluster["metadata"]["ownerReferences"][0]["name"] == k8s.name
    assert {
        g["groupName"]: (g["minReplicas"], g["maxReplicas"]) for g in cluster["spec"]["workerGroupSpecs"]
    } == {name: (g.min_replicas, g.max_replicas) for name, g in groups.items()}

    by_group: dict[str, list[dict[str, Any]]] = {}
    for pod in pods:
        by_group.setdefault(pod["metadata"]["labels"]["ray.io/group"], []).append(pod)
    assert {name: len(p) for name, p in by_group.items()} == {"headgroup": 1} | {
        name: g.min_replicas for name, g in groups.items()
    }
    for pod in pods:
        ray = pod["spec"]["containers"][0]
        assert ray["image"] == k8s.image
        key = next(e for e in ray["env"] if e["name"] == "RIVERBED_SERVE__AUTH__KEYS")
        assert key["valueFrom"]["secretKeyRef"]["name"] == k8s.api_keys_secret
        claims = {
            v["persistentVolumeClaim"]["claimName"]
            for v in pod["spec"]["volumes"]
            if "persistentVolumeClaim" in v
        }
        assert claims == {f"{k8s.name}-data"}  # the one shared data volume

    (head,) = by_group["headgroup"]
    assert "--num-cpus=0" in ray_start(head).split()  # nothing is scheduled on the head
    assert [c["name"] for c in head["spec"]["containers"]][1:] == ["autoscaler"]
    assert {"name": "RAY_enable_autoscaler_v2", "value": "true"} in head["spec"]["containers"][0]["env"]
    for name, group in groups.items():
        for pod in by_group[name]:
            limits = pod["spec"]["containers"][0]["resources"]["limits"]
            assert limits["cpu"] == str(group.cpus) and f"--num-cpus={group.cpus}" in ray_start(pod).split()
            assert limits.get("nvidia.com/gpu") == (str(group.gpus) if group.gpus else None)

            # The operator's readiness probe asks Serve's proxy on every worker, with wget: the
            # image must have it (the Dockerfile installs it).
            probe = " ".join(pod["spec"]["containers"][0]["readinessProbe"]["exec"]["command"])
            assert f"localhost:{SERVE_PORT}/-/healthz" in probe and probe.split()[2] == "wget"
    assert any("apt-get install" in run and " wget " in run for run in args_of("RUN"))

    services = objects(control_plane, "services", namespace)
    (head_service,) = [s for s in services if s["metadata"]["name"].endswith("-head-svc")]
    assert 8000 in {p["port"] for p in head_service["spec"]["ports"]}  # Serve's HTTP port


def test_the_operator_starts_the_backfill_jobs_own_cluster_reading_the_jobs_settings(
    control_plane, operator_log, namespace
):
    config, job = backfill(CONFIG, "cpu", namespace)
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all([config, job]))
    pods = wait_for_pods(control_plane, namespace, 1 + CONFIG.k8s.workers.min_replicas)
    assert len(pods) == 1 + CONFIG.k8s.workers.min_replicas, control_plane.tail(operator_log)
    (cluster,) = objects(control_plane, "rayclusters", namespace)
    assert cluster["metadata"]["labels"]["ray.io/originated-from-crd"] == "RayJob"
    assert cluster["metadata"]["ownerReferences"][0]["name"] == job["metadata"]["name"]
    for pod in pods:
        maps = {v["configMap"]["name"] for v in pod["spec"]["volumes"] if "configMap" in v}
        assert config["metadata"]["name"] in maps
    (rayjob,) = objects(control_plane, "rayjobs", namespace)
    assert rayjob["spec"]["entrypoint"] == job["spec"]["entrypoint"]


def test_a_changed_image_does_not_start_a_second_cluster_beside_the_first(
    control_plane, operator_log, namespace
):
    """KubeRay's default upgrade would (it does, without the manifest's ``upgradeStrategy``): the
    second cluster's shards could not open the stores the first holds."""
    docs = render(CONFIG, "cpu", namespace)
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(docs))
    wait_for_pods(control_plane, namespace, 1 + CONFIG.k8s.workers.min_replicas)
    (first,) = objects(control_plane, "rayclusters", namespace)
    cluster = docs[-1]["spec"]["rayClusterConfig"]
    for pod in [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]:
        pod["template"]["spec"]["containers"][0]["image"] = "riverbed:0.2.0"
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", stdin=yaml.safe_dump_all(docs))
    time.sleep(10)  # the operator reconciles a changed RayService within a second or two
    names = [c["metadata"]["name"] for c in objects(control_plane, "rayclusters", namespace)]
    assert names == [first["metadata"]["name"]], control_plane.tail(operator_log)
