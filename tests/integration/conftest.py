"""Integration tier: the real Kafka broker (started once per session), real Ray, real models.

Each test gets fresh topics (``topic_name``), so tests never see each other's records.
"""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cluster.kafka_admin import ensure_topics
from cluster.local_kafka import BrokerState, LocalKafka
from schemas.errors import ConfigError
from schemas.settings import EmbeddedKafkaConfig, Settings, load_settings
from schemas.topology import actor_name

REPO = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    # The jar cache is shared with `make demo` (the real default), so tests fetch nothing twice.
    return load_settings().cache_dir


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[BrokerState]:
    """One real single-node KRaft broker for the whole session, stopped at the end whatever happens."""
    home = tmp_path_factory.mktemp("kafka-home")
    kafka = LocalKafka(EmbeddedKafkaConfig(), cache_dir, home)
    state = kafka.start()
    try:
        yield state
    finally:
        kafka.stop()


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    return f"t.{request.node.name[:40]}.{uuid.uuid4().hex[:8]}".replace("[", "_").replace("]", "_")


@pytest.fixture
def settings(tmp_path: Path, broker: BrokerState, topic_name: str) -> Settings:
    """Settings for one test: its own home, the session broker, its own topics."""
    topics = {
        "documents": f"{topic_name}.docs",
        "images": f"{topic_name}.images",
        "dead_letter": f"{topic_name}.dlq",
        "documents_partitions": 2,
    }
    s = load_settings(
        overrides={
            "home": str(tmp_path / "home"),
            "kafka": {"bootstrap_servers": broker.bootstrap_servers, "topics": topics},
            # The image path only where a test asks for it: with "auto" it would depend on whether
            # this machine's cache holds a trained image model.
            "images": {"ingest": False},
        }
    )
    ensure_topics(
        broker.bootstrap_servers,
        {s.kafka.topics.documents: 2, s.kafka.topics.images: 1, s.kafka.topics.dead_letter: 1},
    )
    return s


@pytest.fixture(scope="module", autouse=True)
def no_ingest_or_app_outlives_its_module() -> Iterator[None]:
    """After each module, the session's Ray holds no embedder or source and no Serve app: they
    hold most of its CPUs, so one a module leaks would refuse every later module's ingest with
    errors that name the wrong test. Whatever is left is stopped, and the module fails here.

    Shard actors are detached by design (an ingest leaves them for a later `serve`), and tests make
    many (copies, image and graph sides, evaluations): each idle one still costs about 1 % of a
    core and 180 MB, so the module's are stopped here too, without failing it."""
    yield
    import ray

    if not ray.is_initialized():
        return
    from ray import serve

    from cluster.ray_actors import SERVE_NAMESPACE, actor_rows

    def leftovers() -> tuple[list[Any], bool]:
        rows = actor_rows("riverbed")
        left = [r for r in rows if r.role in ("embedder", "source")]
        # an app's replicas (its controller and proxies may stay between apps)
        between_apps = ("ServeController", "ProxyActor")
        apps = any(r.group == SERVE_NAMESPACE and r.role not in between_apps for r in rows)
        return left, apps

    deadline = time.monotonic() + 20  # actors killed in the last teardown take a moment to be DEAD
    left, apps = leftovers()
    while (left or apps) and time.monotonic() < deadline:
        time.sleep(1)
        left, apps = leftovers()
    for row in left + [r for r in actor_rows("riverbed") if r.role == "shard"]:
        with contextlib.suppress(ValueError):
            ray.kill(ray.get_actor(row.name, namespace=row.namespace), no_restart=True)
    if apps:
        serve.shutdown()
    if left or apps:
        names = [r.name for r in left] + (["the Serve app"] if apps else [])
        pytest.fail(f"left running after the module's tests: {', '.join(names)}")


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One local Ray for the session, sized like `riverbed`'s local head (cores + 1 logical CPUs)."""
    import os

    import cluster  # noqa: F401  (sets the env var Ray reads at import)
    from cluster.ray_runtime import LOG_MONITOR_ENVIRONMENT, PROXY_READY_S, local_head_cpus

    # As `riverbed` runs its local head (serve.throughput_optimized, the log monitor's pace); set
    # before Ray starts.
    for name, value in LOG_MONITOR_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(PROXY_READY_S))
    import ray

    ray.init(
        address="local",  # a fresh instance, never a cluster another command left running
        num_cpus=local_head_cpus(load_settings()),
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        namespace="riverbed",
        logging_level="WARNING",
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def pipeline_settings(settings: Settings, ray_session: None) -> Iterator[Settings]:
    """``settings`` with an index of its own (so actor names never collide between tests)."""
    import ray

    s = load_settings(
        overrides={**_dump(settings), "index": {"name": f"t{uuid.uuid4().hex[:10]}", "n_shards": 2}}
    )
    yield s
    most = max(s.index.n_shards, s.graph.n_shards, s.graph.extractors, s.embed.workers, s.ingest.sources, 8)
    roles = (("shard", most), ("embedder", most), ("source", most))
    for index in (s.index.name, s.image_side().index.name, s.graph_side().index.name):
        for role, n in roles:
            for i in range(n):
                with contextlib.suppress(ValueError):
                    ray.kill(ray.get_actor(f"{index}/{role}/{i}", namespace=s.ray.namespace))


# IMAGE MODEL: a LiT image-text model in the text embedder's space, for the tests of the image
# paths that need a trained one (test_serve_images.py, test_eval_images.py).
# About 15 s of training on 2 cores (plus Ray Train's start): a 2-block ViT of width 64 on 960
# training images (about 40 per caption). On the validation cut it reached 0.69 caption accuracy
# (chance: 1/24).
TINY_LIT = {
    "image_size": 64,
    "patch_size": 8,
    "hidden_size": 64,
    "num_layers": 2,
    "num_heads": 2,
    "epochs": 12,
    "lr": 2e-3,
    "validation_fraction": 0.1,
}
TINY_LIT_IMAGES = 960


@dataclasses.dataclass(frozen=True)
class ImageModel:
    images: dict[str, Any]
    """``images`` settings that select the model."""
    min_rank1: float
    """Share of caption queries whose first hit must have that caption."""


@pytest.fixture(scope="session")
def image_model(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> ImageModel:
    """Riverbed's own model when this machine's cache holds it (caption accuracy 0.97 on easy-vqa
    test); else a tiny LiT model trained here in about a minute (0.69 on its validation cut)."""
    from actors.models import resolve_image_model

    defaults = load_settings()
    try:
        resolve_image_model(defaults.images, defaults.embed.model, defaults.cache_dir)
        return ImageModel({}, min_rank1=0.8)
    except ConfigError:
        pass
    from cluster.finetune_image_text import finetune_image_text

    cache = tmp_path_factory.mktemp("lit-cache")
    settings = load_settings(overrides={"cache_dir": str(cache), "images": {"finetune": TINY_LIT}})
    result = finetune_image_text(settings, "easy-vqa", limit=TINY_LIT_IMAGES)
    return ImageModel({"model": str(result.path)}, min_rank1=0.5)


def _dump(s: Settings) -> dict:
    return s.model_dump(mode="json", exclude_unset=False)


# SERVED INDEX: the HTTP app over an index the real pipeline filled (test_serve*.py, one per module).
class ServedIndex:
    """A running app: its ``url``, its ``settings``, the documents ingested (``docs``, by id, each
    with ``metadata.position``: its place in the corpus) and ``serving`` (with its pipeline)."""

    def __init__(self, url, settings, docs, serving) -> None:
        self.url, self.settings, self.docs, self.serving = url, settings, docs, serving


@pytest.fixture(scope="module")
def http(app: ServedIndex) -> Iterator[Any]:
    """An HTTP client of the module's ``app`` fixture (a :class:`ServedIndex`)."""
    import httpx

    with httpx.Client(base_url=app.url, timeout=120) as client:
        yield client


def run_cluster_script(module: str, *args: str, timeout_s: float = 900) -> dict[str, Any]:
    """Runs ``python -m module *args`` (a script that builds a Ray cluster of its own: the test
    session's Ray cannot be replaced in-process) and returns the last JSON line it printed; fails
    with its stderr when it printed none or exited non-zero."""
    import json
    import sys

    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no result (exit {result.returncode}):\n{result.stderr[-4000:]}"
    assert result.returncode == 0, f"{lines[-1]}\n{result.stderr[-4000:]}"
    out: dict[str, Any] = json.loads(lines[-1])
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served_index(
    broker: BrokerState,
    tmp_path_factory: pytest.TempPathFactory,
    n_docs: int,
    prefix: str,
    serve_overrides: dict | None = None,
    overrides: dict | None = None,
):
    """Produces ``n_docs`` SQuAD passages to fresh topics, starts `riverbed serve` with ingest for
    a fresh 2-shard index (index ``<prefix><hex>``) and yields once every record is ingested.
    ``serve_overrides``: more ``serve`` settings (e.g. ``{"auth": {"keys": [...]}}``);
    ``overrides``: other sections (e.g. ``{"graph": {"enabled": True}}``).
    Afterwards the app, the pipeline and the index's (and its graph's) shard actors are gone."""
    import ray
    from ray import serve

    from cluster.serving import start_serving
    from schemas.envelope import DocumentEnvelope
    from tests.integration.ingest_helpers import produce, squad_documents

    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    topics = {"documents": f"t.{name}.docs", "images": f"t.{name}.images", "dead_letter": f"t.{name}.dlq"}
    settings = load_settings(
        overrides={
            "home": str(tmp_path_factory.mktemp(f"{prefix}-home")),
            "kafka": {
                "bootstrap_servers": broker.bootstrap_servers,
                "topics": {**topics, "documents_partitions": 2},
            },
            "index": {"name": name, "n_shards": 2},
            "serve": {"port": free_port(), "max_body_bytes": 64 * 1024, **(serve_overrides or {})},
            **(overrides or {}),
        }
    )
    ensure_topics(
        broker.bootstrap_servers, {topics["documents"]: 2, topics["images"]: 1, topics["dead_letter"]: 1}
    )
    docs = [
        DocumentEnvelope(id=d.id, title=d.title, text=d.text, metadata={**d.metadata, "position": i})
        for i, d in enumerate(squad_documents(n_docs))
    ]
    produce(settings, docs)
    serving = start_serving(settings, ingest=True)
    try:
        assert serving.pipeline is not None
        serving.pipeline.wait_idle(timeout_s=600, interval_s=0.5)
        yield ServedIndex(serving.url, settings, {d.id: d for d in docs}, serving)
    finally:
        try:
            serving.stop()
        finally:
            serve.shutdown()
            for side in (settings, settings.graph_side()):
                for i in range(side.index.n_shards):
                    with contextlib.suppress(ValueError):
                        ray.kill(
                            ray.get_actor(
                                actor_name(side.index.name, "shard", i), namespace=side.ray.namespace
                            )
                        )


# MILVUS BY URI: a real gRPC server (Milvus Lite's `milvus-lite server`), one per session.
@dataclasses.dataclass(frozen=True)
class MilvusServer:
    uri: str
    data_dir: Path
    process: subprocess.Popen


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilvusServer]:
    """`milvus-lite server` on 127.0.0.1 and a free port, listening before the fixture yields;
    terminated at the end. (A Milvus standalone cannot run on this machine: no container runtime.)"""
    import socket
    import sys
    import time

    data_dir = tmp_path_factory.mktemp("milvus-server") / "data"
    port = free_port()
    log = (data_dir.parent / "server.log").open("wb")
    command = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir)]
    process = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"milvus-lite server exited {process.returncode}: {data_dir.parent}/server.log"
                )
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"milvus-lite server not listening on {port} after 120 s")
            time.sleep(0.2)
        yield MilvusServer(f"http://127.0.0.1:{port}", data_dir, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
