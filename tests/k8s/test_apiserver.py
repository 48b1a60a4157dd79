"""The manifests against a real kube-apiserver with the vendored CRDs: every overlay, for the
defaults and for a config that changes sizes, topics and names, is accepted by a server-side dry
run (built-in kinds, CRD schemas, CEL rules, defaulting, strict field validation); what the
offline checks refuse, the server refuses too, and what only one side knows is named."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from cluster.k8s_render import OVERLAYS, backfill, render
from cluster.k8s_validate import custom_resource_problems, manifest_problems
from schemas.settings import load_settings
from tests.k8s.control_plane import REPO, ControlPlane

CONFIG = load_settings(
    overrides={
        "index": {"name": "news", "n_shards": 4},
        "kafka": {"topics": {"documents": "news.docs", "documents_partitions": 12}},
        "k8s": {
            "name": "news-search",
            "workers": {"min_replicas": 2, "max_replicas": 6, "cpus": 8, "memory": "32Gi"},
            "gpu_workers": {"min_replicas": 1, "max_replicas": 2},
        },
    }
)


def dry_run(plane: ControlPlane, namespace: str, docs: list[dict[str, Any]]) -> Any:
    return plane.kubectl(
        "apply", "-n", namespace, "--dry-run=server", "-f", "-", stdin=yaml.safe_dump_all(docs), check=False
    )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_kustomize_tree_is_accepted_by_the_api_server(control_plane, namespace, overlay):
    built = control_plane.kubectl("kustomize", str(REPO / "k8s" / "overlays" / overlay)).stdout
    docs = [d for d in yaml.safe_load_all(built) if d]
    for doc in docs:  # the tree names its namespace (riverbed); each test has its own
        doc["metadata"]["namespace"] = namespace
    done = dry_run(control_plane, namespace, docs)
    assert done.returncode == 0, done.stderr
    accepted = {line.split()[0] for line in done.stdout.splitlines() if "(server dry run)" in line}
    assert len(accepted) == len(docs) == 8, done.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_config_with_other_names_and_sizes_renders_what_the_api_server_accepts(
    control_plane, namespace, overlay
):
    docs = render(CONFIG, overlay, namespace)
    done = dry_run(control_plane, namespace, docs)
    assert done.returncode == 0, done.stderr
    assert "rayservice.ray.io/news-search created (server dry run)" in done.stdout
    assert "kafkatopic.kafka.strimzi.io/news-search-documents created (server dry run)" in done.stdout


def test_the_milvus_standalone_is_accepted_by_the_api_server(control_plane, namespace):
    settings = CONFIG.model_copy(update={"index": CONFIG.index.model_copy(update={"backend": "milvus"})})
    done = dry_run(control_plane, namespace, render(settings, "cpu", namespace))
    assert done.returncode == 0, done.stderr
    assert "statefulset.apps/news-search-milvus created (server dry run)" in done.stdout
    assert "service/news-search-milvus created (server dry run)" in done.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_backfill_job_is_accepted_by_the_api_server(control_plane, namespace, overlay):
    done = dry_run(control_plane, namespace, backfill(CONFIG, overlay, namespace))
    assert done.returncode == 0, done.stderr
    assert "rayjob.ray.io/news-search-backfill created (server dry run)" in done.stdout


def _rayservice(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == "RayService")


def _head_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _rayservice(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _typo(docs):
    _head_container(docs)["imagePullPolicyy"] = "Always"


def _int_param(docs):
    _rayservice(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0


def _string_partitions(docs):
    next(d for d in docs if d["kind"] == "KafkaTopic")["spec"]["partitions"] = "twelve"


def _config_map_typo(docs):
    next(d for d in docs if d["kind"] == "ConfigMap")["dta"] = {"riverbed.yaml": ""}


def _claim_mode(docs):
    next(d for d in docs if d["kind"] == "PersistentVolumeClaim")["spec"]["accessModes"] = "ReadWriteMany"


# Each: what it breaks, and a word both refusals must name.
SCHEMA_BREAKS: dict[str, tuple[Callable[[list[dict[str, Any]]], None], str]] = {
    "an unknown field": (_typo, "imagePullPolicyy"),
    "a start parameter that is not a string": (_int_param, "num-cpus"),
    "a partition count that is not an integer": (_string_partitions, "partitions"),
    "an unknown field in a built-in kind": (_config_map_typo, "dta"),
    "a list given as a string in a built-in kind": (_claim_mode, "accessModes"),
}


@pytest.mark.parametrize("what", SCHEMA_BREAKS)
def test_what_the_offline_checks_refuse_the_api_server_refuses(control_plane, namespace, what):
    breaks, word = SCHEMA_BREAKS[what]
    docs = render(CONFIG, "cpu", namespace)
    broken = copy.deepcopy(docs)
    breaks(broken)
    changed = [b for b, d in zip(broken, docs, strict=True) if b != d]
    offline = [p for doc in changed for p in manifest_problems(doc)]
    assert offline and all(word in p for p in offline), offline
    done = dry_run(control_plane, namespace, changed)
    assert done.returncode != 0 and word in done.stderr, done.stderr


def test_a_cel_rule_only_the_server_checks_and_a_name_limit_only_the_operator_has(control_plane, namespace):
    docs = [copy.deepcopy(_rayservice(render(CONFIG, "cpu", namespace)))]
    docs[0]["spec"]["rayClusterConfig"]["managedBy"] = "someone-else"
    assert custom_resource_problems(docs[0]) == []  # CEL is not JSON Schema
    done = dry_run(control_plane, namespace, docs)
    assert done.returncode != 0 and "managedBy field value must be either" in done.stderr, done.stderr

    long = copy.deepcopy(_rayservice(render(CONFIG, "cpu", namespace)))
    long["metadata"]["name"] = "n" * 48
    assert custom_resource_problems(long) == [
        f"metadata.name {'n' * 48!r}: 48 characters; KubeRay takes at most 47 for a RayService"
    ]
    done = dry_run(control_plane, namespace, [long])
    assert done.returncode == 0, done.stderr  # the server takes it; the operator would not
