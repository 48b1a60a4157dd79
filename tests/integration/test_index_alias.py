"""A new embedding model goes live without downtime: the topic is replayed into a second index
with another model while the first serves, then the alias the app serves moves to it under load.

The second model is MiniLM saved to a directory: the same weights under another name (a path), so
the two indexes record different models and `/v1/models` tells which one answers."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter

import httpx
import pytest

from actors.index_alias import read_alias
from actors.models import resolve_model
from cluster.index_admin import SWITCH_GRACE_S, check_reindex_target, list_indexes, move_alias, release_index
from cluster.pipeline import Pipeline
from schemas.errors import ConfigError
from schemas.settings import load_settings
from schemas.topology import actor_name
from tests.integration.conftest import _dump, free_port
from tests.integration.ingest_helpers import produce, squad_documents

N_DOCS = 12
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _ingest(settings) -> None:
    pipeline = Pipeline(settings)
    pipeline.start()
    try:
        pipeline.wait_idle(timeout_s=600, interval_s=0.5)
    finally:
        pipeline.stop()


def test_reindex_with_a_new_model_then_moving_the_alias_under_load_fails_no_request(
    pipeline_settings, tmp_path
):
    import ray
    from ray import serve
    from sentence_transformers import SentenceTransformer

    from cluster.serving import start_serving

    new_model = tmp_path / "minilm-copy"
    SentenceTransformer(resolve_model(MINILM).location).save(str(new_model))
    old_name = pipeline_settings.index.name
    new_name = f"{old_name}-v2"
    settings = load_settings(
        overrides={
            **_dump(pipeline_settings),
            "index": {**_dump(pipeline_settings)["index"], "alias": "live", "alias_check_s": 0.5},
            "serve": {"port": free_port(), "ingest": False},
        }
    )
    docs = squad_documents(N_DOCS, prefix="alias-")
    produce(settings, docs)
    _ingest(settings)  # the first index, with the configured model

    move_alias(settings, "live", old_name)
    # the served index is never a reindex target; the new one is built beside it
    with pytest.raises(ConfigError, match="is served"):
        check_reindex_target(settings, old_name, str(new_model))
    _ingest(check_reindex_target(settings, new_name, str(new_model)))

    rows = {r["index"]: r for r in list_indexes(settings)}
    assert rows[old_name]["model"] == MINILM and rows[new_name]["model"] == str(new_model)
    assert rows[old_name]["chunks"] == rows[new_name]["chunks"] > 0 and rows[new_name]["lag"] == 0
    assert rows[old_name]["aliases"] == ["live"] and rows[new_name]["aliases"] == []

    serving = start_serving(settings, ingest=False)
    url = serving.url
    statuses: Counter[int] = Counter()
    models: list[str] = []
    stop = threading.Event()

    def client(i: int) -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                answer = http.post(f"{url}/v1/search", json={"query": docs[i % N_DOCS].text[:120], "k": 3})
                statuses[answer.status_code] += 1

    def watch_models() -> None:
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                models.append(http.get(f"{url}/v1/models").json()["data"][0]["id"])
                time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    threads.append(threading.Thread(target=watch_models))
    try:
        for t in threads:
            t.start()
        time.sleep(5)
        assert move_alias(settings, "live", new_name)["previous"] == old_name
        deadline = time.monotonic() + 120
        while (not models or models[-1] != str(new_model)) and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # and it keeps answering from the new index
        # the old index's shards are released while the clients go on: no request notices
        with pytest.raises(ConfigError, match="is served"):
            release_index(settings, new_name)
        with pytest.raises(ConfigError, match="moved from index"):
            release_index(settings, old_name)  # replicas get alias_check_s + a grace to switch
        # the one replica has switched (its /v1/models says so): past the grace, as an operator would
        released = release_index(settings, old_name, now=time.time() + 0.5 + SWITCH_GRACE_S)
        time.sleep(3)
        running = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
        serving.stop()
        serve.shutdown()
        for name in (old_name, new_name):
            for i in range(settings.index.n_shards):
                with contextlib.suppress(ValueError):
                    ray.kill(ray.get_actor(actor_name(name, "shard", i), namespace=settings.ray.namespace))
    assert read_alias(settings.state_dir, "live") == new_name
    old_shards = {actor_name(old_name, "shard", i) for i in range(settings.index.n_shards)}
    assert set(released["stopped"]) == old_shards and not old_shards & running
    assert actor_name(new_name, "shard", 0) in running
    assert {r["index"]: r for r in list_indexes(settings)}[old_name]["chunks"] > 0  # its data stays
    assert models[0] == MINILM and models[-1] == str(new_model), models
    assert set(statuses) == {200} and statuses[200] > 20, statuses
