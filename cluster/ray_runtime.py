"""Which Ray cluster a `riverbed` command attaches to (DESIGN.md, "Processes").

``ray.address`` in the settings names a cluster. Without one, the first command starts a local
head (``ray start --head``) and records its address in ``<home>/state/ray.json``; later commands
reuse it, and ``riverbed down`` stops it. Long-lived actors are detached, so they outlive the
command that created them.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

from schemas.errors import ConfigError
from schemas.settings import Settings

log = logging.getLogger(__name__)


def _state_file(settings: Settings) -> Path:
    return settings.state_dir / "ray.json"


def _reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except (OSError, ValueError):
        return False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _use_local_token(settings: Settings) -> None:
    """Token authentication for this home's local head, with a token of its own.

    Set explicitly for the head and every driver of it: left to Ray, a `ray start` head turns
    token mode on whenever ~/.ray/auth_token exists, and a driver then connects without the token.
    Users' own clusters (``ray.address``) keep whatever their environment says."""
    path = settings.state_dir / "ray_auth_token"
    if not path.exists():
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(path)


def prepare_environment(settings: Settings) -> None:
    """Sets what Ray reads from the environment when it is imported; call before `import ray`
    (the CLI does, first thing). Idempotent."""
    if settings.ray.address:
        return
    if settings.serve.throughput_optimized:  # read by the head's workers, which inherit it
        os.environ.setdefault("RAY_SERVE_THROUGHPUT_OPTIMIZED", "1")
    token = str(settings.state_dir / "ray_auth_token")
    if "ray" in sys.modules and os.environ.get("RAY_AUTH_TOKEN_PATH") != token:
        log.warning("ray was imported before riverbed set its auth token; connecting may be refused")
    _use_local_token(settings)


def local_head_cpus(settings: Settings) -> int:
    """Logical CPUs of a local head: a scheduling budget, not cores. The embedder takes one per
    core for its torch threads; the extra one is for the light actors' fractional CPUs."""
    return settings.ray.num_cpus or (os.cpu_count() or 1) + 1


def local_head_address(settings: Settings) -> str | None:
    """The address of this home's local head if it runs, else None."""
    try:
        address = str(json.loads(_state_file(settings).read_text())["address"])
    except (OSError, ValueError, KeyError):
        return None
    return address if _reachable(address) else None


def start_local_head(settings: Settings) -> str:
    """Starts (or finds) this home's local Ray head and returns its GCS address."""
    _use_local_token(settings)
    address = local_head_address(settings)
    if address is not None:
        return address
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--object-store-memory={settings.ray.object_store_memory}",
    ]
    cmd.append(f"--num-cpus={local_head_cpus(settings)}")
    log.info("starting a local Ray head on 127.0.0.1:%d", port)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ConfigError(f"`ray start --head` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    address = f"127.0.0.1:{port}"
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    _state_file(settings).write_text(json.dumps({"address": address}))
    return address


def connect(settings: Settings, *, start: bool = True) -> str:
    """``ray.init`` against the configured cluster or this home's local head; returns the address."""
    loaded = sys.modules.get("ray")
    if loaded is not None and loaded.is_initialized():  # a driver that chose its cluster (tests)
        return str(loaded.get_runtime_context().gcs_address)
    prepare_environment(settings)
    import ray

    address = settings.ray.address or (start_local_head(settings) if start else local_head_address(settings))
    if address is None:
        raise ConfigError("no Ray cluster: set ray.address, or let a riverbed command start a local head")
    if not ray.is_initialized():
        ray.init(
            address=address,
            namespace=settings.ray.namespace,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    return address


def stop_local_head(settings: Settings) -> bool:
    """Stops this machine's Ray processes started by `ray start` (what `riverbed down` does)."""
    if local_head_address(settings) is None:
        _state_file(settings).unlink(missing_ok=True)
        return False
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop"], capture_output=True, check=False)
    _state_file(settings).unlink(missing_ok=True)
    return True
