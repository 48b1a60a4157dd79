"""The embedded Kafka: one real Apache Kafka 4.x broker+controller (KRaft) on 127.0.0.1.

Jars come from Maven Central once (``mvn dependency:copy-dependencies`` on the pom shipped in
``cluster/kafka/pom.xml``) into ``<cache_dir>/kafka/<version>/libs``; the broker's data, config,
log and a ``broker.json`` state file live in ``<home>/kafka``. ``start`` is idempotent: a broker
that this home already runs is reused. Users with their own broker set
``kafka.bootstrap_servers`` and never touch this module.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

from schemas.errors import KafkaSetupError
from schemas.settings import EmbeddedKafkaConfig

log = logging.getLogger(__name__)

MIN_JAVA = 17
_LOG4J2 = """<Configuration status="warn">
  <Appenders>
    <File name="file" fileName="{log}" append="true">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </File>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="info"/>
    <Logger name="org.apache.kafka" level="info"/>
    <Root level="warn"><AppenderRef ref="file"/></Root>
  </Loggers>
</Configuration>
"""


@dataclass(frozen=True)
class BrokerState:
    pid: int
    port: int
    controller_port: int
    version: str
    started_at: float

    @property
    def bootstrap_servers(self) -> str:
        return f"127.0.0.1:{self.port}"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cluster_id() -> str:
    """A random KRaft cluster id (a UUID in URL-safe base64), never starting with "-": the storage
    tool would read such an id as an option and refuse to format (1 start in 64 failed so)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _port_free(port: int) -> bool:
    """Whether the broker could listen on ``port`` now. SO_REUSEADDR as the JVM's server sockets
    set it: a port left in TIME_WAIT by the broker that just stopped is free to it (without the
    option a restarted broker moved to another port, and clients lost it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child (ours, not yet reaped) still answers kill(0).
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def _tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return "(no log written)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def java_version(java: str) -> int:
    out = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if not match:
        raise KafkaSetupError(f"could not read the Java version from `{java} -version`: {out.stderr.strip()}")
    major = int(match.group(1))
    return int(match.group(2) or 0) if major == 1 else major


class LocalKafka:
    """Fetches, formats, starts and stops the embedded broker of one Riverbed home.

    Not thread safe; one instance per process is enough. The broker outlives the process that
    started it (``riverbed kafka start``) until :meth:`stop`.
    """

    def __init__(self, config: EmbeddedKafkaConfig, cache_dir: Path, home: Path) -> None:
        self.config = config
        self.jar_dir = cache_dir / "kafka" / config.version / "libs"
        self.root = home / "kafka"
        self.data_dir = self.root / "data"
        self.log_file = self.root / "broker.log"
        self.state_file = self.root / "broker.json"

    # FETCH
    def fetch(self) -> Path:
        """Downloads the broker's jars once; later calls return at once."""
        marker = self.jar_dir / ".complete"
        if marker.exists():
            return self.jar_dir
        mvn = shutil.which("mvn")
        if mvn is None:
            raise KafkaSetupError(
                "Maven (`mvn`) is needed once to fetch Kafka's jars from Maven Central and was not "
                "found: install it (e.g. `apt-get install maven`), or set kafka.bootstrap_servers "
                "(RIVERBED_KAFKA__BOOTSTRAP_SERVERS) to use a broker you run yourself"
            )
        self._java()
        staging = self.jar_dir.with_name("libs.partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        pom = resources.files("cluster") / "kafka" / "pom.xml"
        with resources.as_file(pom) as pom_path:
            cmd = [
                mvn,
                "-q",
                "-B",
                "-f",
                str(pom_path),
                "dependency:copy-dependencies",
                f"-Dkafka.version={self.config.version}",
                f"-DoutputDirectory={staging}",
                "-DincludeScope=runtime",
            ]
            log.info("fetching Apache Kafka %s jars from Maven Central", self.config.version)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not list(staging.glob("kafka_2.13-*.jar")):
            raise KafkaSetupError(
                f"could not fetch Kafka {self.config.version} from Maven Central "
                f"(`{' '.join(cmd)}` exited {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}"
            )
        shutil.rmtree(self.jar_dir, ignore_errors=True)
        staging.rename(self.jar_dir)
        marker.touch()
        return self.jar_dir

    def _java(self) -> str:
        java = shutil.which("java")
        if java is None:
            raise KafkaSetupError(
                f"Java {MIN_JAVA}+ is needed to run the embedded Kafka broker and `java` was not found: "
                "install it (e.g. `apt-get install openjdk-17-jre-headless`), or set "
                "kafka.bootstrap_servers to use a broker you run yourself"
            )
        major = java_version(java)
        if major < MIN_JAVA:
            raise KafkaSetupError(f"Kafka 4 needs Java {MIN_JAVA}+, but `{java}` is Java {major}")
        return java

    # STATE
    def state(self) -> BrokerState | None:
        """The running broker of this home, or None (a stale state file is removed)."""
        try:
            state = BrokerState(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return None
        if not _pid_alive(state.pid):
            self.state_file.unlink(missing_ok=True)
            return None
        return state

    def _previous_ports(self) -> tuple[int, int] | None:
        try:
            cfg = (self.root / "server.properties").read_text()
        except OSError:
            return None
        broker = re.search(r"PLAINTEXT://127\.0\.0\.1:(\d+)", cfg)
        controller = re.search(r"CONTROLLER://127\.0\.0\.1:(\d+)", cfg)
        if broker and controller:
            return int(broker.group(1)), int(controller.group(1))
        return None

    def _choose_ports(self) -> tuple[int, int]:
        if self.config.port:
            if not _port_free(self.config.port):
                raise KafkaSetupError(
                    f"port {self.config.port} (kafka.embedded.port) is taken on 127.0.0.1: free it, "
                    "or set kafka.embedded.port=0 to pick a free one"
                )
            broker = self.config.port
        else:
            previous = self._previous_ports()
            # Reuse the last ports when free, so clients that remember the address keep working.
            broker = previous[0] if previous and _port_free(previous[0]) else _free_port()
        controller = _free_port()
        while controller == broker:
            controller = _free_port()
        return broker, controller

    def _write_config(self, port: int, controller_port: int) -> Path:
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            # One node: every internal topic has one replica and one partition (fast start).
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "share.coordinator.state.topic.num.partitions": "1",
            "group.initial.rebalance.delay.ms": "0",
            # Inline images travel in records: allow large ones (the consumer enforces its limit).
            "message.max.bytes": str(64 * 1024 * 1024),
            "replica.fetch.max.bytes": str(64 * 1024 * 1024),
            "auto.create.topics.enable": "false",
            "num.partitions": "1",
            "log.retention.hours": "-1",
        }
        path = self.root / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        (self.root / "log4j2.xml").write_text(_LOG4J2.format(log=self.log_file))
        return path

    def _jvm(self, java: str, main: str, *args: str) -> list[str]:
        return [
            java,
            f"-Xmx{self.config.heap}",
            f"-Xms{self.config.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.root / 'log4j2.xml'}",
            "-cp",
            f"{self.jar_dir}/*",
            main,
            *args,
        ]

    def _format(self, java: str, config_path: Path) -> None:
        if (self.data_dir / "meta.properties").exists():
            return
        cluster_id = _cluster_id()
        cmd = self._jvm(java, "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config_path))
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise KafkaSetupError(
                f"formatting Kafka storage in {self.data_dir} failed:\n{proc.stdout}{proc.stderr}"
            )

    # START / STOP
    def start(self) -> BrokerState:
        """Starts the broker (or returns the one already running) and waits until it answers a
        metadata request. Raises :class:`KafkaSetupError` with the log's last lines if it doesn't."""
        running = self.state()
        if running is not None:
            return running
        java = self._java()
        self.fetch()
        self.root.mkdir(parents=True, exist_ok=True)
        port, controller_port = self._choose_ports()
        config_path = self._write_config(port, controller_port)
        self._format(java, config_path)
        t0 = time.monotonic()
        with open(self.root / "broker.out", "ab") as out:
            proc = subprocess.Popen(
                self._jvm(java, "kafka.Kafka", str(config_path)),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # survives the CLI that started it; `stop` ends it
            )
        state = BrokerState(proc.pid, port, controller_port, self.config.version, time.time())
        self.state_file.write_text(json.dumps(asdict(state)))
        try:
            self._wait_ready(state, proc)
        except KafkaSetupError:
            self.stop()
            raise
        log.info(
            "Kafka %s up on %s in %.1f s",
            self.config.version,
            state.bootstrap_servers,
            time.monotonic() - t0,
        )
        return state

    def _wait_ready(self, state: BrokerState, proc: subprocess.Popen[bytes]) -> None:
        from kafka import KafkaAdminClient
        from kafka.errors import KafkaError

        deadline = time.monotonic() + self.config.start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise KafkaSetupError(
                    f"the Kafka broker exited with status {proc.returncode} while starting; "
                    f"last lines of {self.log_file}:\n{_tail(self.log_file)}\n"
                    f"{_tail(self.root / 'broker.out', 10)}"
                )
            if not _accepts(state.port):  # cheap check first: the client logs every refusal
                time.sleep(0.1)
                continue
            try:
                admin = KafkaAdminClient(
                    bootstrap_servers=state.bootstrap_servers,
                    request_timeout_ms=3000,
                    client_id="riverbed-readiness",
                )
                try:
                    admin.describe_cluster()
                finally:
                    admin.close()
                return
            except (KafkaError, OSError, ValueError):
                time.sleep(0.25)
        raise KafkaSetupError(
            f"the Kafka broker did not answer on {state.bootstrap_servers} within "
            f"{self.config.start_timeout_s:.0f} s; last lines of {self.log_file}:\n{_tail(self.log_file)}"
        )

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stops the broker with SIGTERM (a clean shutdown), SIGKILL after ``timeout_s``.
        Returns whether a broker was running."""
        try:
            state = BrokerState(**json.loads(self.state_file.read_text()))
        except (OSError, ValueError, TypeError):
            return False
        stopped = False
        if _pid_alive(state.pid):
            stopped = True
            os.kill(state.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while _pid_alive(state.pid) and time.monotonic() < deadline:
                self._reap(state.pid)
                time.sleep(0.1)
            if _pid_alive(state.pid):
                log.warning("Kafka broker %d did not stop in %.0f s; killing it", state.pid, timeout_s)
                os.kill(state.pid, signal.SIGKILL)
            self._reap(state.pid)
        self.state_file.unlink(missing_ok=True)
        return stopped

    @staticmethod
    def _reap(pid: int) -> None:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)

    def status(self) -> dict[str, object]:
        state = self.state()
        return {
            "running": state is not None,
            "bootstrap_servers": state.bootstrap_servers if state else None,
            "pid": state.pid if state else None,
            "version": self.config.version,
            "jars_cached": (self.jar_dir / ".complete").exists(),
            "data_dir": str(self.data_dir),
            "log": str(self.log_file),
        }
