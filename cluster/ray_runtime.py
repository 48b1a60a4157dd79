"""Which Ray cluster a `riverbed` command attaches to, and the life of this home's local head.

``ray.address`` in the settings names a cluster; riverbed never starts, restarts or stops that
one. Without it, the first command starts a local head (``ray start --head``) and records it in
``<home>/state/ray.json``:

- what identifies it: its GCS address, its session directory (unique to one Ray instance) and the
  pid and start time of each of its processes;
- the environment it serves: the interpreter its workers run, where riverbed's packages are, a
  hash of their sources, Ray's version, and the Serve data plane its processes were started with
  (:func:`serve_environment`: Serve reads it when its modules are imported).

Later commands reuse the head when their environment is the same. A command from another
environment (another clone, another venv, edited code) logs what differs and restarts the head:
the head's workers run the interpreter and import the code of whoever started it, so reusing it
would fail when that interpreter is gone or silently run other code. Restarting stops the head's
actors (shards come back on demand with their data; a running `serve` or `ingest` of the other
environment loses its cluster).

`riverbed down` stops exactly that head's processes and their children (SIGTERM, then SIGKILL
after a grace period); never ``ray stop``, which would end every Ray on the machine (a test
session's, another home's). Starting and stopping hold a per-home file lock, so concurrent
commands of one home never start two heads. Long-lived actors are detached, so they outlive the
command that created them.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from schemas.errors import ConfigError
from schemas.settings import Settings

log = logging.getLogger(__name__)

PACKAGES = ("schemas", "actors", "deployments", "cluster")
"""riverbed's packages: their ``.py`` sources make the code version."""
STOP_GRACE_S = 10.0
"""How long the head's processes get to exit after SIGTERM before they are killed."""


# ENVIRONMENT
@dataclass(frozen=True)
class Environment:
    """What a head's workers run: the interpreter path (as given, not resolved: two venvs may
    link the same binary), the directory holding riverbed's packages, the code version
    (:func:`code_version`), Ray's version, and the Serve data plane (:func:`serve_signature`)."""

    python: str
    package: str
    code: str
    ray: str
    serve: str = ""

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Environment | None:
        """The environment a head record holds, or None (a record of an older riverbed)."""
        env = record.get("environment")
        if not isinstance(env, Mapping):
            return None
        try:
            return cls(
                str(env["python"]),
                str(env["package"]),
                str(env["code"]),
                str(env["ray"]),
                str(env.get("serve", "")),
            )
        except KeyError:
            return None


def package_root() -> Path:
    """The directory holding riverbed's packages (a clone's root, or site-packages)."""
    return Path(__file__).resolve().parents[1]


@functools.cache
def code_version(root: Path, packages: Sequence[str] = PACKAGES) -> str:
    """A hash (16 hex digits) of every ``.py`` file under ``root/<package>`` for each package:
    their paths relative to ``root`` and their bytes. Cached per process (a few ms to compute);
    any edit, added or removed file changes it."""
    digest = hashlib.sha256()
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def current_environment() -> Environment:
    """This process's :class:`Environment` (cached)."""
    from importlib.metadata import version

    root = package_root()
    return Environment(sys.executable, str(root), code_version(root), version("ray"))


def head_environment(settings: Settings) -> Environment:
    """What a local head started by this process for ``settings`` serves: :func:`current_environment`
    with the settings' Serve data plane."""
    return replace(current_environment(), serve=serve_signature(settings))


def environment_differences(head: Environment | None, here: Environment) -> list[str]:
    """What differs between the environment a head serves and this command's, one phrase each;
    empty when they are the same. A head with no recorded environment differs."""
    if head is None:
        return ["the head recorded no environment (started by an older riverbed)"]
    found: list[str] = []
    if head.python != here.python:
        gone = "" if Path(head.python).exists() else " (no longer exists)"
        found.append(f"interpreter: the head runs {head.python}{gone}, this command {here.python}")
    if head.package != here.package:
        found.append(f"riverbed location: the head's is {head.package}, this command's {here.package}")
    elif head.code != here.code:
        found.append(f"riverbed code: the head runs version {head.code}, this command {here.code} (edited)")
    if head.ray != here.ray:
        found.append(f"Ray: the head runs {head.ray}, this command {here.ray}")
    if head.serve != here.serve:
        found.append(
            f"Serve data plane: the head runs {head.serve or 'none recorded'}, "
            f"this command's settings {here.serve}"
        )
    return found


# THE HEAD'S PROCESSES
def _references(arg: str, needle: str) -> bool:
    """Whether ``needle`` occurs in ``arg`` as a whole value: preceded by the start, ``=`` or a
    space, followed by the end, a space or ``/`` (so ``:6379`` never matches ``:63790``)."""
    return re.search(r"(?:^|[=\s])" + re.escape(needle) + r"(?=$|[\s/])", arg) is not None


def belongs_to_head(cmdline: Sequence[str], session_dir: str, gcs_address: str | None) -> bool:
    """Whether a process with this command line is one of the head's: it names the head's session
    directory, or (when given) its GCS address. Pure."""
    needles = [session_dir] + ([gcs_address] if gcs_address else [])
    return any(_references(arg, needle) for arg in cmdline for needle in needles)


def session_dir_of_gcs(cmdline: Sequence[str], port: int) -> str | None:
    """The session directory of the GCS server with this command line, if it serves ``port``."""
    if f"--gcs_server_port={port}" not in cmdline:
        return None
    for arg in cmdline:
        if arg.startswith("--session-dir="):
            return arg.partition("=")[2]
    for arg in cmdline:
        if arg.startswith("--log_dir="):
            return str(Path(arg.partition("=")[2]).parent)
    return None


def _port_of(address: str) -> int | None:
    try:
        return int(address.rpartition(":")[2])
    except ValueError:
        return None


def _scan() -> list[tuple[Any, list[str]]]:
    """Every process whose command line can be read, with it."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = proc.info["cmdline"]
        if cmdline:
            found.append((proc, list(cmdline)))
    return found


def _gcs_sessions(scan: Sequence[tuple[Any, list[str]]], port: int) -> set[str]:
    """Session directories of the GCS servers serving ``port`` (one, unless a port was reused)."""
    return {s for _, cmdline in scan if (s := session_dir_of_gcs(cmdline, port)) is not None}


def head_processes(record: Mapping[str, Any]) -> list[Any]:
    """The live processes of the head ``record`` describes, children included (``psutil``
    processes; this process and its ancestors never). A process belongs to the head when it names
    the recorded session directory; its GCS address counts too once the GCS server of that port is
    seen to be the head's (so a port another Ray reused later never matches); recorded pids count
    when their start time is the recorded one. A record with no session directory (an older
    riverbed's) takes it from the GCS server serving the recorded port."""
    import psutil

    address = str(record.get("address") or "")
    port = _port_of(address)
    session_dir = record.get("session_dir")
    scan = _scan()
    sessions = _gcs_sessions(scan, port) if port is not None else set()
    if not session_dir and len(sessions) == 1:
        session_dir = next(iter(sessions))
    if session_dir not in sessions:
        address = ""  # the port is not (or no longer) this head's
    found: dict[int, Any] = {}
    if session_dir:
        for proc, cmdline in scan:
            if belongs_to_head(cmdline, str(session_dir), address or None):
                found[proc.pid] = proc
    for entry in record.get("processes", []):
        with contextlib.suppress(psutil.Error, KeyError, TypeError, ValueError):
            proc = psutil.Process(int(entry["pid"]))
            if abs(proc.create_time() - float(entry["create_time"])) < 0.01:
                found[proc.pid] = proc
    for proc in list(found.values()):
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                found.setdefault(child.pid, child)
    spared = {os.getpid()} | {p.pid for p in psutil.Process().parents()}
    return [p for pid, p in sorted(found.items()) if pid not in spared]


def stop_order(names: Sequence[str]) -> list[list[int]]:
    """Indices of processes named ``names`` in the order Ray stops a node's processes: the raylets
    first (their workers and agents fate-share with them), then everything else, the GCS server
    last (the others would otherwise fail on losing it). Pure; empty groups are left out."""
    first = [i for i, n in enumerate(names) if n == "raylet"]
    last = [i for i, n in enumerate(names) if n == "gcs_server"]
    middle = [i for i, n in enumerate(names) if n not in ("raylet", "gcs_server")]
    return [group for group in (first, middle, last) if group]


def terminate(procs: Sequence[Any], grace_s: float = STOP_GRACE_S) -> None:
    """Stops ``procs`` group by group in :func:`stop_order`: SIGTERM to the group, then SIGKILL to
    those still alive after ``grace_s`` seconds. Returns once all are gone (or, for a process
    that survives SIGKILL too, after a further 5 s, logging it)."""
    import psutil

    names = []
    for proc in procs:
        try:
            names.append(proc.name())
        except psutil.Error:
            names.append("")
    for group in stop_order(names):
        members = [procs[i] for i in group]
        for proc in members:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(members, timeout=grace_s)
        if alive:
            log.warning("%d Ray processes did not stop in %.0f s; killing them", len(alive), grace_s)
            for proc in alive:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            _, alive = psutil.wait_procs(alive, timeout=5.0)
            if alive:
                log.warning("Ray processes still alive after SIGKILL: %s", [p.pid for p in alive])


def _forget_current_cluster(record: Mapping[str, Any]) -> None:
    """Removes Ray's "current cluster" file (``ray.init(address="auto")`` reads it) when it names
    this head, as ``ray stop`` does; another Ray's entry is left alone."""
    session_dir = record.get("session_dir")
    if not session_dir:
        return
    path = Path(str(session_dir)).parent / "ray_current_cluster"
    with contextlib.suppress(OSError):
        if path.read_text().strip() == record.get("address"):
            path.unlink()


def _describe_processes(procs: Sequence[Any]) -> list[dict[str, Any]]:
    import psutil

    described = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            described.append({"pid": proc.pid, "create_time": proc.create_time(), "name": proc.name()})
    return described


# THE RECORD
def _state_file(settings: Settings) -> Path:
    return settings.state_dir / "ray.json"


@contextlib.contextmanager
def _home_lock(settings: Settings) -> Iterator[None]:
    """An exclusive lock on this home's head record, across processes (blocks until free)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.state_dir / "ray.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_head_record(settings: Settings) -> dict[str, Any] | None:
    """This home's head record (see the module docstring), or None when there is none or it
    cannot be read."""
    try:
        record = json.loads(_state_file(settings).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "address" in record else None


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


PROXY_READY_S = 60
"""How long Serve's controller gives a new HTTP proxy to start before it kills it and starts another
(Ray's default: 5 s, then 10, 15...). A proxy's worker process imports Serve and the app's modules:
on two cores busy loading the embedders' models that took longer than 5 s, and the first proxy's
death failed ``serve.start``."""


def serve_environment(settings: Settings, *, local: bool = True) -> dict[str, str]:
    """The ``RAY_SERVE_*`` variables of the Serve data plane ``settings`` ask for, which every
    process of the cluster must have from its start (Serve reads them when its modules are
    imported): ``serve.throughput_optimized``, and HAProxy mode (:meth:`ServeConfig.data_plane`
    on a ``local`` head; elsewhere only when ``serve.edge`` names ``haproxy``)."""
    serve = settings.serve
    haproxy = serve.data_plane() == "haproxy" if local else serve.edge == "haproxy"
    env = {"RAY_SERVE_ENABLE_HA_PROXY": "1" if haproxy else "0"}
    if serve.throughput_optimized:
        env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    return env


LOG_MONITOR_ENVIRONMENT = {"RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0", "LOG_NAME_UPDATE_INTERVAL_S": "2"}
"""For a head's log monitor (which sends the workers' output to the drivers): look for new log files
every 2 s instead of 10 times a second. Ray globs the log directory on every pass while it holds
under 1,000 files; a local head that has run a few hundred workers (each leaves its .out and .err)
spent 8 % of a core on it, measured on 2 cores with 620 files. A new worker's first lines reach the
driver up to 2 s later; nothing is lost."""


def serve_signature(settings: Settings) -> str:
    """:func:`serve_environment` as one recorded string (a head started with another is restarted)."""
    return ",".join(f"{k}={v}" for k, v in sorted(serve_environment(settings).items()))


def haproxy_environment(settings: Settings) -> dict[str, str]:
    """Where a local head's HAProxy keeps its files and answers its stats and metrics: a directory
    of this home's and free ports, not Ray's machine-wide defaults (``/tmp/haproxy-serve``, ports
    8404 and 9101), so that two homes' heads on one machine never share them. The directory is
    ``/tmp/rbhap-<hash of the home>``, not under the home: Ray adds a 56-character node id
    below it, and HAProxy refuses a unix socket path over 97 characters."""
    digest = hashlib.sha256(str(settings.state_dir.resolve()).encode()).hexdigest()[:8]
    files = Path("/tmp") / f"rbhap-{digest}"
    files.mkdir(mode=0o700, exist_ok=True)
    return {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(files / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(files / "admin.sock"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(files / "metrics.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(files),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(files / "server-state"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port()),
    }


def prepare_environment(settings: Settings) -> None:
    """Sets what Ray reads from the environment when it is imported; call before `import ray`
    (the CLI does, first thing). Idempotent."""
    if settings.ray.address:
        return
    # The Serve data plane: the settings decide (a head started by this process inherits it).
    os.environ.update(serve_environment(settings))
    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", str(PROXY_READY_S))
    token = str(settings.state_dir / "ray_auth_token")
    if "ray" in sys.modules and os.environ.get("RAY_AUTH_TOKEN_PATH") != token:
        log.warning("ray was imported before riverbed set its auth token; connecting may be refused")
    _use_local_token(settings)


def local_head_cpus(settings: Settings) -> int:
    """Logical CPUs of a local head: a scheduling budget, not cores. The embedder takes one per
    core for its torch threads; the extra one is for the light actors' fractional CPUs."""
    return settings.ray.num_cpus or (os.cpu_count() or 1) + 1


def local_head_address(settings: Settings) -> str | None:
    """The address of this home's local head if it runs (whatever environment it serves), else
    None."""
    record = read_head_record(settings)
    if record is None:
        return None
    address = str(record["address"])
    return address if _reachable(address) else None


# START AND STOP
def start_local_head(settings: Settings) -> str:
    """Returns the GCS address of this home's local Ray head serving this process's environment:
    the running one when its recorded environment is this one; otherwise (none running, or one
    started from another environment, which is stopped first, saying what differs) a new one."""
    _use_local_token(settings)
    here = head_environment(settings)
    with _home_lock(settings):
        record = read_head_record(settings)
        if record is not None:
            address = str(record["address"])
            if _reachable(address):
                differences = environment_differences(Environment.from_record(record), here)
                if not differences:
                    return address
                log.warning(
                    "the local Ray head at %s was started from another environment (%s): restarting it "
                    "so that its workers run this command's interpreter and code; its actors stop (shards "
                    "start again on demand, with their data), and commands still using it lose it",
                    address,
                    "; ".join(differences),
                )
            _stop_head(record)  # unreachable: ends what is left of it, if anything
            _state_file(settings).unlink(missing_ok=True)
        return _start_head(settings, here)


def _start_head(settings: Settings, env: Environment) -> str:
    port = _free_port()
    cmd = [
        env.python,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--include-dashboard=false",
        "--disable-usage-stats",
        f"--object-store-memory={settings.ray.object_store_memory}",
        f"--num-cpus={local_head_cpus(settings)}",
    ]
    log.info("starting a local Ray head on 127.0.0.1:%d", port)
    environ = {**LOG_MONITOR_ENVIRONMENT, **os.environ, **serve_environment(settings)}
    if settings.serve.data_plane() == "haproxy":
        environ.update(haproxy_environment(settings))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=environ)
    if proc.returncode != 0:
        raise ConfigError(f"`ray start --head` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    address = f"127.0.0.1:{port}"
    sessions = _gcs_sessions(_scan(), port)
    session_dir = next(iter(sessions)) if len(sessions) == 1 else None
    if session_dir is None:
        log.warning("could not find the session directory of the Ray head at %s", address)
    record: dict[str, Any] = {"address": address, "session_dir": session_dir}
    record.update(
        processes=_describe_processes(head_processes(record)),
        environment=asdict(env),
        started=time.time(),
    )
    _write_record(settings, record)
    return address


def _write_record(settings: Settings, record: Mapping[str, Any]) -> None:
    """Writes the head record atomically (a reader sees the old record or the new one)."""
    path = _state_file(settings)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)


def _stop_head(record: Mapping[str, Any]) -> bool:
    """Stops the head's processes (see :func:`head_processes`); returns whether any ran."""
    procs = head_processes(record)
    if not procs:
        return False
    log.info(
        "stopping the local Ray head at %s (%d processes, session %s)",
        record.get("address"),
        len(procs),
        record.get("session_dir"),
    )
    terminate(procs)
    _forget_current_cluster(record)
    return True


def stop_local_head(settings: Settings) -> bool:
    """Stops this home's local head, exactly its processes and their children, and removes its
    record (what `riverbed down` does); any other Ray on the machine keeps running. Returns
    whether a head was running. Idempotent."""
    if not _state_file(settings).exists():
        return False
    with _home_lock(settings):
        record = read_head_record(settings)
        stopped = _stop_head(record) if record is not None else False
        _state_file(settings).unlink(missing_ok=True)
    return stopped


def connect(settings: Settings, *, start: bool = True) -> str:
    """``ray.init`` against the configured cluster or this home's local head (started, or
    restarted for this environment, when ``start``; with ``start=False`` a head of another
    environment is used as it is, with a warning); returns the address. A driver already
    connected (tests) keeps its cluster."""
    loaded = sys.modules.get("ray")
    if loaded is not None and loaded.is_initialized():  # a driver that chose its cluster (tests)
        return str(loaded.get_runtime_context().gcs_address)
    prepare_environment(settings)
    import ray

    if settings.ray.address:
        address: str | None = settings.ray.address
    elif start:
        address = start_local_head(settings)
    else:
        address = local_head_address(settings)
        record = read_head_record(settings)
        if address is not None and record is not None:
            here = head_environment(settings)
            differences = environment_differences(Environment.from_record(record), here)
            if differences:
                log.warning(
                    "the local Ray head at %s serves another environment: %s", address, "; ".join(differences)
                )
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
