"""`riverbed k8s render` (cluster/k8s_render.py): the manifests for a config pass the offline checks
in both overlays, take topics, sizes and the app's settings from that config, and never carry a
key."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cluster.k8s_render import OVERLAYS, apply_gpu_patch, backfill, kustomize_tree, render
from cluster.k8s_validate import (
    custom_resource_problems,
    manifest_problems,
    name_problems,
    serve_config_problems,
)
from schemas.errors import ConfigError
from schemas.settings import Settings, load_settings

KEY = "a-literal-key-" + "z" * 20
SETTINGS = load_settings(
    overrides={
        "index": {"name": "docs", "n_shards": 4},
        "kafka": {
            "topics": {"documents": "news.docs", "documents_partitions": 12},
            "max_record_bytes": 2_000_000,
        },
        "serve": {"auth": {"keys": [{"key": KEY, "scopes": ["read"]}]}},
        "k8s": {
            "name": "news",
            "workers": {"min_replicas": 2, "max_replicas": 6, "cpus": 8, "memory": "32Gi"},
        },
    }
)


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_manifest_passes_its_schema_the_crds_or_kubernetes_own(overlay):
    docs = render(SETTINGS, overlay) + backfill(SETTINGS, overlay)
    assert {d["kind"] for d in docs} >= {"ConfigMap", "PersistentVolumeClaim", "RayService", "RayJob"}
    for doc in docs:
        assert manifest_problems(doc) == [], (doc["kind"], doc["metadata"]["name"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_custom_resource_passes_the_crds_and_the_serve_config_passes_serve_and_settings(overlay):
    docs = render(SETTINGS, overlay)
    customs = [d for d in docs if "/" in d["apiVersion"] and d["apiVersion"] != "v1"]
    assert {d["kind"] for d in customs} == {"Kafka", "KafkaNodePool", "KafkaTopic", "RayService"}
    for doc in customs:
        assert custom_resource_problems(doc) == [], doc["metadata"]["name"]
    assert serve_config_problems(by_kind(docs, "RayService")[0]) == []


def test_topics_are_the_settings_topics():
    topics = {
        d["spec"]["topicName"]: (d["spec"]["partitions"], d["spec"]["config"]["max.message.bytes"])
        for d in by_kind(render(SETTINGS), "KafkaTopic")
    }
    room = 2_000_000 + 1_048_576  # a dead letter is the record plus its headers
    assert topics == {
        "news.docs": (12, room),
        "riverbed.images": (1, room),
        "riverbed.dead-letter": (1, room),
    }


def test_the_app_gets_the_configs_settings_with_the_cluster_broker_and_bind_address():
    service = by_kind(render(SETTINGS), "RayService")[0]
    app, ingest = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    assert app["import_path"] == "deployments.app:app_builder" and app["route_prefix"] == "/"
    assert ingest["import_path"] == "cluster.serve_app:ingest_builder" and ingest["route_prefix"] is None
    assert ingest["args"] == app["args"]
    built = load_settings(overrides=app["args"])
    assert (built.index.name, built.index.n_shards) == ("docs", 4)
    assert built.kafka.topics.documents == "news.docs"
    assert built.kafka.bootstrap_servers == "news-kafka-bootstrap:9092"
    assert (built.serve.host, built.serve.port) == ("0.0.0.0", 8000)
    config_map = by_kind(render(SETTINGS), "ConfigMap")[0]
    assert yaml.safe_load(config_map["data"]["riverbed.yaml"]) == app["args"]


def test_no_manifest_carries_a_secret_and_the_pods_read_each_from_the_secret():
    token, llm_key = "milvus-token-" + "t" * 20, "llm-key-" + "l" * 20
    settings = load_settings(
        overrides={
            **SETTINGS.model_dump(mode="python", exclude={"serve", "index"}),
            "serve": {"auth": {"keys": [{"key": KEY, "scopes": ["read"]}]},
                      "llm": {"backend": "openai", "base_url": "http://llm:8000/v1", "api_key": llm_key}},
            "index": {"backend": "milvus", "milvus": {"uri": "http://milvus:19530", "token": token}},
        }
    )  # fmt: skip
    docs = render(settings, "gpu") + backfill(settings, "gpu")
    text = json.dumps(docs)
    assert KEY not in text and token not in text and llm_key not in text and "*****" not in text
    args = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["riverbed.yaml"])
    assert args["index"]["milvus"] == {"uri": "http://milvus:19530"} and "api_key" not in args["serve"]["llm"]
    clusters = [
        by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"],
        by_kind(docs, "RayJob")[0]["spec"]["rayClusterSpec"],
    ]
    pods = [c["headGroupSpec"]["template"] for c in clusters] + [
        g["template"] for c in clusters for g in c["workerGroupSpecs"]
    ]
    assert len(pods) == 6
    for pod in pods:
        env = {
            e["name"]: e["valueFrom"]["secretKeyRef"]
            for e in pod["spec"]["containers"][0]["env"]
            if "valueFrom" in e
        }
        assert env == {
            "RIVERBED_SERVE__AUTH__KEYS": {"name": "riverbed-api-keys", "key": "keys"},
            "RIVERBED_INDEX__MILVUS__TOKEN": {
                "name": "riverbed-api-keys",
                "key": "milvus-token",
                "optional": True,
            },
            "RIVERBED_SERVE__LLM__API_KEY": {
                "name": "riverbed-api-keys",
                "key": "llm-api-key",
                "optional": True,
            },
        }


def test_the_pods_settings_fit_the_pods_and_let_prometheus_scrape():
    args = yaml.safe_load(by_kind(render(SETTINGS), "ConfigMap")[0]["data"]["riverbed.yaml"])
    built = load_settings(overrides=args)
    assert built.embed.num_cpus == SETTINGS.k8s.workers.cpus - 1  # not the node's cores
    assert built.serve.auth.metrics == "open"
    head = by_kind(render(SETTINGS), "RayService")[0]["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head["template"]["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
    chosen = load_settings(overrides={"embed": {"num_cpus": 2}, "k8s": {"metrics_open": False}})
    docs = render(chosen)
    args = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["riverbed.yaml"])
    assert args["embed"]["num_cpus"] == 2 and load_settings(overrides=args).serve.auth.metrics == "read"
    head = by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert "metadata" not in head["template"]  # no scrape annotations for a route that needs a key


def test_worker_groups_follow_the_settings_and_gpus_are_requested_as_limited():
    cpu = by_kind(render(SETTINGS, "cpu"), "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert [g["groupName"] for g in cpu] == ["cpu"]
    assert (cpu[0]["minReplicas"], cpu[0]["maxReplicas"]) == (2, 6)
    assert cpu[0]["template"]["spec"]["containers"][0]["resources"]["limits"] == {
        "cpu": "8",
        "memory": "32Gi",
    }
    gpu = by_kind(render(SETTINGS, "gpu"), "RayService")[0]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (group,) = [g for g in gpu if g["groupName"] == "gpu"]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == "1"
    assert group["template"]["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    assert "tolerations" not in cpu[0]["template"]["spec"]


def test_every_pod_mounts_the_one_shared_data_claim_so_a_shard_reopens_its_store_anywhere():
    settings = SETTINGS.model_copy(
        update={"k8s": SETTINGS.k8s.model_copy(update={"storage": "200Gi", "storage_class": "nfs"})}
    )
    docs = render(settings, "gpu")
    (claim,) = by_kind(docs, "PersistentVolumeClaim")
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": "200Gi"}},
        "storageClassName": "nfs",
    }
    cluster = by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    assert len(pods) == 3
    for pod in pods:
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        assert volumes["data"] == {
            "name": "data",
            "persistentVolumeClaim": {"claimName": claim["metadata"]["name"]},
        }
        mounts = {m["name"]: m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
        assert load_settings(overrides=yaml.safe_load(cluster_config(docs))).home == Path(mounts["data"])


def cluster_config(docs):
    return by_kind(docs, "ConfigMap")[0]["data"]["riverbed.yaml"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_backfill_job_builds_the_named_index_on_its_own_cluster_with_the_services_pods(overlay):
    target = SETTINGS.model_copy(update={"index": SETTINGS.index.model_copy(update={"name": "docs-v2"})})
    config, job = backfill(target, overlay)
    assert custom_resource_problems(job) == []
    assert job["metadata"]["name"] == "news-backfill"
    assert job["spec"]["entrypoint"] == "riverbed ingest --alone --until-idle --release --quiet"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    built = load_settings(overrides=yaml.safe_load(config["data"]["riverbed.yaml"]))
    assert (built.index.name, built.ray.address) == ("docs-v2", "auto")  # joins the job's own cluster
    assert built.kafka.bootstrap_servers == "news-kafka-bootstrap:9092"
    service = by_kind(render(SETTINGS, overlay), "RayService")[0]["spec"]["rayClusterConfig"]
    pods = job["spec"]["rayClusterSpec"]
    assert [g["groupName"] for g in pods["workerGroupSpecs"]] == [
        g["groupName"] for g in service["workerGroupSpecs"]
    ]
    volumes = pods["headGroupSpec"]["template"]["spec"]["volumes"]
    assert {"name": "config", "configMap": {"name": config["metadata"]["name"]}} in volumes
    assert volumes == [
        v if v["name"] != "config" else {"name": "config", "configMap": {"name": config["metadata"]["name"]}}
        for v in service["headGroupSpec"]["template"]["spec"]["volumes"]
    ]  # the same data claim as the service's


def test_the_backfill_command_refuses_the_index_the_config_serves(tmp_path, capsys):
    from cluster.cli import main

    config = tmp_path / "riverbed.yaml"
    config.write_text(yaml.safe_dump({"index": {"name": "docs"}}))
    base = ["--config", str(config), "--home", str(tmp_path)]
    for served in ([], ["--index", "docs"], ["--set", "index.name=docs"]):
        assert main([*base, *served, "k8s", "backfill"]) != 0
        assert "other than 'docs', the index the config serves" in capsys.readouterr().err
    assert main([*base, "--index", "docs-v2", "k8s", "backfill", "--json"]) == 0
    job = by_kind(json.loads(capsys.readouterr().out), "RayJob")[0]
    assert job["spec"]["entrypoint"].startswith("riverbed ingest --alone")


def test_the_longest_name_the_settings_take_fits_kuberays_limits_in_every_object():
    longest = "n" * 38
    settings = SETTINGS.model_copy(update={"k8s": SETTINGS.k8s.model_copy(update={"name": longest})})
    for doc in render(settings, "gpu") + backfill(settings, "gpu"):
        assert name_problems(doc) == [], doc["metadata"]["name"]
    with pytest.raises(ConfigError, match=r"k8s\.name"):
        load_settings(overrides={"k8s": {"name": "n" * 39}})


def test_the_milvus_backend_without_a_server_gets_a_milvus_standalone_that_the_settings_name():
    settings = load_settings(overrides={"index": {"backend": "milvus"}, "k8s": {"name": "news"}})
    docs = render(settings, "cpu")
    for doc in docs:
        assert manifest_problems(doc) == [], (doc["kind"], doc["metadata"]["name"])
    (stateful,) = by_kind(docs, "StatefulSet")
    (service,) = [d for d in by_kind(docs, "Service") if d["metadata"]["name"] == "news-milvus"]
    pod = stateful["spec"]["template"]
    assert (
        service["spec"]["selector"]
        == pod["metadata"]["labels"]
        == stateful["spec"]["selector"]["matchLabels"]
    )
    (container,) = pod["spec"]["containers"]
    assert container["image"] == "milvusdb/milvus:v3.0.2" and container["args"] == [
        "milvus",
        "run",
        "standalone",
    ]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert {p["port"] for p in service["spec"]["ports"]} == set(ports.values())
    app = yaml.safe_load(by_kind(docs, "ConfigMap")[0]["data"]["riverbed.yaml"])
    assert load_settings(overrides=app).index.milvus.uri == f"http://news-milvus:{ports['grpc']}"

    served = load_settings(overrides={"index": {"backend": "milvus", "milvus": {"uri": "http://mine:19530"}}})
    assert not by_kind(render(served), "StatefulSet")  # a Milvus of one's own is used as it is
    assert not by_kind(render(load_settings()), "StatefulSet")  # and none with FAISS


def test_every_image_is_pinned_to_a_tag_or_digest():
    settings = load_settings(overrides={"index": {"backend": "milvus"}})
    images = []
    for doc in render(settings, "gpu") + backfill(settings, "gpu"):
        text = json.dumps(doc)
        images += [part.split('"')[0] for part in text.split('"image": "')[1:]]
    assert images and all(("@sha256:" in i or ":" in i.rsplit("/", 1)[-1]) for i in images), images
    assert not [i for i in images if i.endswith(":latest")]


def test_each_builder_the_serve_config_names_is_importable():
    import importlib

    from cluster.k8s_validate import BUILDERS

    for path in BUILDERS:
        module, name = path.split(":")
        assert callable(getattr(importlib.import_module(module), name)), path


def test_an_unknown_overlay_is_refused_by_name():
    with pytest.raises(ValueError, match="overlay must be one of cpu, gpu"):
        render(SETTINGS, "tpu")  # type: ignore[arg-type]


REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def defaults(monkeypatch) -> Settings:
    """The default settings, whatever this process's environment sets."""
    for name in [n for n in os.environ if n.startswith("RIVERBED_")]:
        monkeypatch.delenv(name)
    return load_settings()


def test_the_files_under_k8s_are_what_write_renders_for_the_defaults(defaults):
    tree = kustomize_tree(defaults)
    on_disk = {
        str(p.relative_to(REPO / "k8s")): p.read_text(encoding="utf-8")
        for folder in ("base", "overlays")
        for p in sorted((REPO / "k8s" / folder).rglob("*"))
        if p.is_file()
    }
    stale = sorted(name for name in tree.keys() | on_disk.keys() if tree.get(name) != on_disk.get(name))
    assert not stale, f"k8s/ differs from `riverbed k8s write` in {stale}: run it and commit the result"


def test_the_gpu_overlay_is_the_cpu_base_plus_the_gpu_group(defaults):
    base = [yaml.safe_load(text) for name, text in kustomize_tree(defaults).items()
            if name.startswith("base/") and not name.endswith("kustomization.yaml")]  # fmt: skip
    patch = yaml.safe_load(
        (REPO / "k8s" / "overlays" / "gpu" / "gpu-workers.yaml").read_text(encoding="utf-8")
    )
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(apply_gpu_patch(base, patch), key=key) == sorted(render(defaults, "gpu"), key=key)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed: kustomize not run")
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubectl_kustomize_builds_each_overlay_into_the_render(defaults, overlay):
    built = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "k8s" / "overlays" / overlay)],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(built), key=key) == sorted(render(defaults, overlay), key=key)


@pytest.mark.parametrize(("edge", "haproxy"), [("auto", "0"), ("proxy", "0"), ("haproxy", "1")])
def test_every_ray_pod_starts_with_the_serve_data_plane_of_the_settings(edge: str, haproxy: str):
    settings = load_settings(overrides={**SETTINGS.model_dump(mode="python"), "serve": {
        **SETTINGS.serve.model_dump(mode="python"), "edge": edge}})  # fmt: skip
    docs = render(settings, "cpu") + backfill(settings, "cpu")
    clusters = [
        by_kind(docs, "RayService")[0]["spec"]["rayClusterConfig"],
        by_kind(docs, "RayJob")[0]["spec"]["rayClusterSpec"],
    ]
    pods = [c["headGroupSpec"]["template"] for c in clusters] + [
        g["template"] for c in clusters for g in c["workerGroupSpecs"]
    ]
    for pod in pods:
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
        assert env["RAY_SERVE_ENABLE_HA_PROXY"] == haproxy  # auto: the proxy in pods (keys or not)
