"""`riverbed serve`: the Serve app against the index's shard actors, with or without ingest.

# EXPOSURE: no keys on a non-loopback serve.host is refused before anything starts
# BROKER: the configured or embedded Kafka (documents posted over HTTP go there)
# RAY: the configured cluster or the local head
# SHARDS: the running ones; or opened from the data directory (model and dim are in the stores), the
#         images index's too when it holds any
# INGEST: optionally the pipeline too, so posted documents become searchable
# SERVE: deploy the app, wait until /healthz answers
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import httpx

from actors.backends import backend_for
from actors.index_shard import shard_directory
from cluster.kafka_admin import bootstrap_servers, ensure_topics, topic_specs
from cluster.pipeline import Pipeline, open_graph_shards, shard_handles
from cluster.ray_runtime import connect
from schemas.errors import ConfigError, RetryableError, RiverbedError
from schemas.settings import DeploymentConfig, ServeConfig, Settings, check_exposure
from schemas.topology import actor_name

log = logging.getLogger(__name__)


@dataclass
class Serving:
    settings: Settings
    url: str
    pipeline: Pipeline | None

    def stop(self) -> None:
        """Stops ingest (committing what it wrote) and deletes the app; shards stay up."""
        from ray import serve

        from deployments.app import APP_NAME

        try:
            if self.pipeline is not None:
                self.pipeline.stop()
        finally:
            serve.delete(APP_NAME)


def recorded_model(settings: Settings) -> tuple[str, int] | None:
    """The model and dim the index's stores were written with (None: no data yet), asked of each
    running shard actor, or read through the index's backend where none runs (a store held by a
    running actor may be locked to its process). Connects to Ray."""
    import ray

    connect(settings)
    backend = backend_for(settings.index)
    for shard in range(settings.index.n_shards):
        try:
            actor = ray.get_actor(
                actor_name(settings.index.name, "shard", shard), namespace=settings.ray.namespace
            )
        except ValueError:  # not running
            state = backend.stored_state(
                settings.index,
                shard_directory(settings.data_dir, shard),
                index_name=settings.index.name,
                shard=shard,
            )
            recorded = None if state is None else (state.model, state.dim)
        else:
            answer: Any = ray.get(actor.recorded_model.remote(), timeout=120)
            recorded = None if answer is None else (str(answer[0]), int(answer[1]))
        if recorded is not None:
            return recorded
    return None


def start_serving(settings: Settings, *, ingest: bool, pipeline: Pipeline | None = None) -> Serving:
    """Deploys the app (and starts ingest when ``ingest`` and no ``pipeline`` is given); returns
    once ``/healthz`` answers 200, or 503 for an index with no data yet. When the start fails, the
    ingest it started is stopped again (nothing it started keeps holding CPUs)."""
    check_exposure(settings.serve)  # before anything starts: an open app only on loopback
    # BROKER
    servers = bootstrap_servers(settings)
    ensure_topics(
        servers, topic_specs(settings.kafka.topics), max_message_bytes=settings.kafka.max_record_bytes
    )
    # RAY
    connect(settings)
    # SHARDS and INGEST
    if settings.index.alias is not None:
        from deployments.alias import alias_target, for_index

        if ingest or pipeline is not None:
            raise ConfigError(
                f"index.alias {settings.index.alias!r}: the app serves whichever index the alias points at, "
                "and each index is ingested on its own (`riverbed ingest --index NAME`, `riverbed index "
                "reindex`): serve it with --no-ingest (serve.ingest false)"
            )
        served = for_index(settings, alias_target(settings))
        recorded = recorded_model(served)
        if recorded is None:
            raise ConfigError(
                f"alias {settings.index.alias!r} points at {served.index.name!r}, which holds no data"
            )
        shard_handles(served, *recorded)
        return _deploy(settings, servers, None)
    if ingest and pipeline is None:
        started = Pipeline(settings)
        deploying: list[bool] = []
        try:
            started.start()
            return _deploy(settings, servers, started, deploying)
        except BaseException:
            _undo(started, delete_app=bool(deploying))
            raise
    if pipeline is None:
        recorded = recorded_model(settings)
        if recorded is not None:
            shard_handles(settings, *recorded)
        else:
            log.warning(
                "index %r holds no data yet: search answers 503 until ingest runs", settings.index.name
            )
        images = settings.image_side()
        recorded = recorded_model(images)
        if recorded is not None:  # no images yet: image searches answer 503 until an ingest stores some
            shard_handles(images, *recorded)
        if settings.graph.enabled:
            _open_graph(settings)
    return _deploy(settings, servers, pipeline)


def _open_graph(settings: Settings) -> None:
    """Starts the knowledge graph's shards when an ingest built them. A graph that cannot open
    (a store another Riverbed wrote, its actors failing) leaves search serving: the graph routes
    answer 503 naming the trouble meanwhile, and this logs it."""
    import sqlite3

    from ray.exceptions import RayError

    try:
        if not open_graph_shards(settings):
            log.warning(
                "index %r has no knowledge graph yet: graph queries answer 503 until an ingest builds it",
                settings.index.name,
            )
    except (RiverbedError, RayError, sqlite3.Error) as exc:
        log.error("the knowledge graph of index %r cannot open: %s", settings.index.name, exc)


def _deploy(
    settings: Settings, servers: str, pipeline: Pipeline | None, deploying: list[bool] | None = None
) -> Serving:
    """SERVE: deploys the app and waits for ``/healthz``. ``deploying`` gets an entry once this
    call deploys (before that, an app of that name is another command's)."""
    from ray import serve

    from deployments.app import APP_NAME, build_app

    check_resources(settings)
    host, port = settings.serve.host, settings.serve.port
    start_serve(host, port)
    if deploying is not None:
        deploying.append(True)
    serve.run(build_app(settings, servers), name=APP_NAME, route_prefix="/")
    url = f"http://{host}:{port}"
    wait_ready(url)
    return Serving(settings, url, pipeline)


def start_serve(host: str, port: int, attempts: int = 3) -> None:
    """``serve.start`` on ``host:port``.

    - Ray Serve has one HTTP address per cluster, and ``serve.start`` silently keeps a running
      controller's: when that address is another and no app runs, Serve is restarted on this one;
      when an app runs there, a :class:`ConfigError` names it and its address.
    - Again when its first HTTP proxy died starting: Serve's controller kills a proxy that is not
      ready within its ready check (on a cluster that did not set
      ``RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S``: 5 s, which a loaded node misses) and starts another
      with a longer check, but ``serve.start`` waits on the first one and raises; the next call
      finds the running controller. The app's ``/healthz`` is then waited for as always.
    """
    from ray import serve
    from ray.exceptions import ActorDiedError
    from ray.serve.context import _get_global_client

    for attempt in range(1, attempts + 1):
        try:
            serve.start(http_options={"host": host, "port": port})
            break
        except (ActorDiedError, TimeoutError) as exc:
            if attempt == attempts:
                raise
            log.warning("Serve's HTTP proxy did not start (%s); Serve starts another", type(exc).__name__)
    client = _get_global_client()
    assert client is not None  # serve.start connected it
    config = client.http_config
    if (config.host, config.port) == (host, port):
        return
    apps = sorted(serve.status().applications)
    if apps:
        raise ConfigError(
            f"Ray Serve already listens on {config.host}:{config.port} for {', '.join(apps)} (one HTTP "
            f"address per Ray cluster): stop that app, or set serve.host/serve.port to "
            f"{config.host}:{config.port}"
        )
    log.info("Serve listened on %s:%s, no app; restarting it on %s:%s", config.host, config.port, host, port)
    serve.shutdown()
    serve.start(http_options={"host": host, "port": port})


def _undo(pipeline: Pipeline, *, delete_app: bool) -> None:
    """After a failed start: stops the ingest that :func:`start_serving` started (its embedders
    and sources would hold their CPUs for the driver's life) and, with ``delete_app`` (this start
    deployed it), deletes the app. Best effort; the failure that got here is what the caller sees."""
    from ray import serve

    from deployments.app import APP_NAME

    try:
        pipeline.stop(timeout_s=30.0)
    except Exception:
        log.exception("stopping the ingest after a failed serve start")
    try:
        if delete_app and APP_NAME in serve.status().applications:
            serve.delete(APP_NAME)
    except Exception:
        log.exception("deleting the app after a failed serve start")


def check_resources(settings: Settings) -> None:
    """Refuses to deploy an app whose replicas cannot all be scheduled now (Serve would wait for
    them forever), naming the settings that decide it."""
    import ray
    from ray import serve

    from deployments.app import APP_NAME

    if APP_NAME in serve.status().applications:
        return  # a redeploy reuses the running replicas' resources
    needed = app_cpus(settings.serve)
    free = ray.available_resources().get("CPU", 0.0)
    if needed > free + 1e-9:
        from cluster.ray_actors import cpu_holders_now

        parts = app_deployments(settings.serve).items()
        detail = ", ".join(f"serve.{n}.num_cpus={c.num_cpus:g}" for n, c in parts)
        holders = cpu_holders_now(settings.ray.namespace)
        held = f"held by {holders}; `riverbed ps` lists them" if holders else "`riverbed ps` lists holders"
        raise ConfigError(
            f"the app needs {needed:g} of Ray's logical CPUs but {free:g} are free "
            f"(of {ray.cluster_resources().get('CPU', 0.0):g}; {held}): "
            f"lower {detail}, or embed.num_cpus, or give Ray more (ray.num_cpus), or stop the actors of "
            "indexes you are not using"
        )


def app_deployments(serve_config: ServeConfig) -> dict[str, DeploymentConfig]:
    """The settings of each deployment of the app, by name (``serve.<name>``): every
    :class:`DeploymentConfig` section of ``serve``, so that a new deployment's is never left out."""
    return {name: value for name, value in serve_config if isinstance(value, DeploymentConfig)}


def app_cpus(serve_config: ServeConfig) -> float:
    """Logical CPUs the app's replicas hold at the least (autoscaled ones at ``min_replicas``)."""
    return sum(
        c.num_cpus * (c.min_replicas if c.num_replicas == "auto" else c.num_replicas)
        for c in app_deployments(serve_config).values()
    )


def wait_ready(url: str, timeout_s: float = 120.0) -> dict[str, Any]:
    """Polls ``/healthz`` until the app answers (200, or 503 for an index without data)."""
    deadline = time.monotonic() + timeout_s
    last: str = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{url}/healthz", timeout=5)
            if response.status_code in (200, 503):
                body: dict[str, Any] = response.json()
                return body
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise RetryableError(f"the app at {url} did not answer /healthz within {timeout_s} s ({last})")
