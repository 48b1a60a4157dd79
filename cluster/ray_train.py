"""Training on Ray Train, as every `riverbed finetune` command runs it.

:func:`fit_on_ray` runs a per-worker function on a ``TorchTrainer`` (CPU or GPU workers, as the
settings' resources say), relays the progress events the workers put on a Ray queue to the
caller's callback from a thread (the main thread stays Ray Train's, which handles Ctrl-C there),
and hands back what the caller reads from the final checkpoint. :func:`exclusive` keeps two
trainings of the same model on one machine from running at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

from schemas.errors import RiverbedError
from schemas.settings import Settings

Progress = Callable[[dict[str, Any]], None]
T = TypeVar("T")


class TrainResources(Protocol):
    """Where a training runs (the resource fields of a finetune section)."""

    @property
    def workers(self) -> int: ...

    @property
    def use_gpu(self) -> bool | Literal["auto"]: ...

    @property
    def num_cpus(self) -> float | None: ...

    @property
    def storage_path(self) -> str | None: ...


@contextlib.contextmanager
def exclusive(target: Path) -> Iterator[None]:
    """Holds a lock beside ``target`` (one trainer per model key on this machine)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with (target.parent / f".{target.name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def fit_on_ray(
    settings: Settings,
    resources: TrainResources,
    loop: Callable[[dict[str, Any]], None],
    config: dict[str, Any],
    name: str,
    on_progress: Progress,
    read: Callable[[Path], T],
) -> tuple[T, list[dict[str, Any]]]:
    """Runs ``loop`` (a Ray Train per-worker function, given ``config`` plus ``queue``, a Ray queue
    for progress events) on ``resources.workers`` workers as run ``name``; returns what ``read``
    makes of the final checkpoint's directory, and the per-epoch metrics the run reported as
    ``history``. The run's directory is removed afterwards when local."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.util.queue import Queue

    from cluster.ray_runtime import connect

    finetune = resources
    connect(settings)
    use_gpu = finetune.use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) > 0
    storage = finetune.storage_path or str((settings.cache_dir / "ray-train").resolve())
    queue = Queue(actor_options={"num_cpus": 0})
    trainer = TorchTrainer(
        loop,
        train_loop_config={**config, "queue": queue},
        scaling_config=ScalingConfig(
            num_workers=finetune.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": finetune.num_cpus or 1},
        ),
        run_config=RunConfig(name=name, storage_path=storage),
    )
    try:
        with _relay(queue, on_progress), _sigint_handler_kept():
            result = trainer.fit()
        if result.checkpoint is None:
            raise RiverbedError(f"training {name} ended without a checkpoint")
        with result.checkpoint.as_directory() as directory:
            made = read(Path(directory))
    except RiverbedError:
        raise
    except Exception as exc:  # Ray Train's TrainingFailedError and whatever a worker raised
        raise RiverbedError(f"training {name} failed: {exc}") from exc
    finally:
        with contextlib.suppress(Exception):
            ray.kill(queue.actor)  # type: ignore[arg-type]
        if "://" not in storage:
            shutil.rmtree(Path(storage) / name, ignore_errors=True)
    return made, list((result.metrics or {}).get("history", []))


@contextlib.contextmanager
def _sigint_handler_kept() -> Iterator[None]:
    """Puts the process's SIGINT handler back after the block. ``TorchTrainer.fit`` installs
    one (Ctrl-C aborts the run) and leaves it installed; its closure holds the run's controller
    actor handle, so without this the finished controller lives as long as the driver (a
    notebook's, a test session's) and Ctrl-C would later go to a run that is over."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Ray Train installs nothing off the main thread (and signal.signal would raise)
        return
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        if previous is not None:  # None: a handler not set from Python, which we cannot restore
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def _relay(queue: Any, on_progress: Progress) -> Iterator[None]:
    """Passes what the workers put on ``queue`` to ``on_progress``, from a thread, while the
    block runs (the block keeps the main thread: Ray Train handles Ctrl-C there)."""
    from ray.util.queue import Empty

    done = threading.Event()

    def relay() -> None:
        while True:
            try:
                event = queue.get(timeout=0.5)
            except Empty:
                if done.is_set():  # the block is over and the queue drained
                    return
                continue
            except Exception:  # the queue is gone (the run failed): stop relaying
                return
            on_progress(event)

    thread = threading.Thread(target=relay, name="finetune-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=10)
