"""The local head's record, environment check and process matching, and the actor listing, without
Ray: pure functions, stand-in processes, and GCS messages built by hand."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest

from cluster import ray_runtime as rt
from cluster.cli import main
from cluster.ray_actors import (
    ActorRow,
    classify,
    describe_holders,
    format_rows,
    holdings,
    row_from_gcs,
)
from schemas.settings import load_settings

HERE = rt.Environment(python="/a/.venv/bin/python", package="/a", code="c0ffee", ray="2.60.0")


# ENVIRONMENT
def test_same_environment_has_no_differences():
    assert rt.environment_differences(HERE, HERE) == []


def test_each_difference_is_named():
    head = rt.Environment(python="/gone/.venv/bin/python", package="/b", code="beef", ray="2.59.0")
    found = rt.environment_differences(head, HERE)
    assert any("interpreter" in d and "/gone/.venv/bin/python (no longer exists)" in d for d in found)
    assert any("riverbed location" in d and "/b" in d for d in found)
    assert any(d.startswith("Ray: the head runs 2.59.0") for d in found)


def test_edited_code_differs():
    found = rt.environment_differences(replace(HERE, code="0ld"), HERE)
    assert found == ["riverbed code: the head runs version 0ld, this command c0ffee (edited)"]


def test_another_serve_data_plane_differs_and_older_records_have_none():
    proxy = load_settings(overrides={"serve": {"edge": "proxy"}})
    keyed = load_settings(overrides={"serve": {"auth": {"keys": [{"key": "k" * 32, "scopes": ["read"]}]}}})
    assert rt.serve_environment(proxy)["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    assert rt.serve_environment(keyed)["RAY_SERVE_ENABLE_HA_PROXY"] == "1"  # auto, with keys
    assert rt.serve_environment(keyed, local=False)["RAY_SERVE_ENABLE_HA_PROXY"] == "0"  # pods: named only
    head, here = (
        replace(HERE, serve=rt.serve_signature(proxy)),
        replace(HERE, serve=rt.serve_signature(keyed)),
    )
    [found] = rt.environment_differences(head, here)
    assert found.startswith("Serve data plane:") and "RAY_SERVE_ENABLE_HA_PROXY=0" in found
    old = {"address": "x:1", "environment": {k: v for k, v in here.__dict__.items() if k != "serve"}}
    recorded = rt.Environment.from_record(old)
    assert recorded is not None and rt.environment_differences(recorded, here) != []


def test_haproxy_files_and_ports_are_the_homes_own(tmp_path: Path):
    settings = load_settings(overrides={"home": str(tmp_path)})
    env = rt.haproxy_environment(settings)
    paths = [env[k] for k in env if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
    other = rt.haproxy_environment(load_settings(overrides={"home": str(tmp_path / "other")}))
    base = env["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"]
    assert all(p == base or Path(p).parent == Path(base) for p in paths)
    assert other["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] != base
    node_id = "f" * 56  # Ray puts each node's files below the directory; HAProxy's limit is 97
    assert all(len(str(Path(base) / node_id / Path(p).name)) <= 97 for p in paths)
    assert env["RAY_SERVE_HAPROXY_STATS_PORT"] != "8404" and env["RAY_SERVE_HAPROXY_METRICS_PORT"] != "9101"


def test_head_without_recorded_environment_differs():
    assert rt.Environment.from_record({"address": "127.0.0.1:1"}) is None
    assert "recorded no environment" in rt.environment_differences(None, HERE)[0]


def test_environment_round_trips_through_the_record():
    record = {"address": "x:1", "environment": HERE.__dict__}
    assert rt.Environment.from_record(json.loads(json.dumps(record))) == HERE


def test_current_environment_is_this_interpreter_and_clone():
    env = rt.current_environment()
    assert env.python == sys.executable
    assert (Path(env.package) / "cluster" / "ray_runtime.py").exists()
    assert len(env.code) == 16


def test_code_version_changes_with_any_source_and_ignores_other_files(tmp_path: Path):
    (tmp_path / "cluster").mkdir()
    (tmp_path / "cluster" / "a.py").write_text("x = 1\n")

    def version() -> str:
        rt.code_version.cache_clear()
        return rt.code_version(tmp_path, ("cluster",))

    first = version()
    (tmp_path / "cluster" / "notes.txt").write_text("not code")
    assert version() == first
    (tmp_path / "cluster" / "a.py").write_text("x = 2\n")
    second = version()
    assert second != first
    (tmp_path / "cluster" / "b.py").write_text("")
    assert version() not in (first, second)
    rt.code_version.cache_clear()


@pytest.fixture(autouse=True)
def _restore_ray_auth_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting or finding a head (and the CLI) sets these; they are restored after each test."""
    monkeypatch.setenv("RAY_AUTH_MODE", "")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "")


# START: REUSE OR RESTART
@pytest.fixture
def home_settings(tmp_path: Path):
    return load_settings(overrides={"home": str(tmp_path / "home")})


def _fake_head(monkeypatch: pytest.MonkeyPatch, settings, env: rt.Environment | None) -> list[str]:
    """A recorded, reachable head with ``env``; returns the log of stops and starts."""
    calls: list[str] = []
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    record = {"address": "127.0.0.1:7", "session_dir": "/tmp/ray/session_x"}
    if env is not None:  # started for these settings' Serve data plane unless ``env`` names another
        record["environment"] = (
            env if env.serve else replace(env, serve=rt.serve_signature(settings))
        ).__dict__
    (settings.state_dir / "ray.json").write_text(json.dumps(record))
    monkeypatch.setattr(rt, "_reachable", lambda address: True)
    monkeypatch.setattr(rt, "current_environment", lambda: HERE)
    monkeypatch.setattr(rt, "_stop_head", lambda record: calls.append(f"stop {record['address']}") or True)

    def start(settings, env: rt.Environment) -> str:
        calls.append(f"start {env.python}")
        return "127.0.0.1:8"

    monkeypatch.setattr(rt, "_start_head", start)
    return calls


def test_head_of_this_environment_is_reused(monkeypatch, home_settings):
    calls = _fake_head(monkeypatch, home_settings, HERE)
    assert rt.start_local_head(home_settings) == "127.0.0.1:7"
    assert calls == []


def test_head_of_another_environment_is_restarted_saying_why(monkeypatch, home_settings, caplog):
    calls = _fake_head(monkeypatch, home_settings, replace(HERE, python="/other/.venv/bin/python"))
    with caplog.at_level(logging.WARNING, logger="cluster.ray_runtime"):
        assert rt.start_local_head(home_settings) == "127.0.0.1:8"
    assert calls == ["stop 127.0.0.1:7", f"start {HERE.python}"]
    assert "another environment" in caplog.text and "/other/.venv/bin/python" in caplog.text


def test_head_of_an_older_riverbed_is_restarted(monkeypatch, home_settings):
    calls = _fake_head(monkeypatch, home_settings, None)
    assert rt.start_local_head(home_settings) == "127.0.0.1:8"
    assert calls[0] == "stop 127.0.0.1:7"


# WHICH PROCESSES ARE THE HEAD'S
SESSION = "/tmp/ray/session_2026-01-01_00-00-00_000000_1"


def test_processes_naming_the_session_or_gcs_address_belong():
    assert rt.belongs_to_head(["raylet", f"--session_dir={SESSION}"], SESSION, None)
    assert rt.belongs_to_head(["x", f"--store_socket_name={SESSION}/sockets/plasma"], SESSION, None)
    assert rt.belongs_to_head(
        ["python", "-m", "ray.util.client.server", "--address=127.0.0.1:6379"], SESSION, "127.0.0.1:6379"
    )
    assert rt.belongs_to_head(
        ["w", "--cmd=python w.py --gcs-address=127.0.0.1:6379 --x"], SESSION, "127.0.0.1:6379"
    )


def test_other_sessions_and_ports_do_not_belong():
    assert not rt.belongs_to_head(["raylet", f"--session_dir={SESSION}0"], SESSION, "127.0.0.1:6379")
    assert not rt.belongs_to_head(["raylet", f"--session_dir={SESSION}_b/logs"], SESSION, None)
    assert not rt.belongs_to_head(["m", "--gcs-address=127.0.0.1:63790"], SESSION, "127.0.0.1:6379")
    assert not rt.belongs_to_head(["m", "--gcs-address=127.0.0.1:6379"], SESSION, None)


def test_session_dir_is_read_from_the_gcs_server_of_the_port():
    gcs = ["gcs_server", "--log_dir=/t/s1/logs", "--gcs_server_port=41000", "--session-dir=/t/s1"]
    assert rt.session_dir_of_gcs(gcs, 41000) == "/t/s1"
    assert rt.session_dir_of_gcs(gcs, 4100) is None
    assert rt.session_dir_of_gcs(["gcs_server", "--log_dir=/t/s2/logs", "--gcs_server_port=5"], 5) == "/t/s2"


def test_stop_order_is_raylet_then_others_then_gcs():
    names = ["gcs_server", "python", "raylet", "ray::IDLE", "raylet"]
    assert rt.stop_order(names) == [[2, 4], [1, 3], [0]]
    assert rt.stop_order(["python"]) == [[0]]


def _stand_in(session_dir: str, child: bool = False) -> subprocess.Popen:
    """A process whose command line names ``session_dir`` (and, with ``child``, that has a child
    which does not), standing in for a Ray daemon."""
    code = "import subprocess, sys, time\n"
    if child:
        code += "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
    code += "time.sleep(60)\n"
    return subprocess.Popen([sys.executable, "-c", code, f"--session-dir={session_dir}"])


def _wait_children(proc: subprocess.Popen, n: int) -> list[psutil.Process]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        children = psutil.Process(proc.pid).children(recursive=True)
        if len(children) >= n:
            return children
        time.sleep(0.05)
    raise AssertionError("stand-in child did not start")


def test_down_stops_exactly_the_recorded_head_and_its_children(tmp_path: Path):
    ours_dir, theirs_dir = str(tmp_path / "session_ours"), str(tmp_path / "session_ours_2")
    ours, theirs = _stand_in(ours_dir, child=True), _stand_in(theirs_dir)
    try:
        (child,) = _wait_children(ours, 1)
        settings = load_settings(overrides={"home": str(tmp_path / "home")})
        settings.state_dir.mkdir(parents=True)
        record = {"address": "127.0.0.1:1", "session_dir": ours_dir}
        (settings.state_dir / "ray.json").write_text(json.dumps(record))

        assert {p.pid for p in rt.head_processes(record)} == {ours.pid, child.pid}
        assert rt.stop_local_head(settings) is True
        assert ours.wait(timeout=5) is not None
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
        assert theirs.poll() is None  # another session's process keeps running
        assert not (settings.state_dir / "ray.json").exists()
        assert rt.stop_local_head(settings) is False  # idempotent
    finally:
        for p in (ours, theirs):
            p.kill()
            p.wait()


def test_recorded_pids_count_only_with_their_start_time(tmp_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = psutil.Process(proc.pid).create_time()
        record = {"address": "127.0.0.1:1", "session_dir": None, "processes": []}
        record["processes"] = [{"pid": proc.pid, "create_time": started - 5.0}]  # a reused pid
        assert rt.head_processes(record) == []
        record["processes"] = [{"pid": proc.pid, "create_time": started}]
        assert [p.pid for p in rt.head_processes(record)] == [proc.pid]
    finally:
        proc.kill()
        proc.wait()


def test_down_without_a_head_says_so(tmp_path: Path, capsys):
    assert main(["down", "--home", str(tmp_path / "h"), "--json", "--bootstrap-servers", "127.0.0.1:1"]) == 0
    assert json.loads(capsys.readouterr().out) == {"ray_stopped": False, "kafka_stopped": False}


def test_ps_without_a_head_starts_nothing(tmp_path: Path):
    # In a process of its own: in this one, another test may have connected to a Ray already.
    home = tmp_path / "h"
    out = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "ps", "--home", str(home), "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout) == {"ray": None, "actors": [], "holdings": []}
    assert not (home / "state" / "ray.json").exists()


# WHO HOLDS THE CLUSTER
def _row(name: str, group: str, role: str, cpus: float, state: str = "ALIVE", gpus: float = 0.0) -> ActorRow:
    return ActorRow(name, "riverbed", group, role, state, "127.0.0.1", cpus, gpus, 42, True, "C")


def test_actor_names_give_index_and_role():
    assert classify("squad/embedder/0", "riverbed", "EmbedderActor", "riverbed") == ("squad", "embedder")
    assert classify("a-b_1/shard/12", "riverbed", "ShardActor", "riverbed") == ("a-b_1", "shard")
    assert classify("squad/shard/0", "other", "ShardActor", "riverbed") == ("(other)", "ShardActor")
    assert classify("SERVE_REPLICA::riverbed#x", "serve", "ServeReplica:riverbed:Retriever", "riverbed") == (
        "serve",
        "Retriever",
    )
    assert classify("", "", "Foo", "riverbed") == ("(anonymous)", "Foo")


def test_row_from_a_gcs_actor_message():
    from ray.core.generated import gcs_pb2

    data = gcs_pb2.ActorTableData(
        name="squad/embedder/0",
        ray_namespace="riverbed",
        class_name="EmbedderActor",
        state=gcs_pb2.ActorTableData.ActorState.Value("ALIVE"),
        pid=1234,
        is_detached=True,
        required_resources={"CPU": 2.0, "GPU": 0.5},
    )
    data.address.ip_address = "10.0.0.2"
    row = row_from_gcs(data, "riverbed")
    assert (row.group, row.role, row.state, row.node, row.cpus, row.gpus, row.pid) == (
        "squad",
        "embedder",
        "ALIVE",
        "10.0.0.2",
        2.0,
        0.5,
        1234,
    )


def test_holdings_count_only_alive_actors_largest_first():
    rows = [
        _row("a/shard/0", "a", "shard", 0.05),
        _row("a/shard/1", "a", "shard", 0.05),
        _row("b/embedder/0", "b", "embedder", 2.0),
        _row("b/shard/0", "b", "shard", 0.05, state="RESTARTING"),
        _row("c/source/0", "c", "source", 0.05, state="PENDING_CREATION"),
    ]
    held = holdings(rows)
    assert [(h.group, round(h.cpus, 3)) for h in held] == [("b", 2.0), ("a", 0.1), ("c", 0.0)]
    assert held[0].roles == {"embedder": 1, "shard": 1}
    assert held[0].as_dict()["cpus_by_role"] == {"embedder": 2.0}


def test_holders_are_described_for_an_error_message():
    rows = [_row("b/embedder/0", "b", "embedder", 2.0), _row("b/shard/0", "b", "shard", 0.05)]
    rows += [_row(f"i{i}/shard/0", f"i{i}", "shard", 0.05) for i in range(8)]
    text = describe_holders(rows, limit=2)
    assert text.startswith("index b: 2.05 CPUs (1 embedder 2, 1 shard 0.05); index i0: 0.05 CPUs")
    assert text.endswith("; and 7 more")
    assert describe_holders([]) == "no actor"
    assert "1 GPUs" in describe_holders([_row("g/embedder/0", "g", "embedder", 1.0, gpus=1.0)])


def test_rows_are_formatted_as_a_table():
    text = format_rows([_row("b/embedder/0", "b", "embedder", 2.0)])
    header, line = text.splitlines()
    assert header.split() == ["NAME", "INDEX", "ROLE", "STATE", "NODE", "CPUS", "GPUS", "PID"]
    assert line.split() == ["b/embedder/0", "b", "embedder", "ALIVE", "127.0.0.1", "2", "0", "42"]
    long = format_rows([_row("SERVE_PROXY_ACTOR-" + "f" * 56, "serve", "ProxyActor", 0.0)])
    assert long.splitlines()[1].split()[0] == "SERVE_PROXY_ACTOR-" + "f" * 29 + "…"
