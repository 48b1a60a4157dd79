"""`riverbed k8s render`: the Kubernetes manifests for a Riverbed config, the settings being the
one source of topics, Serve deployments, replica bounds and resources.

# KAFKA: Strimzi ``Kafka`` (KRaft) named ``k8s.name`` with one ``KafkaNodePool`` of combined
#   controller+broker nodes (``k8s.kafka_replicas``, persistent claims), and a ``KafkaTopic`` for the
#   documents, images and dead-letter topics with the settings' names, partitions and
#   ``max.message.bytes`` (``kafka.max_record_bytes``); the pods reach it at its bootstrap Service
# RAY: a ``RayService`` whose Serve apps are ``deployments.app:app_builder`` (queries) and
#   ``cluster.serve_app:ingest_builder`` (the pipeline), with the settings as their args (the query
#   app's deployments take replicas, autoscaling and resources from ``serve.*``); a head
#   that runs no tasks, a CPU worker group and, in the gpu overlay, a GPU worker group with
#   ``nvidia.com/gpu`` requests equal to limits; the Ray autoscaler (v2) on
# UPGRADES: ``upgradeStrategy: None``. KubeRay's default upgrade starts a new cluster beside the
#   old one and switches when it is ready; here the new cluster's shards could not open the stores
#   the old one holds (one writer per store), so it would never be ready. Settings (the Serve
#   config) change in place; a cluster change (image, pod sizes) is a delete and apply
# MILVUS: with ``index.backend: milvus`` and no ``index.milvus.uri``, a Milvus standalone
#   StatefulSet (embedded etcd, local storage, its own volume) and a Service, which the settings'
#   uri then names; a Milvus of your own (cluster mode) is used by its uri instead
# BACKFILL: a ``RayJob`` (its own short-lived Ray cluster, the same pods) whose entrypoint ingests
#   until idle into the index the settings name: a new index (model, backend, shards) built from
#   the topics beside the one being served
# CONFIG: the settings as ``riverbed.yaml`` in a ConfigMap mounted at /etc/riverbed; API keys only
#   from a Secret, as the pods' ``RIVERBED_SERVE__AUTH__KEYS`` (never in a manifest)
# DATA: one ReadWriteMany claim mounted by every pod at /var/lib/riverbed (the shards' stores): a
#   shard restarted on another pod, its own gone with its node, finds its store there
# PROBES: the Serve port's ``/healthz``; Prometheus scrape annotations for ``/metrics``
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import yaml

from cluster.k8s_validate import APP_BUILDER, INGEST_BUILDER
from cluster.kafka_admin import TOPIC_HEADROOM
from cluster.ray_runtime import serve_environment
from schemas.settings import Settings, WorkerGroupConfig

Overlay = Literal["cpu", "gpu"]
OVERLAYS: tuple[Overlay, ...] = ("cpu", "gpu")
RAY_VERSION = "2.60.0"
CONFIG_DIR = "/etc/riverbed"
DATA_DIR = "/var/lib/riverbed"
SERVE_PORT = 8000


def kafka_bootstrap(settings: Settings) -> str:
    """The Strimzi Kafka's plain listener Service, as the pods address it."""
    return f"{settings.k8s.name}-kafka-bootstrap:9092"


def cluster_settings(settings: Settings) -> dict[str, Any]:
    """The settings the pods run with: the given ones (non-default values only, so defaults stay
    the image's), with the broker, the data home and the Serve bind address of the cluster."""
    chosen = settings.model_dump(mode="json", exclude_defaults=True, exclude={"k8s", "home", "cache_dir"})
    for section, field in SECRET_FIELDS:  # from the Secret only (model_dump masks them anyway)
        chosen.get(section[0], {}).get(section[1], {}).pop(field, None)
    if settings.embed.num_cpus is None:  # "every core" would be the node's, not the pod's
        chosen.setdefault("embed", {})["num_cpus"] = max(1, settings.k8s.workers.cpus - 1)
    if settings.k8s.metrics_open:  # Prometheus scrapes it inside the cluster
        chosen.setdefault("serve", {}).setdefault("auth", {})["metrics"] = "open"
    chosen.setdefault("kafka", {})["bootstrap_servers"] = kafka_bootstrap(settings)
    if renders_milvus(settings):
        index = chosen.setdefault("index", {})
        index.setdefault("milvus", {})["uri"] = milvus_uri(settings)
    chosen.setdefault("ray", {})["address"] = "auto"  # a `riverbed` command in a pod joins its cluster
    chosen["home"] = DATA_DIR
    serve = chosen.setdefault("serve", {})
    serve.update(host="0.0.0.0", port=SERVE_PORT)
    return chosen


SECRET_FIELDS = ((("serve", "auth"), "keys"), (("index", "milvus"), "token"), (("serve", "llm"), "api_key"))
"""Settings that are secrets: never rendered, read by the pods from the Secret ``k8s.api_keys_secret``
(:data:`SECRET_ENV`)."""
SECRET_ENV = (
    ("RIVERBED_SERVE__AUTH__KEYS", "keys", False),
    ("RIVERBED_INDEX__MILVUS__TOKEN", "milvus-token", True),
    ("RIVERBED_SERVE__LLM__API_KEY", "llm-api-key", True),
)
"""(environment variable, key in the Secret, optional): the API keys (required: an app on a
non-loopback address needs them), a Milvus server's token and an OpenAI-compatible generator's key."""


def render(settings: Settings, overlay: Overlay = "cpu", namespace: str = "riverbed") -> list[dict[str, Any]]:
    """Every manifest for ``settings`` in ``overlay``, in apply order."""
    if overlay not in OVERLAYS:
        raise ValueError(f"overlay must be one of {', '.join(OVERLAYS)}, got {overlay!r}")
    args = cluster_settings(settings)
    return [
        config_map(settings, args, namespace),
        data_claim(settings, namespace),
        *kafka(settings, namespace),
        *topics(settings, namespace),
        *(milvus(settings, namespace) if renders_milvus(settings) else []),
        ray_service(settings, args, overlay, namespace),
    ]


MILVUS_PORT = 19530
MILVUS_HEALTH_PORT = 9091
MILVUS_DATA = "/var/lib/milvus"
EMBEDDED_ETCD = """\
listen-client-urls: http://0.0.0.0:2379
advertise-client-urls: http://0.0.0.0:2379
quota-backend-bytes: 4294967296
auto-compaction-mode: revision
auto-compaction-retention: '1000'
"""


def renders_milvus(settings: Settings) -> bool:
    """Whether the manifests hold a Milvus: the milvus backend with no server named."""
    return settings.index.backend == "milvus" and not settings.index.milvus.uri


def milvus_uri(settings: Settings) -> str:
    return f"http://{settings.k8s.name}-milvus:{MILVUS_PORT}"


def milvus(settings: Settings, namespace: str) -> list[dict[str, Any]]:
    """Milvus standalone for the milvus backend: a one-pod StatefulSet (embedded etcd, local
    storage and WAL on its own volume, which follows the pod), its ConfigMap and a headless
    Service the shards reach it by. The smallest real Milvus that needs no other operator; for
    Milvus in cluster mode (the Milvus Operator or Helm chart), name it in ``index.milvus.uri``
    and none is rendered."""
    k = settings.k8s
    name = f"{k.name}-milvus"
    labels = {"app.kubernetes.io/name": "milvus", "app.kubernetes.io/instance": name}
    amounts = {"cpu": str(k.milvus_cpus), "memory": k.milvus_memory}
    claim: dict[str, Any] = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": k.milvus_storage}},
    }
    if k.storage_class:
        claim["storageClassName"] = k.storage_class
    health = {"httpGet": {"path": "/healthz", "port": MILVUS_HEALTH_PORT}}
    container = {
        "name": "milvus",
        "image": k.milvus_image,
        "imagePullPolicy": "IfNotPresent",
        "args": ["milvus", "run", "standalone"],
        "env": [
            {"name": "ETCD_USE_EMBED", "value": "true"},
            {"name": "ETCD_DATA_DIR", "value": f"{MILVUS_DATA}/etcd"},
            {"name": "ETCD_CONFIG_PATH", "value": "/milvus/configs/embedEtcd.yaml"},
            {"name": "COMMON_STORAGETYPE", "value": "local"},
        ],
        "ports": [
            {"name": "grpc", "containerPort": MILVUS_PORT},
            {"name": "health", "containerPort": MILVUS_HEALTH_PORT},
        ],
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "readinessProbe": {**health, "initialDelaySeconds": 20, "periodSeconds": 10},
        "livenessProbe": {**health, "initialDelaySeconds": 90, "periodSeconds": 30, "failureThreshold": 3},
        "volumeMounts": [
            {"name": "data", "mountPath": MILVUS_DATA},
            {
                "name": "etcd-config",
                "mountPath": "/milvus/configs/embedEtcd.yaml",
                "subPath": "embedEtcd.yaml",
            },
        ],
    }
    return [
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(f"{name}-config", namespace),
            "data": {"embedEtcd.yaml": EMBEDDED_ETCD},
        },
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": _meta(name, namespace),
            "spec": {
                "clusterIP": "None",
                "selector": labels,
                "ports": [
                    {"name": "grpc", "port": MILVUS_PORT, "targetPort": "grpc"},
                    {"name": "health", "port": MILVUS_HEALTH_PORT, "targetPort": "health"},
                ],
            },
        },
        {
            "apiVersion": "apps/v1",
            "kind": "StatefulSet",
            "metadata": _meta(name, namespace),
            "spec": {
                "serviceName": name,
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {
                        "labels": labels,
                        "annotations": {
                            "prometheus.io/scrape": "true",
                            "prometheus.io/port": str(MILVUS_HEALTH_PORT),
                            "prometheus.io/path": "/metrics",
                        },
                    },
                    "spec": {
                        "containers": [container],
                        "volumes": [{"name": "etcd-config", "configMap": {"name": f"{name}-config"}}],
                    },
                },
                "volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": claim}],
            },
        },
    ]


def _meta(name: str, namespace: str, **labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": namespace,
        "labels": {"app.kubernetes.io/part-of": "riverbed", **labels},
    }


def config_map(settings: Settings, args: dict[str, Any], namespace: str, name: str = "") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(name or f"{settings.k8s.name}-config", namespace),
        "data": {"riverbed.yaml": yaml.safe_dump(args, sort_keys=True)},
    }


def kafka(settings: Settings, namespace: str) -> list[dict[str, Any]]:
    k = settings.k8s
    cluster = {"strimzi.io/cluster": k.name}
    replicas = k.kafka_replicas
    pool = {
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "KafkaNodePool",
        "metadata": _meta(f"{k.name}-dual-role", namespace, **cluster),
        "spec": {
            "replicas": replicas,
            "roles": ["controller", "broker"],
            "storage": {
                "type": "jbod",
                "volumes": [
                    {"id": 0, "type": "persistent-claim", "size": k.kafka_storage, "deleteClaim": False,
                     "kraftMetadata": "shared"}
                ],
            },
        },
    }  # fmt: skip
    min_isr = min(2, replicas)
    broker = {
        "apiVersion": "kafka.strimzi.io/v1",
        "kind": "Kafka",
        "metadata": _meta(k.name, namespace),
        "spec": {
            "kafka": {
                "listeners": [{"name": "plain", "port": 9092, "type": "internal", "tls": False}],
                "config": {
                    "offsets.topic.replication.factor": replicas,
                    "transaction.state.log.replication.factor": replicas,
                    "transaction.state.log.min.isr": min_isr,
                    "default.replication.factor": replicas,
                    "min.insync.replicas": min_isr,
                    "message.max.bytes": settings.kafka.max_record_bytes + TOPIC_HEADROOM,
                },
            },
            "entityOperator": {"topicOperator": {}},
        },
    }
    return [pool, broker]


def topics(settings: Settings, namespace: str) -> list[dict[str, Any]]:
    t = settings.kafka.topics
    k = settings.k8s
    replicas = k.kafka_replicas
    out = []
    for role, name, partitions in (
        ("documents", t.documents, t.documents_partitions),
        ("images", t.images, t.images_partitions),
        ("dead-letter", t.dead_letter, t.dead_letter_partitions),
    ):
        out.append(
            {
                "apiVersion": "kafka.strimzi.io/v1",
                "kind": "KafkaTopic",
                "metadata": _meta(f"{k.name}-{role}", namespace, **{"strimzi.io/cluster": k.name}),
                "spec": {
                    "topicName": name,
                    "partitions": partitions,
                    "replicas": replicas,
                    "config": {
                        "max.message.bytes": settings.kafka.max_record_bytes + TOPIC_HEADROOM,
                        "min.insync.replicas": min(2, replicas),
                    },
                },
            }
        )
    return out


def _resources(group: WorkerGroupConfig) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": str(group.cpus), "memory": group.memory}
    if group.gpus:
        amounts["nvidia.com/gpu"] = str(group.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _container(settings: Settings, name: str, group: WorkerGroupConfig, *, head: bool) -> dict[str, Any]:
    k = settings.k8s
    container: dict[str, Any] = {
        "name": name,
        "image": k.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": _resources(group),
        "env": [
            {"name": "RIVERBED_CONFIG", "value": f"{CONFIG_DIR}/riverbed.yaml"},
            # Serve's data plane, read by every Ray process when it imports Serve
            *({"name": k, "value": v} for k, v in sorted(serve_environment(settings, local=False).items())),
            *(
                {
                    "name": variable,
                    "valueFrom": {
                        "secretKeyRef": {
                            "name": k.api_keys_secret,
                            "key": key,
                            **({"optional": True} if optional else {}),
                        }
                    },
                }
                for variable, key, optional in SECRET_ENV
            ),
        ],
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "data", "mountPath": DATA_DIR},
        ],
    }
    if head:
        container["ports"] = [
            {"name": "gcs", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
            {"name": "serve", "containerPort": SERVE_PORT},
        ]
    return container


def _pod(
    settings: Settings, name: str, group: WorkerGroupConfig, *, head: bool, config: str
) -> dict[str, Any]:
    data = {"name": "data", "persistentVolumeClaim": {"claimName": data_claim_name(settings)}}
    spec: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
        "containers": [_container(settings, name, group, head=head)],
        "volumes": [{"name": "config", "configMap": {"name": config}}, data],
    }
    if group.gpus:  # GPU nodes are commonly tainted so that only GPU pods land there
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    template: dict[str, Any] = {"spec": spec}
    if head and settings.k8s.metrics_open:
        template["metadata"] = {
            "annotations": {
                "prometheus.io/scrape": "true",
                "prometheus.io/port": str(SERVE_PORT),
                "prometheus.io/path": "/metrics",
            }
        }
    return template


def data_claim_name(settings: Settings) -> str:
    return f"{settings.k8s.name}-data"


def data_claim(settings: Settings, namespace: str) -> dict[str, Any]:
    """The data home every pod mounts at ``DATA_DIR``: one ReadWriteMany claim, so that a shard
    actor restarted on another pod (its pod or node gone) reopens its store where it left it."""
    k = settings.k8s
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "resources": {"requests": {"storage": k.storage}},
    }
    if k.storage_class:
        spec["storageClassName"] = k.storage_class
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": _meta(data_claim_name(settings), namespace),
        "spec": spec,
    }


def _worker_group(
    settings: Settings, group_name: str, group: WorkerGroupConfig, config: str
) -> dict[str, Any]:
    params = {"num-gpus": str(group.gpus)} if group.gpus else {}
    return {
        "groupName": group_name,
        "replicas": group.min_replicas,
        "minReplicas": group.min_replicas,
        "maxReplicas": group.max_replicas,
        "rayStartParams": params,
        "template": _pod(settings, "ray-worker", group, head=False, config=config),
    }


def ray_cluster_spec(settings: Settings, overlay: Overlay, config: str) -> dict[str, Any]:
    """The Ray cluster of a RayService or a RayJob: a head that runs no tasks, the CPU group and,
    in the gpu overlay, the GPU group, every pod reading its settings from the ConfigMap ``config``."""
    k = settings.k8s
    groups = [_worker_group(settings, "cpu", k.workers, config)]
    if overlay == "gpu":
        groups.append(_worker_group(settings, "gpu", k.gpu_workers, config))
    head = {
        "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
        "template": _pod(settings, "ray-head", k.head, head=True, config=config),
    }
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"version": "v2"},
        "headGroupSpec": head,
        "workerGroupSpecs": groups,
    }


def serve_config(args: dict[str, Any]) -> str:
    """``serveConfigV2``: Riverbed's query app on ``/`` and its ingest app (no route), both built
    from the settings."""
    config = {
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [
            {"name": "riverbed", "import_path": APP_BUILDER, "route_prefix": "/", "args": args},
            {
                "name": "riverbed-ingest",
                "import_path": INGEST_BUILDER,
                "route_prefix": None,
                "args": copy.deepcopy(args),
            },
        ],
    }
    return yaml.safe_dump(config, sort_keys=True)


def ray_service(settings: Settings, args: dict[str, Any], overlay: Overlay, namespace: str) -> dict[str, Any]:
    k = settings.k8s
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta(k.name, namespace),
        "spec": {
            # A changed cluster spec must not start a second cluster beside the first: both would
            # open the same single-writer shard stores on the shared claim (see UPGRADES).
            "upgradeStrategy": {"type": "None"},
            "serveConfigV2": serve_config(args),
            "rayClusterConfig": ray_cluster_spec(settings, overlay, f"{k.name}-config"),
        },
    }


BACKFILL_ENTRYPOINT = "riverbed ingest --alone --until-idle --release --quiet"


def backfill_name(settings: Settings) -> str:
    return f"{settings.k8s.name}-backfill"


def backfill(
    settings: Settings, overlay: Overlay = "cpu", namespace: str = "riverbed"
) -> list[dict[str, Any]]:
    """A RayJob that builds the index ``settings`` name (``index.name``, and whatever else differs:
    another model, backend or shard count) from the topics, on a Ray cluster of its own that goes
    away when it is done, beside the running RayService; and the ConfigMap it reads. Its shards
    land on the shared data claim, so the RayService serves them once re-rendered with the same
    settings. The index's consumer group starts from the beginning of the topics (a new index) or
    from its committed offsets (an existing one: a catch-up)."""
    if overlay not in OVERLAYS:
        raise ValueError(f"overlay must be one of {', '.join(OVERLAYS)}, got {overlay!r}")
    name = backfill_name(settings)
    config = f"{name}-config"
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _meta(name, namespace),
        "spec": {
            "entrypoint": BACKFILL_ENTRYPOINT,
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 0,  # its shards released, the cluster goes at once
            "rayClusterSpec": ray_cluster_spec(settings, overlay, config),
        },
    }
    return [config_map(settings, cluster_settings(settings), namespace, config), job]


class _Dumper(yaml.SafeDumper):
    """Writes a multi-line string (an embedded config) as a literal block, as a person would."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def dump(value: Any) -> str:
    """YAML as the files under k8s/ hold it: keys in the order built, blocks for embedded configs."""
    return yaml.dump(value, Dumper=_Dumper, sort_keys=False)


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """Manifests as one multi-document YAML stream."""
    return "".join(f"---\n{dump(doc)}" for doc in docs)


HEADER = "# Rendered by `riverbed k8s write` from the default settings; edit the settings, not this file.\n"


def kustomize_tree(settings: Settings, namespace: str = "riverbed") -> dict[str, str]:
    """The ``k8s/`` kustomize tree for ``settings`` (path → text): ``base/`` holds the cpu
    overlay's manifests, ``overlays/cpu`` takes them as they are, and ``overlays/gpu`` adds the GPU
    worker group with a JSON patch; :func:`apply_gpu_patch` reads it back."""
    base = render(settings, "cpu", namespace)
    gpu_groups = render(settings, "gpu", namespace)[-1]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    added = gpu_groups[len(base[-1]["spec"]["rayClusterConfig"]["workerGroupSpecs"]) :]
    files = {f"base/{_file_name(doc)}": HEADER + dump(doc) for doc in base}
    files["base/kustomization.yaml"] = HEADER + dump(
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": sorted(name.removeprefix("base/") for name in files),
        },
    )
    files["overlays/cpu/kustomization.yaml"] = HEADER + dump(
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": ["../../base"],
        },
    )
    patch = [{"op": "add", "path": "/spec/rayClusterConfig/workerGroupSpecs/-", "value": g} for g in added]
    files["overlays/gpu/gpu-workers.yaml"] = HEADER + dump(patch)
    target = {"group": "ray.io", "version": "v1", "kind": "RayService", "name": settings.k8s.name}
    files["overlays/gpu/kustomization.yaml"] = HEADER + dump(
        {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": ["../../base"],
            "patches": [{"path": "gpu-workers.yaml", "target": target}],
        },
    )
    return files


def _file_name(doc: dict[str, Any]) -> str:
    return f"{doc['kind'].lower()}-{doc['metadata']['name']}.yaml"


def apply_gpu_patch(base: list[dict[str, Any]], patch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The gpu overlay's manifests: ``base`` with the JSON patch's appended worker groups (the
    only operation :func:`kustomize_tree` writes) applied to the RayService."""
    out = copy.deepcopy(base)
    for doc in out:
        if doc["kind"] == "RayService":
            for op in patch:
                if op["op"] != "add" or op["path"] != "/spec/rayClusterConfig/workerGroupSpecs/-":
                    raise ValueError(f"unexpected patch operation {op['op']} {op['path']}")
                doc["spec"]["rayClusterConfig"]["workerGroupSpecs"].append(copy.deepcopy(op["value"]))
    return out
