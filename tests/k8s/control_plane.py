"""A real Kubernetes control plane on 127.0.0.1 for the k8s tier: etcd and kube-apiserver (built
and cached outside the clone by ``scripts/k8s-tools.sh``), reached with kubectl through a
kubeconfig that carries an admin token, and optionally the KubeRay operator watching it.

There is no kubelet, scheduler or controller manager: objects are stored, validated (OpenAPI
schemas, CEL rules, defaulting, admission) and reconciled by the operator, but no Pod ever runs.
Everything lives in a scratch directory and every process is killed on :meth:`close`."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "scripts" / "k8s-tools.sh"


def tool_paths() -> dict[str, str]:
    """The cached binaries k8s-tools.sh reports (``KUBE_APISERVER``, ``ETCD``, ``KUBERAY_OPERATOR``),
    only those that are built."""
    out = subprocess.run(["bash", str(TOOLS), "paths"], capture_output=True, text=True, check=True).stdout
    return dict(item.split("=", 1) for item in out.split())


def missing(*names: str) -> str | None:
    """Why the tier cannot run (kubectl or one of ``names`` is absent), or None."""
    if shutil.which("kubectl") is None:
        return "kubectl is not installed"
    paths = tool_paths()
    absent = [name for name in names if name not in paths]
    if absent:
        return f"{', '.join(absent)} not built: run `make k8s-tools` (scripts/k8s-tools.sh build)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ControlPlane:
    """etcd plus kube-apiserver in ``directory``; :meth:`kubectl` talks to it as an admin."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._processes: list[subprocess.Popen[bytes]] = []
        self._logs: list[Path] = []
        paths = tool_paths()
        etcd_port, peer_port, self.port = free_port(), free_port(), free_port()
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._start(
            "etcd",
            [paths["ETCD"], "--data-dir", str(directory / "etcd"), "--listen-client-urls", etcd_url,
             "--advertise-client-urls", etcd_url, "--listen-peer-urls", f"http://127.0.0.1:{peer_port}"],
        )  # fmt: skip
        key, public = directory / "sa.key", directory / "sa.pub"
        subprocess.run(["openssl", "genrsa", "-out", str(key), "2048"], capture_output=True, check=True)
        subprocess.run(
            ["openssl", "rsa", "-in", str(key), "-pubout", "-out", str(public)],
            capture_output=True,
            check=True,
        )
        token = secrets.token_hex(16)
        (directory / "tokens.csv").write_text(f'{token},admin,admin,"system:masters"\n')
        self._start(
            "kube-apiserver",
            [paths["KUBE_APISERVER"], f"--etcd-servers={etcd_url}", "--bind-address=127.0.0.1",
             "--advertise-address=127.0.0.1", f"--secure-port={self.port}",
             f"--cert-dir={directory / 'certs'}", "--service-account-issuer=https://kubernetes.default.svc",
             f"--service-account-key-file={public}", f"--service-account-signing-key-file={key}",
             "--service-cluster-ip-range=10.96.0.0/24", "--authorization-mode=RBAC",
             f"--token-auth-file={directory / 'tokens.csv'}",
             "--disable-admission-plugins=ServiceAccount", "--endpoint-reconciler-type=none"],
        )  # fmt: skip
        self.kubeconfig = directory / "kubeconfig"
        self.kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "clusters": [{"name": "local", "cluster": {
                        "server": f"https://127.0.0.1:{self.port}", "insecure-skip-tls-verify": True}}],
                    "users": [{"name": "admin", "user": {"token": token}}],
                    "contexts": [{"name": "local", "context": {"cluster": "local", "user": "admin"}}],
                    "current-context": "local",
                }
            )
        )  # fmt: skip
        self._wait_ready()

    def _start(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = self.directory / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self._processes.append(process)
        self._logs.append(log)
        return process

    def _wait_ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for process, log in zip(self._processes, self._logs, strict=True):
                if process.poll() is not None:
                    raise RuntimeError(f"{log.stem} exited {process.returncode}: {self.tail(log)}")
            if self.kubectl("get", "--raw", "/readyz", check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise RuntimeError(f"kube-apiserver not ready after {timeout_s:.0f} s: {self.tail(self._logs[-1])}")

    @staticmethod
    def tail(log: Path, lines: int = 15) -> str:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def kubectl(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout_s: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """``kubectl args`` against this control plane; with ``check``, a failure raises with its stderr."""
        done = subprocess.run(
            ["kubectl", f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin, capture_output=True, text=True, timeout=timeout_s,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} exited {done.returncode}: {done.stderr.strip()}")
        return done

    def install_crds(self, crds: Path, timeout_s: float = 120) -> list[str]:
        """Server-side apply of every CRD file under ``crds`` (one is too large for client-side
        apply's annotation), then waits until each is Established; returns their names."""
        names = []
        for path in sorted(crds.rglob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc.get("kind") == "CustomResourceDefinition":
                    names.append(doc["metadata"]["name"])
            self.kubectl("apply", "--server-side", "-f", str(path))
        deadline = time.monotonic() + timeout_s
        pending = set(names)
        while pending and time.monotonic() < deadline:
            for name in sorted(pending):
                established = self.kubectl(
                    "get", "crd", name, "-o",
                    "jsonpath={.status.conditions[?(@.type=='Established')].status}", check=False,
                ).stdout  # fmt: skip
                if established == "True":
                    pending.discard(name)
            time.sleep(0.2)
        if pending:
            raise AssertionError(f"CRDs not Established after {timeout_s:.0f} s: {sorted(pending)}")
        return names

    def start_operator(self, binary: str) -> Path:
        """The KubeRay operator against this control plane (no leader election, probes and
        metrics on free ports); returns its log."""
        process = self._start(
            "kuberay-operator",
            [binary, f"--kubeconfig={self.kubeconfig}", "--enable-leader-election=false",
             f"--metrics-addr=127.0.0.1:{free_port()}",
             f"--health-probe-bind-address=127.0.0.1:{free_port()}",
             "--log-stdout-encoder=console"],
        )  # fmt: skip
        time.sleep(1)
        if process.poll() is not None:
            raise RuntimeError(f"kuberay-operator exited {process.returncode}: {self.tail(self._logs[-1])}")
        return self._logs[-1]

    def close(self) -> None:
        """Stops every process (the API server's graceful shutdown is slow: a kill after 5 s)."""
        for process in reversed(self._processes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
