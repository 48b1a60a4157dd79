"""The offline manifest checks (cluster/k8s_validate.py) against the vendored CRDs: a valid
RayService, RayJob and Strimzi Kafka, KafkaNodePool and KafkaTopic pass, and each kind of mistake
is named with its field path."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from cluster.k8s_validate import APP_BUILDER, crd_schemas, custom_resource_problems, serve_config_problems

SERVE_CONFIG = {
    "applications": [
        {
            "name": "riverbed",
            "import_path": APP_BUILDER,
            "route_prefix": "/",
            "args": {"index": {"name": "docs", "n_shards": 2}, "kafka": {"bootstrap_servers": "k:9092"}},
        }
    ]
}
CONTAINER = {"name": "ray-head", "image": "riverbed:1", "resources": {"limits": {"cpu": "2"}}}
RAYSERVICE: dict[str, Any] = {
    "apiVersion": "ray.io/v1",
    "kind": "RayService",
    "metadata": {"name": "riverbed"},
    "spec": {
        "serveConfigV2": yaml.safe_dump(SERVE_CONFIG),
        "rayClusterConfig": {
            "rayVersion": "2.60.0",
            "headGroupSpec": {
                "rayStartParams": {"num-cpus": "0"},
                "template": {"spec": {"containers": [CONTAINER]}},
            },
            "workerGroupSpecs": [
                {
                    "groupName": "cpu",
                    "replicas": 1,
                    "minReplicas": 1,
                    "maxReplicas": 4,
                    "rayStartParams": {},
                    "template": {"spec": {"containers": [{**CONTAINER, "name": "ray-worker"}]}},
                }
            ],
        },
    },
}
TOPIC = {
    "apiVersion": "kafka.strimzi.io/v1",
    "kind": "KafkaTopic",
    "metadata": {"name": "riverbed-documents", "labels": {"strimzi.io/cluster": "riverbed"}},
    "spec": {
        "topicName": "riverbed.documents",
        "partitions": 8,
        "replicas": 1,
        "config": {"max.message.bytes": 1048576},
    },
}


def changed(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of ``doc`` with the dotted ``path`` set to ``value`` (list indexes as numbers)."""
    out = copy.deepcopy(doc)
    *parents, last = path.split(".")
    node: Any = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[last] = value
    return out


def test_every_served_version_of_each_vendored_crd_loads():
    kinds = set(crd_schemas())
    assert {("ray.io/v1", k) for k in ("RayService", "RayJob", "RayCluster")} <= kinds
    assert {("kafka.strimzi.io/v1", k) for k in ("Kafka", "KafkaNodePool", "KafkaTopic")} <= kinds


def test_a_valid_rayservice_and_topic_pass():
    assert custom_resource_problems(RAYSERVICE) == []
    assert serve_config_problems(RAYSERVICE) == []
    assert custom_resource_problems(TOPIC) == []


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        ("spec.rayClusterConfig.headGroupSpec.rayStartParams", {"num-cpus": 0}, "num-cpus"),
        ("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.imagePullPolicyy", "Always",
         "imagePullPolicyy"),
        ("spec.rayClusterConfig.workerGroupSpecs.0.replicas", "three", "replicas"),
        ("spec.serveConfigV2", SERVE_CONFIG, "serveConfigV2"),
        ("metadata.name", "riverbed-" + "x" * 40, "at most 47"),
        ("metadata.name", "Riverbed", "DNS-1035"),
    ],
)  # fmt: skip
def test_each_mistake_in_a_rayservice_is_named(path, value, named):
    problems = custom_resource_problems(changed(RAYSERVICE, path, value))
    assert any(named in p for p in problems), problems


@pytest.mark.parametrize(("path", "value"), [("spec.partitons", 3), ("spec.replicas", "3")])
def test_a_misspelled_or_mistyped_topic_field_is_refused(path, value):
    problems = custom_resource_problems(changed(TOPIC, path, value))
    assert len(problems) == 1 and path.rsplit(".", 1)[-1] in problems[0], problems


def test_the_serve_config_is_checked_by_serve_and_its_args_by_riverbed_settings():
    bad_args = copy.deepcopy(SERVE_CONFIG)
    bad_args["applications"][0]["args"]["index"]["n_shard"] = 3
    problems = serve_config_problems(changed(RAYSERVICE, "spec.serveConfigV2", yaml.safe_dump(bad_args)))
    assert len(problems) == 1 and "index.n_shard" in problems[0], problems
    no_import = copy.deepcopy(SERVE_CONFIG)
    del no_import["applications"][0]["import_path"]
    problems = serve_config_problems(changed(RAYSERVICE, "spec.serveConfigV2", yaml.safe_dump(no_import)))
    assert len(problems) == 1 and "import_path" in problems[0], problems
    problems = serve_config_problems(changed(RAYSERVICE, "spec.serveConfigV2", "applications: [unclosed"))
    assert problems and "not YAML" in problems[0]


def test_a_kind_no_vendored_crd_defines_is_named():
    problems = custom_resource_problems(
        {"apiVersion": "ray.io/v9", "kind": "RayService", "metadata": {"name": "a"}}
    )
    assert problems == [problems[0]] and "no vendored CRD" in problems[0]


def test_built_in_kinds_are_checked_strictly_by_kubernetes_own_schemas():
    from cluster.k8s_validate import manifest_problems

    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}}
    assert manifest_problems(config_map) == []
    assert manifest_problems({**config_map, "dta": {"a": "b"}}) == [
        "(top): Additional properties are not allowed ('dta' was unexpected)"
    ]
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "d"},
        "spec": {"accessModes": "ReadWriteMany", "resources": {"requests": {"storage": "1Gi"}}},
    }
    assert manifest_problems(claim) == ["spec.accessModes: 'ReadWriteMany' is not of type 'array', 'null'"]
    unknown = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    (problem,) = manifest_problems(unknown)
    assert "Widget" in problem and "example.com/v1" in problem
