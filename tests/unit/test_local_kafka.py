"""LocalKafka's checks that need no broker: missing tools, taken ports, stale state."""

import json
import os
import socket

import pytest

from cluster.local_kafka import LocalKafka, java_version
from schemas.errors import KafkaSetupError
from schemas.settings import EmbeddedKafkaConfig


def make(tmp_path, **cfg):
    return LocalKafka(EmbeddedKafkaConfig(**cfg), tmp_path / "cache", tmp_path / "home")


def test_no_java_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH
    with pytest.raises(KafkaSetupError, match="Java 17"):
        make(tmp_path).start()


def test_no_mvn_says_how_to_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KafkaSetupError, match="Maven"):
        make(tmp_path).fetch()


def test_port_taken(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        kafka = make(tmp_path, port=port)
        with pytest.raises(KafkaSetupError, match=f"port {port}"):
            kafka._choose_ports()


def test_stale_state_file_is_not_running(tmp_path):
    kafka = make(tmp_path)
    kafka.root.mkdir(parents=True)
    # A pid that cannot be alive: larger than pid_max.
    kafka.state_file.write_text(
        json.dumps(
            {
                "pid": 2**22 + 7,
                "port": 1,
                "controller_port": 2,
                "version": "4.4.0",
                "started_at": 0.0,
            }
        )
    )
    assert kafka.state() is None
    assert not kafka.state_file.exists()
    assert kafka.status()["running"] is False
    assert kafka.stop() is False


def test_java_version_parses(tmp_path):
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\necho 'openjdk version \"1.8.0_392\"' >&2\n")
    fake.chmod(0o755)
    assert java_version(str(fake)) == 8
    fake.write_text("#!/bin/sh\necho 'openjdk version \"21.0.2\" 2024-01-16' >&2\n")
    assert java_version(str(fake)) == 21


def test_old_java_refused(tmp_path, monkeypatch):
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\necho 'java version \"11.0.2\"' >&2\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(KafkaSetupError, match="Java 11"):
        make(tmp_path).start()


def test_cluster_ids_never_look_like_an_option():
    from cluster.local_kafka import _cluster_id

    ids = [_cluster_id() for _ in range(2000)]  # about 31 of 2,000 random ids start with "-"
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(i) == 22 for i in ids) and len(set(ids)) == len(ids)
