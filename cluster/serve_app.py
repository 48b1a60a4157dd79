"""Ingest as a Serve application, so that a cluster that runs Serve from a config (a KubeRay
RayService) also runs the pipeline that fills the index the query app reads.

``import_path: cluster.serve_app:ingest_builder`` with the Riverbed settings as ``args`` (as
:func:`deployments.app.app_builder` takes them) and no ``route_prefix``: one replica of
:class:`Ingest`, which starts :class:`~cluster.pipeline.Pipeline` (its sources, embedders and the
detached shard actors, in the settings' Ray namespace, where the query app finds the shards) and
owns its sources. Serve's health check asks whether every source still runs; a failed source
fails the check, Serve replaces the replica, and the new replica starts the pipeline again from
the committed offsets: records are redelivered, never lost, and every write is idempotent.

Serve may start the new replica while the old one is still shutting down (it stops its sources,
which commit what they wrote, then releases its embedders; or it is killed after
``graceful_shutdown_timeout_s`` and its actors end with it). The pipeline's actors are named, so a
new replica first waits until the old run's are gone (:func:`~cluster.pipeline.live_ingest_actors`):
it never adopts an embedder the old replica is about to release. Still held after
``RELEASE_WAIT_S``, the replica fails to start and Serve tries again.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray import serve
from ray.serve import Application

from cluster.pipeline import Pipeline, live_ingest_actors
from schemas.errors import RetryableError
from schemas.settings import Settings, serve_config_settings

log = logging.getLogger(__name__)

SHUTDOWN_S = 90.0
"""How long a replica being replaced may take to stop its sources (they commit in-flight
batches; :meth:`~cluster.pipeline.Pipeline.stop` waits up to 60 s) and release its actors."""
RELEASE_WAIT_S = SHUTDOWN_S + 30.0
"""How long a new replica waits for the previous run's actors to be gone."""


@serve.deployment(
    num_replicas=1,
    max_ongoing_requests=8,
    health_check_period_s=10,
    health_check_timeout_s=60,
    graceful_shutdown_timeout_s=SHUTDOWN_S,
    ray_actor_options={"num_cpus": 0},
)
class Ingest:
    """The index's ingest pipeline, kept running by Serve (see the module)."""

    def __init__(self, settings: Settings) -> None:
        deadline = time.monotonic() + RELEASE_WAIT_S
        while held := live_ingest_actors(settings):
            if time.monotonic() > deadline:
                raise RetryableError(
                    f"ingest of index {settings.index.name!r} not started: {held} still held by a previous "
                    f"run after {RELEASE_WAIT_S:g} s"
                )
            log.info("waiting for the previous ingest run to release %s", held)
            time.sleep(1.0)
        self.pipeline = Pipeline(settings)
        self.pipeline.start()
        log.info("ingest of index %r started", settings.index.name)

    def check_health(self) -> None:
        """Raises a failed source's error: Serve then replaces this replica."""
        self.pipeline.check_alive()

    def progress(self) -> dict[str, Any]:
        """Records not yet committed, and each source's counters."""
        progress = self.pipeline.progress()
        return {"lag": progress.lag, "sources": progress.sources, "elapsed_s": progress.elapsed_s}

    def __del__(self) -> None:
        pipeline = getattr(self, "pipeline", None)
        if pipeline is not None and pipeline.sources:
            pipeline.stop()


def ingest_builder(args: dict[str, Any] | None = None) -> Application:
    """Serve's application builder for the ingest app: ``args`` are Riverbed's settings
    (:func:`~schemas.settings.serve_config_settings`)."""
    deployment: Any = Ingest
    return deployment.bind(serve_config_settings(args))
