"""The Prometheus text of a fixed pipeline snapshot, and the /healthz verdict over shard and source
figures (no Ray, no broker: the functions the ingress calls with what the actors answered)."""

from __future__ import annotations

from deployments.metrics import HttpMetrics, health_report, render_snapshot

SNAPSHOT = {
    "index": "wiki",
    "committed": {"docs": {0: 40, 1: 35}},
    "ends": {"docs": {0: 50, 1: 35}},
    "shards": [
        {"shard": 0, "status": "ok", "problem": None, "chunks": 120, "vectors": 120, "documents": 30},
        {
            "shard": 1,
            "status": "degraded",
            "problem": "disk full: quota 4096 pages",
            "chunks": 80,
            "vectors": 79,
            "documents": 20,
        },
        {"shard": 2, "status": "unavailable", "problem": "its actor is restarting"},
    ],
    "sources": [
        {
            "source": 0,
            "records": 75,
            "documents": 50,
            "chunks": 200,
            "deletes": 2,
            "unchanged": 3,
            "batches": 9,
            "in_flight_batches": 1,
            "phase": "writing",
            "phase_s": 42.5,
            "retries": {"writing": 7, "embedding": 2},
            "stalled": "writing: shard 1 disk full",
        },
        {"source": 1, "records": 0, "phase": "polling", "phase_s": 0.2, "retries": {}, "stalled": None},
    ],
    "dead_letters": {"invalid_json": 2, "processing_error": 1},
}


def samples(text: bytes) -> list[str]:
    return [line for line in text.decode().splitlines() if line and not line.startswith("#")]


def test_a_fixed_snapshot_renders_exactly_these_samples():
    got = samples(render_snapshot(SNAPSHOT))
    w = 'index="wiki"'
    expected = [
        f'riverbed_consumer_lag{{{w},partition="0",topic="docs"}} 10.0',
        f'riverbed_consumer_lag{{{w},partition="1",topic="docs"}} 0.0',
        f'riverbed_committed_offset{{{w},partition="0",topic="docs"}} 40.0',
        f'riverbed_committed_offset{{{w},partition="1",topic="docs"}} 35.0',
        f'riverbed_index_chunks{{{w},shard="0"}} 120.0',
        f'riverbed_index_chunks{{{w},shard="1"}} 80.0',
        f'riverbed_index_vectors{{{w},shard="0"}} 120.0',
        f'riverbed_index_vectors{{{w},shard="1"}} 79.0',
        f'riverbed_index_documents{{{w},shard="0"}} 30.0',
        f'riverbed_index_documents{{{w},shard="1"}} 20.0',
        *(
            f'riverbed_shard_status{{{w},shard="{shard}",status="{status}"}} {value}'
            for shard, current in ((0, "ok"), (1, "degraded"), (2, "unavailable"))
            for status in ("ok", "degraded", "unavailable")
            for value in ["1.0" if status == current else "0.0"]
        ),
        f'riverbed_dead_letters_total{{{w},reason="invalid_json"}} 2.0',
        f'riverbed_dead_letters_total{{{w},reason="processing_error"}} 1.0',
        *(
            f'riverbed_ingest_total{{{w},kind="{kind}",source="0"}} {n}.0'
            for kind, n in (
                ("records", 75),
                ("documents", 50),
                ("chunks", 200),
                ("deletes", 2),
                ("unchanged", 3),
                ("batches", 9),
            )
        ),
        *(
            f'riverbed_ingest_total{{{w},kind="{kind}",source="1"}} 0.0'
            for kind in ("records", "documents", "chunks", "deletes", "unchanged", "batches")
        ),
        f'riverbed_ingest_in_flight_batches{{{w},source="0"}} 1.0',
        f'riverbed_ingest_in_flight_batches{{{w},source="1"}} 0.0',
        f'riverbed_ingest_retries_total{{{w},phase="embedding",source="0"}} 2.0',
        f'riverbed_ingest_retries_total{{{w},phase="writing",source="0"}} 7.0',
        f'riverbed_ingest_stalled{{{w},phase="writing",source="0"}} 1.0',
        f'riverbed_ingest_stalled{{{w},phase="polling",source="1"}} 0.0',
        f'riverbed_ingest_phase_seconds{{{w},phase="writing",source="0"}} 42.5',
        f'riverbed_ingest_phase_seconds{{{w},phase="polling",source="1"}} 0.2',
    ]
    assert got == expected


def test_every_family_has_help_and_type():
    text = render_snapshot(SNAPSHOT).decode()
    for family, kind in (
        ("riverbed_index_vectors", "gauge"),
        ("riverbed_shard_status", "gauge"),
        ("riverbed_ingest_retries_total", "counter"),
        ("riverbed_ingest_stalled", "gauge"),
        ("riverbed_ingest_phase_seconds", "gauge"),
    ):
        assert f"# TYPE {family} {kind}" in text and f"# HELP {family} " in text


def test_a_snapshot_from_older_actors_still_renders():
    old = {"index": "x", "shards": [{"shard": 0, "chunks": 5, "documents": 2}], "sources": [{"records": 3}]}
    got = samples(render_snapshot(old))
    assert 'riverbed_index_chunks{index="x",shard="0"} 5.0' in got
    assert not any(line.startswith("riverbed_index_vectors{") for line in got)
    assert 'riverbed_shard_status{index="x",shard="0",status="ok"} 1.0' in got
    assert 'riverbed_ingest_stalled{index="x",phase="unknown",source="0"} 0.0' in got
    assert not any(line.startswith("riverbed_ingest_retries_total{") for line in got)


def test_request_metrics_and_the_snapshot_render_together():
    metrics = HttpMetrics()
    metrics.observe("/v1/search", "POST", 503, 0.02)
    text = metrics.render(SNAPSHOT).decode()
    assert 'riverbed_http_requests_total{method="POST",route="/v1/search",status="503"} 1.0' in text
    assert 'riverbed_ingest_stalled{index="wiki",phase="writing",source="0"} 1.0' in text
    assert "riverbed_consumer_lag" not in metrics.render(None).decode()


OK_SHARDS = [
    {"shard": 0, "status": "ok", "problem": None, "chunks": 10, "vectors": 10},
    {"shard": 1, "status": "ok", "problem": None, "chunks": 7, "vectors": 7},
]


def test_healthy_is_200_ok_with_the_totals():
    status, body = health_report("wiki", OK_SHARDS, [{"source": 0, "phase": "polling", "stalled": None}])
    assert status == 200
    assert body == {
        "status": "ok",
        "index": "wiki",
        "shards": 2,
        "chunks": 17,
        "vectors": 17,
        "sources": 1,
        "problems": [],
    }


def test_a_full_disk_on_a_shard_degrades_naming_it():
    shards = [OK_SHARDS[0], {**OK_SHARDS[1], "status": "degraded", "problem": "disk full: quota reached"}]
    status, body = health_report("wiki", shards)
    assert status == 503 and body["status"] == "degraded"
    assert body["problems"] == ["shard 1: degraded: disk full: quota reached"]
    assert body["error"] == {"code": "index_degraded", "message": body["problems"][0], "param": None}


def test_a_stalled_source_degrades_naming_its_phase():
    source = {"source": 1, "phase": "writing", "phase_s": 63.0, "stalled": "shard 1 disk full"}
    status, body = health_report("wiki", OK_SHARDS, [source])
    assert status == 503 and body["status"] == "degraded"
    assert body["problems"] == ["source 1: stalled in writing for 63 s: shard 1 disk full"]


def test_an_unavailable_shard_makes_the_index_unavailable_and_every_problem_is_named():
    shards = [
        {"shard": 0, "status": "unavailable", "problem": "store holds offset 10 but 40 were committed"},
        {**OK_SHARDS[1], "status": "degraded", "problem": "disk full"},
    ]
    status, body = health_report("wiki", shards, [], ["source 0: did not answer its stats within 5 s"])
    assert status == 503 and body["status"] == "unavailable"
    assert body["error"]["code"] == "index_unavailable"
    assert body["problems"] == [
        "shard 0: unavailable: store holds offset 10 but 40 were committed",
        "shard 1: degraded: disk full",
        "source 0: did not answer its stats within 5 s",
    ]
    assert body["chunks"] == 7


def test_a_graph_shard_in_trouble_degrades_the_app_but_leaves_search_available():
    graph = [
        {"shard": 0, "status": "ok", "problem": None, "chunks": 30},
        {"shard": 1, "status": "unavailable", "problem": "holds no store, but the group committed 40"},
    ]
    status, body = health_report("wiki", OK_SHARDS, [], [], graph)
    assert status == 503 and body["status"] == "degraded" and body["error"]["code"] == "index_degraded"
    assert body["problems"] == ["graph shard 1: unavailable: holds no store, but the group committed 40"]
    assert body["chunks"] == 17, "the graph's chunks are not the index's"
    assert health_report("wiki", OK_SHARDS, [], [], graph[:1])[0] == 200


def test_no_shards_is_unavailable():
    status, body = health_report("wiki", [])
    assert status == 503 and body["status"] == "unavailable" and body["problems"]
