"""Ingest as a Serve application, so that a cluster that runs Serve from a config (a KubeRay
RayService) also runs the pipeline that fills the index the query app reads.

``import_path: cluster.serve_app:ingest_builder`` with the Riverbed settings as ``args`` (as
:func:`deployments.app.app_builder` takes them) and no ``route_prefix``: one replica of
:class:`Ingest`, which starts :class:`~cluster.pipeline.Pipeline` (its sources, embedders and the
detached shard actors, in the settings' Ray namespace, where the query app finds the shards) and
owns its sources. Serve's health check asks whether every source still runs; a failed source
fails the check, Serve replaces the replica, and the new replica starts the pipeline again from
the committed offsets: records are redelivered, never lost, and every write is idempotent.

Starting never fails the replica: Serve gives up on a deployment whose replicas fail to start
three times, and at a cluster's first start the broker may not be up yet. The replica starts the
pipeline on a thread and tries again (backing off to ``RETRY_MAX_S``) for as long as it cannot,
saying why in its log and :meth:`Ingest.progress`; the health check passes meanwhile.

Serve may start the new replica while the old one is still shutting down (it stops its sources,
which commit what they wrote, then releases its embedders; or it is killed after
``graceful_shutdown_timeout_s`` and its actors end with it). The pipeline's actors are named, so a
new replica first waits until the old run's are gone (:func:`~cluster.pipeline.live_ingest_actors`):
it never adopts an embedder the old replica is about to release.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Any

from ray import serve
from ray.serve import Application

from cluster.pipeline import Pipeline, live_ingest_actors
from schemas.settings import Settings, serve_config_settings

log = logging.getLogger(__name__)

SHUTDOWN_S = 90.0
"""How long a replica being replaced may take to stop its sources (they commit in-flight
batches; :meth:`~cluster.pipeline.Pipeline.stop` waits up to 60 s) and release its actors."""
RETRY_MAX_S = 60.0
"""The longest wait between two tries to start the pipeline."""


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
        self.settings = settings
        self.pipeline: Pipeline | None = None
        self.problem: str | None = "starting"
        """Why the pipeline is not running yet (None once it runs)."""
        self._stopping = threading.Event()
        self._starter = threading.Thread(target=self._start, name="riverbed-ingest-start", daemon=True)
        self._starter.start()

    def _start(self) -> None:
        delay = 1.0
        while not self._stopping.is_set():
            pipeline = Pipeline(self.settings)
            try:
                held = live_ingest_actors(self.settings)
                if held:  # the previous run's actors: they go with their replica
                    self.problem = f"waiting for the previous ingest run to release {held}"
                    self._stopping.wait(1.0)
                    continue
                pipeline.start()
            except Exception as exc:
                self.problem = f"{type(exc).__name__}: {exc}"
                log.warning("ingest of index %r not started (%s); again in %g s", self.settings.index.name,
                            self.problem, delay)  # fmt: skip
                with contextlib.suppress(Exception):  # what it started, so the next try starts afresh
                    pipeline.stop()
                self._stopping.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self.pipeline, self.problem = pipeline, None
            log.info("ingest of index %r started", self.settings.index.name)
            return

    def check_health(self) -> None:
        """Raises a failed source's error: Serve then replaces this replica. Passes while the
        pipeline is still starting (a new replica would only start it again)."""
        if self.pipeline is not None:
            self.pipeline.check_alive()

    def progress(self) -> dict[str, Any]:
        """Records not yet committed, and each source's counters; or why it is not running yet."""
        if self.pipeline is None:
            return {"running": False, "problem": self.problem}
        progress = self.pipeline.progress()
        return {
            "running": True,
            "lag": progress.lag,
            "sources": progress.sources,
            "elapsed_s": progress.elapsed_s,
        }

    def __del__(self) -> None:
        stopping = getattr(self, "_stopping", None)
        if stopping is None:
            return
        stopping.set()
        self._starter.join(timeout=SHUTDOWN_S / 3)  # a start in progress returns first
        if self.pipeline is not None and self.pipeline.sources:
            self.pipeline.stop()


def ingest_builder(args: dict[str, Any] | None = None) -> Application:
    """Serve's application builder for the ingest app: ``args`` are Riverbed's settings
    (:func:`~schemas.settings.serve_config_settings`)."""
    deployment: Any = Ingest
    return deployment.bind(serve_config_settings(args))
