"""The local Ray head's life against real Ray: `riverbed down` stops only the head of its home (the
session's own Ray keeps running), a head started from another environment is restarted, and
`riverbed ps` names which index's actors hold the cluster.

The session's Ray (``ray_session``, started in this process with ``ray.init(address="local")``)
plays the other Ray on the machine that ``ray stop`` used to kill. Each head here is a real
``ray start --head`` (about 10 s) in the test's own home, with 1 logical CPU.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cluster import ray_runtime as rt
from cluster.cli import main
from cluster.ray_actors import actor_rows, describe_holders
from schemas.settings import Settings, load_settings


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """A home of its own; its head (if any) is stopped afterwards, whatever the test did."""
    monkeypatch.setenv("RAY_AUTH_MODE", "")  # a head sets these for its drivers; restored after
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "")
    settings = load_settings(overrides={"home": str(tmp_path / "home"), "ray": {"num_cpus": 1}})
    yield settings
    rt.stop_local_head(settings)


def _session_ray_answers() -> bool:
    import ray

    @ray.remote(num_cpus=0)
    def one() -> int:
        return 1

    return bool(ray.is_initialized() and ray.get(one.remote(), timeout=60) == 1)


def _alive(entries: list[dict]) -> list[int]:
    """The recorded processes still running (same pid and start time)."""
    alive = []
    for e in entries:
        try:
            if abs(psutil.Process(e["pid"]).create_time() - e["create_time"]) < 0.01:
                alive.append(e["pid"])
        except psutil.NoSuchProcess:
            continue
    return alive


def test_down_stops_only_the_head_of_its_home(
    ray_session: None, home: Settings, capsys, monkeypatch: pytest.MonkeyPatch
):
    for name in rt.LOG_MONITOR_ENVIRONMENT:  # the session's Ray set them in this process's environment
        monkeypatch.delenv(name, raising=False)
    address = rt.start_local_head(home)
    record = rt.read_head_record(home)
    assert record is not None and record["address"] == address
    assert record["session_dir"] and Path(record["session_dir"]).is_dir()
    assert record["environment"] == rt.head_environment(home).__dict__
    names = {e["name"] for e in record["processes"]}
    assert {"gcs_server", "raylet"} <= names
    # the head's log monitor looks for new log files every 2 s, not 10 times a second
    monitors = [p for p in rt.head_processes(record) if any("log_monitor" in a for a in p.cmdline())]
    assert monitors, [p.cmdline() for p in rt.head_processes(record)]
    for monitor in monitors:
        assert rt.LOG_MONITOR_ENVIRONMENT.items() <= monitor.environ().items()
    assert rt.start_local_head(home) == address  # same environment: reused

    argv = ["down", "--home", str(home.home), "--json", "--bootstrap-servers", "127.0.0.1:1"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["ray_stopped"] is True
    assert _alive(record["processes"]) == []
    assert rt.local_head_address(home) is None
    assert _session_ray_answers()  # the other Ray on the machine still runs


def test_head_of_another_environment_is_restarted(ray_session: None, home: Settings, caplog):
    first = rt.start_local_head(home)
    record = rt.read_head_record(home)
    assert record is not None
    record["environment"]["python"] = "/elsewhere/.venv/bin/python"  # as if another clone started it
    (home.state_dir / "ray.json").write_text(json.dumps(record))

    with caplog.at_level(logging.WARNING, logger="cluster.ray_runtime"):
        second = rt.start_local_head(home)
    assert "another environment" in caplog.text and "/elsewhere/.venv/bin/python" in caplog.text
    assert second != first
    assert _alive(record["processes"]) == []
    restarted = rt.read_head_record(home)
    assert restarted is not None and restarted["environment"] == rt.head_environment(home).__dict__
    assert rt.local_head_address(home) == second
    assert _session_ray_answers()


def test_ps_names_the_index_holding_cpus(ray_session: None, home: Settings, capsys):
    import ray

    @ray.remote
    class Holder:
        def ping(self) -> int:
            return 1

    held = Holder.options(name="tps/shard/0", num_cpus=0.05, namespace="riverbed").remote()
    try:
        ray.get(held.ping.remote(), timeout=60)
        rows = [r for r in actor_rows("riverbed") if r.group == "tps"]
        assert [(r.name, r.role, r.state, r.cpus) for r in rows] == [("tps/shard/0", "shard", "ALIVE", 0.05)]
        assert "index tps: 0.05 CPUs (1 shard 0.05)" in describe_holders(actor_rows("riverbed"))

        assert main(["ps", "--json", "--home", str(home.home)]) == 0
        data = json.loads(capsys.readouterr().out)
        assert any(h["group"] == "tps" and h["cpus"] == 0.05 for h in data["holdings"])
        assert data["free_cpus"] <= data["cpus"]
    finally:
        ray.kill(held)
