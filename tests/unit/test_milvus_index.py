"""What only the Milvus backend has to get right (the shared contract runs in
test_backend_milvus, embedded and by uri): a write or an opening cut off at any call is completed
by doing it again, ids that a Milvus expression must escape, Milvus going away, values too long for Milvus,
Strong reads for what a write decides by, counts kept in step, fsyncs of Milvus Lite's files, one
writer at a time, collection names per index and shard, what each Milvus failure is raised as,
BM25 with a title weight, the approximate index types once flushed, ``stored_state``, and the
embedded data dir handed back on close. On a real Milvus Lite, embedded in the shard directory or
served over gRPC as a server is (``milvus_server``)."""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pymilvus.exceptions import MilvusException, ParamError
from pymilvus.grpc_gen.common_pb2 import Status

from actors.failures import classify
from actors.milvus_client import error_class
from actors.milvus_index import DB_NAME, MilvusIndex, collection_names, stored_state
from actors.milvus_layout import BATCH, MAX_VARCHAR_BYTES, sized_batches
from actors.milvus_words import analyzer
from actors.testing import InMemoryIndex
from actors.vector_index import ChunkRecord, DocumentRow, KeywordSearch, ShardWrite, VectorIndex
from schemas.errors import (
    ConfigError,
    IndexUnavailableError,
    ProcessingError,
    RetryableError,
    StorageFullError,
)
from schemas.filters import MetadataFilter
from schemas.ids import chunk_id
from schemas.settings import MilvusConfig
from tests.contract.helpers import (
    DIM,
    MODEL,
    StallingRelay,
    make_corpus,
    make_document,
    milvus_grpc_server,
    scratch_dir,
    unit,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def shard() -> Iterator[Path]:
    with scratch_dir() as directory:
        yield directory / "shard-0"


@pytest.fixture
def opened(shard: Path) -> Iterator[Callable[..., MilvusIndex]]:
    """Opens MilvusIndex objects on ``shard`` (config fields as keywords); closes them after."""
    indexes: list[MilvusIndex] = []

    def _open(**config: Any) -> MilvusIndex:
        indexes.append(MilvusIndex(shard, MODEL, DIM, MilvusConfig(**config)))
        return indexes[-1]

    yield _open
    for index in indexes:
        index.close()


def state(index: VectorIndex, chunk_ids: list[str], documents: list[str]) -> tuple[object, ...]:
    """Everything a reader can ask of ``index`` about these chunks and documents."""
    return (
        index.get(chunk_ids),
        index.count(),
        index.document_ids(),
        index.get_document_rows(documents),
        index.get_document_versions(documents),
        index.offsets(),
    )


class FailingClient:
    """The real pymilvus client, except that its ``fail_at``-th write call (upsert or delete)
    raises as a dropped connection does, before reaching Milvus."""

    def __init__(self, client: Any, fail_at: int) -> None:
        self.client, self.fail_at, self.writes = client, fail_at, 0

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)
        if name not in ("upsert", "delete"):
            return method

        def write(*args: Any, **kwargs: Any) -> Any:
            self.writes += 1
            if self.writes == self.fail_at:
                raise ConnectionError("connection reset (injected)")
            return method(*args, **kwargs)

        return write


def two_writes() -> tuple[ShardWrite, ShardWrite]:
    """A first write of versioned documents, then one that uses every part of a ShardWrite."""
    rng = np.random.default_rng(40)
    docs = {d: make_document(rng, d, 4) for d in ("a", "b", "c", "d")}
    first = ShardWrite(
        upserts=[r for records in docs.values() for r in records],
        documents={d: DocumentRow(f"h-{d}", 4, ("docs", 0, i)) for i, d in enumerate(docs)},
        versions={d: ("docs", 0, i) for i, d in enumerate(docs)},
        offsets={"docs": {0: 4}},
    )
    shorter = make_document(rng, "a", 2, text="shorter")
    second = ShardWrite(
        upserts=[*shorter, *make_document(rng, "e", 3), docs["c"][0]],  # c#0 unchanged
        truncate={"a": 2, "d": 9},  # d: nothing to cut
        delete_documents=["b"],
        delete_chunks=[docs["c"][3].chunk_id, "never#0"],
        documents={"a": DocumentRow("h-a2", 2, ("docs", 0, 10)), "e": DocumentRow("h-e", 3)},
        versions={"a": ("docs", 0, 10), "b": ("docs", 0, 11), "d": ("docs", 0, 1)},  # d's is stale
        offsets={"docs": {0: 12, 1: 3}},
    )
    return first, second


def test_a_write_cut_off_at_any_call_is_completed_by_applying_it_again(
    opened: Callable[..., MilvusIndex], shard: Path
) -> None:
    first, second = two_writes()
    reference = InMemoryIndex(MODEL, DIM)
    reference.apply(first)
    want_result = reference.apply(second)
    chunk_ids = sorted({r.chunk_id for w in (first, second) for r in w.upserts} | {"never#0"})
    documents = ["a", "b", "c", "d", "e", "never"]
    want = state(reference, chunk_ids, documents)

    clean = opened()
    clean.apply(first)
    counting = FailingClient(clean._client, fail_at=0)
    clean._client = counting
    assert clean.apply(second) == want_result
    assert state(clean, chunk_ids, documents) == want
    assert counting.writes >= 4  # chunk delete, chunk upsert, ledger rows, offsets at least
    clean.close()

    for fail_at in range(1, counting.writes + 1):
        index = opened(collection_prefix=f"cut{fail_at}")
        index.apply(first)
        real = index._client
        index._client = FailingClient(real, fail_at)
        with pytest.raises(RetryableError, match=r"milvus shard 0 \(cut\d+_0_chunks.*connection reset"):
            index.apply(second)
        index._client = real
        assert index.offsets() == {"docs": {0: 4}}  # written last: the stream will deliver it again
        index.apply(second)
        assert state(index, chunk_ids, documents) == want, f"cut off at write call {fail_at}"
        assert index.keyword_search(["shorter"], 10)[0][0].document_id == "a"


def test_ids_that_need_escaping_in_expressions(opened: Callable[..., MilvusIndex]) -> None:
    index = opened()
    rng = np.random.default_rng(41)
    odd = 'q"uo\\te\'s #1 ]) or chunk_id != "'  # quotes, a backslash, '#', an attempt at injection
    records = make_document(rng, odd, 3) + make_document(rng, "plain", 2)
    index.apply(
        ShardWrite(
            upserts=records,
            documents={odd: DocumentRow("h", 3)},
            versions={odd: ("docs", 0, 5)},
            offsets={'to"pic': {0: 1}},
        )
    )
    assert index.get([r.chunk_id for r in records]) == records
    assert index.document_chunk_counts([odd, "plain"]) == {odd: 3, "plain": 2}
    assert index.get_document_rows([odd]) == {odd: DocumentRow("h", 3)}
    assert index.offsets() == {'to"pic': {0: 1}}
    paged, after = [], ""
    while page := index.scan_chunks(after, 1):
        paged += page
        after = page[-1].chunk_id
    assert paged == sorted(records, key=lambda r: r.chunk_id)
    assert [e.document_id for e in index.scan_documents("", 10)] == [odd]
    assert index.apply(ShardWrite(truncate={odd: 1})).deleted == 2
    assert index.apply(ShardWrite(delete_chunks=[chunk_id(odd, 0)])).deleted == 1
    assert index.document_ids() == {"plain"}
    assert index.apply(ShardWrite(delete_documents=[odd], versions={odd: ("docs", 0, 6)})).deleted == 0
    assert index.get_document_rows([odd]) == {} and index.count() == 2


def test_a_server_that_cannot_be_reached_is_retryable(shard: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = MilvusConfig(uri=f"http://127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(
        RetryableError, match=rf"milvus shard 3 \(riverbed_ix_3_chunks at http://127.0.0.1:{port}"
    ):
        MilvusIndex(shard, MODEL, DIM, config, index_name="ix", shard=3)
    assert not shard.exists()  # with a server nothing is written on the node


def test_a_call_past_its_timeout_is_retryable_and_the_next_one_goes_through(shard: Path) -> None:
    """A server that stops answering (reached through a relay that holds every byte while it
    stalls): a read on the open shard and an opening both fail within their timeout as retryable
    errors that name the shard; once it answers again the same index reads what it wrote."""
    with milvus_grpc_server() as uri:
        relay = StallingRelay(int(uri.rsplit(":", 1)[1]))
        config = MilvusConfig(uri=f"http://127.0.0.1:{relay.port}", timeout_s=1)
        index = MilvusIndex(shard, MODEL, DIM, config)
        try:
            corpus = make_corpus(n_docs=3)
            index.apply(ShardWrite(upserts=corpus, offsets={"docs": {0: 3}}))
            where = rf"milvus shard 0 \(riverbed_0_chunks at http://127.0.0.1:{relay.port}\)"
            with relay.stall():
                with pytest.raises(RetryableError, match=where):
                    index.get([corpus[0].chunk_id])
                with pytest.raises(RetryableError, match=where):
                    MilvusIndex(shard, MODEL, DIM, config)
            assert index.get([r.chunk_id for r in corpus]) == corpus
        finally:
            index.close()
            relay.close()


def test_milvus_going_away_under_an_open_shard_is_retryable_and_loses_nothing(
    opened: Callable[..., MilvusIndex], shard: Path
) -> None:
    from milvus_lite.server_manager import server_manager_instance

    index = opened()
    corpus = make_corpus(n_docs=5)
    index.apply(ShardWrite(upserts=corpus, offsets={"docs": {0: 5}}))
    server_manager_instance.release_server(str((shard / DB_NAME).absolute()))  # as if Milvus died
    with pytest.raises(RetryableError, match="riverbed_0_chunks"):
        index.get([corpus[0].chunk_id])
    with pytest.raises(RetryableError):
        index.apply(ShardWrite(offsets={"docs": {0: 6}}))
    index.close()
    reopened = opened()
    assert reopened.get([r.chunk_id for r in corpus]) == corpus and reopened.offsets() == {"docs": {0: 5}}


def test_values_longer_than_milvus_stores_are_refused_before_writing(
    opened: Callable[..., MilvusIndex],
) -> None:
    index = opened()
    v = unit(np.random.default_rng(42), 2)
    longest = ChunkRecord("d#0", "d", 0, "é" * 32767 + "a", None, 0, 32768, {}, v[0])  # 65535 bytes
    too_long = ChunkRecord("d#1", "d", 1, "é" * 32768, None, 0, 32768, {}, v[1])  # 32768 chars, 65536 bytes
    with pytest.raises(ProcessingError, match=rf"chunk 'd#1': text is 65536 bytes.*{MAX_VARCHAR_BYTES}"):
        index.apply(ShardWrite(upserts=[longest, too_long], offsets={"docs": {0: 1}}))
    assert (index.count(), index.offsets()) == (0, {})
    index.upsert([longest])
    assert index.get(["d#0"]) == [longest]
    with pytest.raises(ProcessingError, match="chunk 'd#1': alignment is 70000 bytes"):
        index.upsert([ChunkRecord("d#1", "d", 1, "t", None, 0, 1, {}, v[1], "x" * 70000)])


def keyword_corpus() -> list[ChunkRecord]:
    """150 chunks: "apple" in the title of every third, in the text of every fifth (1-3 times)."""
    rng = np.random.default_rng(43)
    vectors = unit(rng, 150)
    return [
        ChunkRecord(
            chunk_id(f"doc{i}", 0),
            f"doc{i}",
            0,
            " ".join(["apple"] * (1 + i % 3) if i % 5 == 0 else []) + f" filler words {'x ' * (i % 7)}",
            "Apple notes" if i % 3 == 0 else "Other notes",
            0,
            10,
            {"even": i % 2 == 0},
            vectors[i],
        )
        for i in range(150)
    ]


def test_title_weight_adds_title_bm25(opened: Callable[..., MilvusIndex]) -> None:
    index = opened()
    corpus = keyword_corpus()
    index.upsert(corpus)
    in_text = {r.chunk_id for r in corpus if "apple" in r.text}
    in_title = {r.chunk_id for r in corpus if r.title == "Apple notes"}
    assert isinstance(index, KeywordSearch)
    [text_only] = index.keyword_search(["apple"], 1000, title_weight=0)
    assert {h.chunk_id for h in text_only} == in_text
    [both] = index.keyword_search(["APPLES"], 1000, title_weight=1)
    assert {h.chunk_id for h in both} == in_text | in_title
    heavy = index.keyword_search(["apple"], 5, title_weight=100)[0]
    assert all(h.chunk_id in in_title for h in heavy)
    assert [h.score for h in both] == sorted((h.score for h in both), reverse=True)
    with pytest.raises(ValueError, match="title_weight must be >= 0"):
        index.keyword_search(["apple"], 5, title_weight=-1)


@pytest.mark.parametrize("title_weight", [0.5, 3.0])
def test_keyword_top_k_is_exact_however_deep_the_lists(
    opened: Callable[..., MilvusIndex], title_weight: float
) -> None:
    """With 150 matches a top 1..5 starts from shorter lists than the ranking needs (the title ties
    50 ways): it must still be the head of the full ranking."""
    index = opened()
    index.upsert(keyword_corpus())
    f = MetadataFilter.parse({"even": True})
    for filter in (None, f):
        [full] = index.keyword_search(["apple notes"], 1000, filter, title_weight)
        assert len(full) == (150 if filter is None else 75)
        assert all(filter is None or filter.matches(h.metadata) for h in full)
        for k in range(1, 6):
            [top] = index.keyword_search(["apple notes"], k, filter, title_weight)
            assert [(h.chunk_id, h.score) for h in top] == [(h.chunk_id, h.score) for h in full[:k]]


@pytest.mark.parametrize(
    "config",
    [
        {"index_type": "HNSW", "hnsw_m": 16, "hnsw_ef_construction": 64, "hnsw_ef_search": 32},
        {"index_type": "IVF_FLAT", "ivf_nlist": 4, "ivf_nprobe": 3},
    ],
    ids=["hnsw", "ivf_flat"],
)
def test_approximate_index_types_after_a_flush(
    opened: Callable[..., MilvusIndex], config: dict[str, Any]
) -> None:
    corpus = make_corpus(seed=44)
    reference = InMemoryIndex(MODEL, DIM)
    reference.upsert(corpus)
    index = opened(**config)
    index.upsert(corpus)
    index.snapshot()  # sealed segments: searched through the index, not by brute force
    index.close()
    index = opened(**config)
    queries = unit(np.random.default_rng(45), 20)
    got, want = index.search(queries, 10), reference.search(queries, 10)
    recall = np.mean(
        [len({h.chunk_id for h in g} & {h.chunk_id for h in w}) / 10 for g, w in zip(got, want, strict=True)]
    )
    assert recall >= 0.8
    f = MetadataFilter.parse({"lang": "en"})
    filtered = index.search(queries, 10, f)
    assert all(f.matches(h.metadata) for hits in filtered for h in hits)
    [[top]] = index.search(corpus[3].vector[None], 1)
    assert top.chunk_id == corpus[3].chunk_id and top.score == pytest.approx(1.0, abs=1e-5)


def test_a_changed_index_type_rebuilds_the_vector_index(opened: Callable[..., MilvusIndex]) -> None:
    corpus = make_corpus(seed=46, n_docs=20)
    index = opened()
    index.upsert(corpus)
    index.snapshot()
    index.close()
    for config in (
        {"index_type": "IVF_FLAT", "ivf_nlist": 2},
        {"index_type": "IVF_FLAT", "ivf_nlist": 3},
        {},
    ):
        index = opened(**config)
        info = index._milvus().describe_index(index._chunks, "vector")
        assert info["index_type"] == config.get("index_type", "FLAT")
        assert {**info, **info.get("params", {})}.get("nlist") in (
            config.get("ivf_nlist"),
            str(config.get("ivf_nlist")),
        )
        [[top]] = index.search(corpus[5].vector[None], 1)
        assert top.chunk_id == corpus[5].chunk_id and index.count() == len(corpus)
        index.close()


def test_stored_state_reads_without_creating(opened: Callable[..., MilvusIndex], shard: Path) -> None:
    config = MilvusConfig()
    assert stored_state(shard, config, index_name="", shard=0) is None
    assert not shard.exists()
    index = opened()
    corpus = make_corpus(n_docs=4)
    index.apply(
        ShardWrite(upserts=corpus, documents={"doc-1": DocumentRow("h", 2)}, offsets={"docs": {2: 9}})
    )
    state = stored_state(shard, config, index_name="", shard=0)  # the shard stays open meanwhile
    assert state is not None
    assert (state.model, state.dim, state.applied, state.complete) == (MODEL, DIM, {"docs": {2: 9}}, True)
    assert (state.chunks, state.documents) == (len(corpus), 1)
    assert stored_state(shard, config, index_name="other", shard=0) is None  # other collections
    assert index.count() == len(corpus)


READER = """
import json, sys
from pathlib import Path
from actors.backends import StoreUnreadableError
from actors.milvus_index import stored_state
from schemas.settings import MilvusConfig

def read():
    s = stored_state(Path(sys.argv[1]), MilvusConfig(), index_name="", shard=0)
    return [s.model, s.chunks, s.applied]

try:
    print(json.dumps(read()), flush=True)
except StoreUnreadableError as exc:
    print(json.dumps(str(exc)), flush=True)
sys.stdin.readline()  # the other process has closed the shard
print(json.dumps(read()), flush=True)
"""


def test_one_process_at_a_time_and_close_hands_the_data_dir_over(
    opened: Callable[..., MilvusIndex], shard: Path
) -> None:
    index = opened()
    index.apply(ShardWrite(upserts=make_corpus(n_docs=3), offsets={"docs": {0: 3}}))
    count = index.count()
    reader = subprocess.Popen(
        [sys.executable, "-c", READER, str(shard)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert reader.stdout is not None and reader.stdin is not None
        while_open = json.loads(reader.stdout.readline())
        assert "Milvus Lite cannot open" in while_open and "another process" in while_open
        index.close()
        reader.stdin.write("closed\n")
        reader.stdin.flush()
        out, err = reader.communicate(timeout=120)
    finally:
        reader.kill()
    assert reader.returncode == 0, err[-2000:]
    assert json.loads(out.splitlines()[-1]) == [MODEL, count, {"docs": {"0": 3}}]


def test_objects_sharing_a_data_dir_in_one_process(opened: Callable[..., MilvusIndex], shard: Path) -> None:
    first = opened()
    first.upsert(make_corpus(n_docs=2))
    # Another spelling of the same data dir shares the same embedded server and its user count.
    second = MilvusIndex(shard.parent / "elsewhere" / ".." / shard.name, MODEL, DIM, MilvusConfig())
    try:
        assert second.store_id == first.store_id and second.count() == first.count() > 0
        first.close()
        assert second.get([chunk_id("doc-0", 0)])[0] is not None  # the server stays up for the other
    finally:
        second.close()


def test_store_identity_quota_and_names(opened: Callable[..., MilvusIndex], shard: Path) -> None:
    index = opened()
    store_id = index.store_id
    index.set_max_bytes(None)
    with pytest.raises(ConfigError, match="no storage quota"):
        index.set_max_bytes(1 << 20)
    index.close()
    assert opened().store_id == store_id
    assert opened(collection_prefix="fresh").store_id != store_id  # other collections, another store
    config = MilvusConfig(collection_prefix="rb")
    assert collection_names(config, "my-index", 3) == ("rb_my_hindex_3_chunks", "rb_my_hindex_3_ledger")
    assert collection_names(config, "my_index", 3) == ("rb_my__index_3_chunks", "rb_my__index_3_ledger")
    assert collection_names(config, "", 0) == ("rb_0_chunks", "rb_0_ledger")


def test_distinct_index_names_never_share_collections() -> None:
    config = MilvusConfig(collection_prefix="rb")
    names = ["".join(p) for n in range(5) for p in itertools.product("a0_-", repeat=n)]
    seen: dict[str, tuple[str, int]] = {}
    for name in names:
        for shard in range(3):
            chunks, ledger = collection_names(config, name, shard)
            assert ledger == chunks.removesuffix("_chunks") + "_ledger"
            assert seen.setdefault(chunks, (name, shard)) == (name, shard)


def test_a_store_of_another_index_or_shard_is_refused(
    opened: Callable[..., MilvusIndex], shard: Path
) -> None:
    config = MilvusConfig(collection_prefix="x")
    first = MilvusIndex(shard, MODEL, DIM, config, index_name="a", shard=0)
    try:
        first.upsert(make_corpus(n_docs=1))
    finally:
        first.close()
    # prefix "x_a" and no index name reach the same collections, x_a_0_chunks and x_a_0_ledger
    with pytest.raises(ConfigError, match=r"belongs to index 'a' shard 0, not index '' shard 0"):
        opened(collection_prefix="x_a")
    other = MilvusIndex(shard, MODEL, DIM, config, index_name="a-b", shard=0)
    try:
        assert other.count() == 0  # my-index and my_index, a-b and a_b: separate stores
    finally:
        other.close()


class CutOff:
    """The real pymilvus client, except that its ``fail_at``-th call that creates, loads or writes
    something (collections, indexes, rows) raises as a dropped connection does."""

    CALLS = (
        "create_collection",
        "create_index",
        "load_collection",
        "release_collection",
        "drop_index",
        "upsert",
    )

    def __init__(self, client: Any, fail_at: int) -> None:
        self.client, self.fail_at, self.calls = client, fail_at, 0

    def _counted(self, method: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == self.fail_at:
                raise ConnectionError("connection reset (injected)")
            return method(*args, **kwargs)

        return call

    def _get_connection(self) -> Any:
        connection = self.client._get_connection()
        cut = self

        class Connection:
            def __getattr__(self, name: str) -> Any:
                method = getattr(connection, name)
                return cut._counted(method) if name in CutOff.CALLS else method

        return Connection()

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)
        return self._counted(method) if name in self.CALLS else method


@pytest.mark.parametrize(
    "config",
    [{}, {"index_type": "IVF_FLAT", "ivf_nlist": 2}],
    ids=["new-store", "changed-index-type"],
)
def test_an_opening_cut_off_at_any_call_is_completed_by_the_next(
    shard: Path, monkeypatch: pytest.MonkeyPatch, config: dict[str, Any]
) -> None:
    """A new store (collections, four indexes, meta row), or an existing one whose vector index
    the config rebuilds, opened with a connection that drops at its n-th creating call: the next
    opening completes it."""
    from actors import milvus_index

    corpus = make_corpus(seed=47, n_docs=6)
    real_connect, cut = milvus_index.connect, CutOff(None, 0)

    def cut_connect(path: Path, milvus: MilvusConfig, where: str) -> tuple[Any, str | None]:
        client, lite = real_connect(path, milvus, where)
        cut.client = client
        return cut, lite

    fail_at = 1
    while True:
        prefix = f"cut{fail_at}"
        if config:  # an existing store, first opened with the default (FLAT) index
            index = MilvusIndex(shard, MODEL, DIM, MilvusConfig(collection_prefix=prefix))
            index.upsert(corpus)
            index.close()
        cut.fail_at, cut.calls = fail_at, 0
        monkeypatch.setattr(milvus_index, "connect", cut_connect)
        try:
            MilvusIndex(shard, MODEL, DIM, MilvusConfig(collection_prefix=prefix, **config)).close()
            break  # no call left to cut
        except RetryableError as exc:
            assert "connection reset (injected)" in str(exc)
        finally:
            monkeypatch.undo()
        index = MilvusIndex(shard, MODEL, DIM, MilvusConfig(collection_prefix=prefix, **config))
        try:
            client = index._milvus()
            for collection, field in [(index._chunks, f) for f in ("vector", "text_bm25", "title_bm25")] + [
                (index._ledger, "placeholder")
            ]:
                assert client.describe_index(collection, field) is not None, (fail_at, field)
            info = client.describe_index(index._chunks, "vector")
            assert info["index_type"] == config.get("index_type", "FLAT"), fail_at
            index.upsert(corpus[:3])
            [[top]] = index.search(corpus[1].vector[None], 1)
            assert top.chunk_id == corpus[1].chunk_id
            assert index.keyword_search(["body"], 1)[0]
            assert index.count() == (len(corpus) if config else 3)
        finally:
            index.close()
        fail_at += 1
    assert fail_at > (4 if config else 8)  # every call was cut once


class Recording:
    """The real pymilvus client, recording each call's name and consistency level."""

    def __init__(self, client: Any) -> None:
        self.client, self.calls = client, []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.client, name)
        if not callable(method):
            return method

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, kwargs.get("consistency_level")))
            return method(*args, **kwargs)

        return call


def test_the_reads_a_write_decides_by_are_strong(opened: Callable[..., MilvusIndex]) -> None:
    first, second = two_writes()
    index = opened(consistency_level="Eventually")
    index.apply(first)
    recording = Recording(index._client)
    index._client = recording
    index.apply(second)
    reads = [level for name, level in recording.calls if name in ("query", "search", "get")]
    assert reads and set(reads) == {"Strong"}
    recording.calls.clear()
    index.search(unit(np.random.default_rng(48), 1), 3)
    index.keyword_search(["body"], 3)
    index.get(["a#0"])
    index.get_document_rows(["a"])
    index.scan_chunks()
    reads = [level for name, level in recording.calls if name in ("query", "search", "get")]
    assert reads and set(reads) == {"Eventually"}


def test_counts_follow_the_writes_and_equal_what_milvus_counts(
    opened: Callable[..., MilvusIndex], shard: Path
) -> None:
    first, second = two_writes()
    reference = InMemoryIndex(MODEL, DIM)
    index = opened()

    def milvus_counts(index: MilvusIndex) -> tuple[int, int]:
        client = index._milvus()
        [chunks] = client.query(index._chunks, filter="", output_fields=["count(*)"])
        [documents] = client.query(index._ledger, filter='kind == "document"', output_fields=["count(*)"])
        return int(chunks["count(*)"]), int(documents["count(*)"])

    def check(index: MilvusIndex) -> None:
        want = (reference.count(), reference.document_count())
        recording = Recording(index._client)
        index._client = recording
        counted = (index.count(), index.document_count(), index.vector_count(), index.offsets())
        index._client = recording.client
        assert recording.calls == []  # kept in the object: health checks cost nothing
        assert counted == (*want, want[0], reference.offsets())
        assert milvus_counts(index) == want

    later = ShardWrite(
        upserts=make_document(np.random.default_rng(49), "f", 3),
        delete_documents=["e"],
        delete_chunks=["a#1", "f#2"],  # f#2 comes in this same write: deletions go first
        versions={"e": ("docs", 1, 4)},
        offsets={"docs": {1: 5}},
    )
    for write in (first, second, later, second):  # the last one again: nothing changes
        reference.apply(write)
        index.apply(write)
        check(index)
    cut = ShardWrite(
        upserts=make_document(np.random.default_rng(50), "g", 2), documents={"g": DocumentRow("h", 2)}
    )
    index._client = FailingClient(index._client, fail_at=2)  # the chunks are stored, the row is not
    with pytest.raises(RetryableError):
        index.apply(cut)
    index._client = index._client.client
    assert index.count() == milvus_counts(index)[0] == reference.count() + 2  # counted again
    assert index.offsets() == reference.offsets()  # read again
    reference.apply(cut)
    index.apply(cut)
    check(index)
    index.close()
    check(opened())


def test_kinds_longer_than_milvus_stores_are_refused_before_writing(
    opened: Callable[..., MilvusIndex],
) -> None:
    """5,000 numbers: their metadata is under Milvus's JSON limit, their kinds (``"n"`` each) over."""
    index = opened()
    metadata: dict[str, str | int | float | bool] = dict.fromkeys((f"k{i:04d}" for i in range(5000)), 0)
    [v] = unit(np.random.default_rng(51), 1)
    record = ChunkRecord("d#0", "d", 0, "text", None, 0, 4, metadata, v)
    with pytest.raises(
        ProcessingError, match=r"chunk 'd#0': kinds is \d+ bytes as JSON, over Milvus's 65536"
    ):
        index.apply(ShardWrite(upserts=[record], offsets={"docs": {0: 1}}))
    assert (index.count(), index.offsets()) == (0, {})


def test_upserts_are_split_by_bytes_as_well_as_rows() -> None:
    sizes = [10, 10, 30, 5, 45, 1, 1]
    assert list(sized_batches(list(range(7)), sizes, max_bytes=40)) == [[0, 1], [2, 3], [4], [5, 6]]
    many = list(range(BATCH + 3))
    assert [len(b) for b in sized_batches(many, [1] * len(many))] == [BATCH, 3]
    assert list(sized_batches([], [])) == []


def test_a_stale_record_too_long_for_milvus_is_skipped(opened: Callable[..., MilvusIndex]) -> None:
    index = opened()
    [v, w] = unit(np.random.default_rng(52), 2)
    index.apply(
        ShardWrite(
            upserts=[ChunkRecord("d#0", "d", 0, "new", None, 0, 3, {}, v)], versions={"d": ("docs", 0, 9)}
        )
    )
    too_long = ChunkRecord("d#0", "d", 0, "é" * 40000, None, 0, 40000, {}, w)
    result = index.apply(
        ShardWrite(upserts=[too_long], versions={"d": ("docs", 0, 3)}, offsets={"docs": {0: 4}})
    )
    assert result.stale == 1 and result.upserted == 0
    assert index.get(["d#0"])[0].text == "new" and index.offsets() == {"docs": {0: 4}}


def test_a_write_is_fsynced_when_apply_returns(
    opened: Callable[..., MilvusIndex], shard: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Milvus Lite fsyncs its log only when a flush retires it: every file and directory of both
    collections must have been fsynced, as it is now, before apply returns (and after a snapshot)."""
    fsynced: dict[str, tuple[int, int]] = {}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        status = os.fstat(fd)
        fsynced[os.readlink(f"/proc/self/fd/{fd}")] = (status.st_size, status.st_mtime_ns)

    monkeypatch.setattr(os, "fsync", fsync)
    index = opened()
    first, second = two_writes()
    root = shard / DB_NAME / "collections"

    def unsynced() -> list[str]:
        paths = [root] + [
            p for name in (index._chunks, index._ledger) for p in [root / name, *(root / name).rglob("*")]
        ]
        return [str(p) for p in paths if fsynced.get(str(p)) != (p.stat().st_size, p.stat().st_mtime_ns)]

    for write in (first, second):
        index.apply(write)
        assert not unsynced()
    assert any("wal_data" in p for p in fsynced) and any("wal_delta" in p for p in fsynced)
    index.snapshot()
    assert not unsynced() and any(p.endswith(".parquet") for p in fsynced)


def test_a_writer_whose_store_another_opened_writes_no_more(opened: Callable[..., MilvusIndex]) -> None:
    old = opened()
    first, second = two_writes()
    old.apply(first)
    new = opened()  # a replacement (on a server, possibly on another node)
    with pytest.raises(IndexUnavailableError, match="another writer opened this store since"):
        old.apply(second)
    assert new.offsets() == {"docs": {0: 4}} and new.count() == len(first.upserts)  # nothing written
    assert old.get([first.upserts[0].chunk_id]) == [first.upserts[0]]  # it still reads
    new.apply(second)
    assert new.offsets() == {"docs": {0: 12, 1: 3}}


def test_reading_stored_state_leaves_no_connection_open(
    opened: Callable[..., MilvusIndex], shard: Path
) -> None:
    from pymilvus.client.connection_manager import ConnectionManager

    opened().close()
    manager = ConnectionManager.get_instance()
    before = manager.get_stats()["total_connections"]
    for _ in range(3):  # each one starts Milvus Lite on a new port
        assert stored_state(shard, MilvusConfig(), index_name="", shard=0) is not None
    assert manager.get_stats()["total_connections"] == before


@pytest.mark.parametrize(
    ("exc", "error", "failure"),
    [
        (
            MilvusException.from_status(Status(code=7, reason="disk limit exceeded")),
            StorageFullError,
            "transient",
        ),
        (
            MilvusException.from_status(Status(code=3, reason="memory limit exceeded")),
            StorageFullError,
            "transient",
        ),
        (MilvusException.from_status(Status(code=9, reason="quota exceeded")), StorageFullError, "transient"),
        (
            MilvusException.from_status(Status(error_code=48, reason="force deny")),
            StorageFullError,
            "transient",
        ),
        (
            MilvusException.from_status(Status(code=1, reason="not ready", retriable=True)),
            RetryableError,
            "transient",
        ),
        (
            MilvusException.from_status(Status(code=2, reason="service unavailable")),
            RetryableError,
            "transient",
        ),
        (
            MilvusException.from_status(Status(code=4, reason="too many requests")),
            RetryableError,
            "transient",
        ),
        (
            MilvusException.from_status(Status(code=101, reason="collection not loaded")),
            RetryableError,
            "transient",
        ),
        (
            MilvusException.from_status(Status(code=503, reason="channel not available")),
            RetryableError,
            "transient",
        ),
        (
            MilvusException(code=8, message="[upsert] Retry timeout: 30s, message=rate limit"),
            RetryableError,
            "transient",
        ),
        (
            MilvusException.from_status(
                Status(code=1100, reason="invalid parameter", extra_info={"is_input_error": "true"})
            ),
            ProcessingError,
            "permanent",
        ),
        (MilvusException.from_status(Status(code=1, reason="unexpected error")), None, "unknown"),
        (ParamError(message="wrong type"), None, "unknown"),  # pymilvus's own, code 1 too
    ],
    ids=lambda p: p.message if isinstance(p, MilvusException) else getattr(p, "__name__", str(p)),
)
def test_milvus_failures_are_raised_as_what_the_caller_does(
    exc: Exception, error: type[Exception] | None, failure: str
) -> None:
    assert error_class(exc) is error
    wrapped = MilvusException(code=exc.code, message="[query] Retry timeout: 1s")  # as pymilvus chains them
    wrapped.__cause__ = exc
    assert error_class(wrapped) is (error or RetryableError)  # a cause that says more wins
    assert classify(error("x") if error is not None else exc) == failure


def test_a_message_over_the_servers_size_limit_is_not_retried(shard: Path) -> None:
    """A Milvus (here Lite's gRPC service) that receives at most 1 MiB: a batch over it is refused
    for good (ProcessingError, which the stream isolates record by record), not retried forever."""
    import grpc
    from milvus_lite.adapter.grpc.servicer import MilvusServicer
    from milvus_lite.db import MilvusLite
    from pymilvus.grpc_gen import milvus_pb2_grpc

    db = MilvusLite(str(shard.parent / "server.db"))
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=4),
        options=[("grpc.max_receive_message_length", 1 << 20)],
    )
    milvus_pb2_grpc.add_MilvusServiceServicer_to_server(MilvusServicer(db), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    index = None
    try:
        index = MilvusIndex(shard, MODEL, DIM, MilvusConfig(uri=f"http://127.0.0.1:{port}", timeout_s=10))
        rng = np.random.default_rng(53)
        records = [replace(r, text="word " * 10000) for r in make_document(rng, "big", 40)]
        with pytest.raises(ProcessingError, match=r"(?s)upsert chunks failed.*larger than max") as raised:
            index.upsert(records)
        assert classify(raised.value) == "permanent"
        index.upsert(records[:2])  # each record alone passes
        assert index.count() == 2
    finally:
        if index is not None:
            index.close()
        server.stop(grace=0)
        db.close()


@pytest.fixture
def milvus_server() -> Iterator[str]:
    """Milvus Lite served over gRPC on a free port, as a Milvus server is reached (by uri)."""
    with milvus_grpc_server() as uri:
        yield uri


def test_a_server_database_holds_the_collections_and_their_indexes(milvus_server: str, shard: Path) -> None:
    from pymilvus import MilvusClient

    admin = MilvusClient(uri=milvus_server, dedicated=True)
    admin.create_database("riverbed_test")
    config = MilvusConfig(uri=milvus_server, db_name="riverbed_test")
    index = MilvusIndex(shard, MODEL, DIM, config, index_name="ix", shard=1)
    try:
        corpus = make_corpus(seed=54, n_docs=4)
        index.upsert(corpus)
        recording = Recording(index._client)
        index._client = recording
        index.snapshot()  # a server flushes by itself
        assert recording.calls == []
        index._client = recording.client
        [[top]] = index.search(corpus[2].vector[None], 1)
        assert top.chunk_id == corpus[2].chunk_id
    finally:
        index.close()
    chunks, ledger = collection_names(config, "ix", 1)
    assert chunks not in admin.list_collections()  # not in the default database
    admin.use_database("riverbed_test")
    for collection, field in [
        (chunks, "vector"),
        (chunks, "text_bm25"),
        (chunks, "title_bm25"),
        (ledger, "placeholder"),
    ]:
        assert admin.describe_index(collection, field) is not None
    # Split on spaces only: "whitespace" on a Milvus server; Milvus Lite (served here) has no such
    # tokenizer, and its "standard" one splits FTS5 words nowhere.
    fields = {f["name"]: f["params"] for f in admin.describe_collection(chunks)["fields"]}
    assert json.loads(fields["text_words"]["analyzer_params"]) == analyzer(milvus_lite=True)
    assert analyzer(milvus_lite=False) == {"tokenizer": "whitespace"}
    state = stored_state(shard, config, index_name="ix", shard=1)
    assert state is not None and state.chunks == len(corpus)
    admin.close()
    assert not shard.exists()


def test_dropping_a_throwaway_index_removes_its_collections_and_only_them(
    milvus_server: str, shard: Path
) -> None:
    from pymilvus import MilvusClient

    from actors.backends import BACKENDS
    from schemas.settings import IndexConfig

    config = IndexConfig(backend="milvus", milvus=MilvusConfig(uri=milvus_server))
    kept, dropped = (
        MilvusIndex(shard, MODEL, DIM, config.milvus, index_name=n, shard=0) for n in ("kept", "gone")
    )
    for index in (kept, dropped):
        index.upsert(make_corpus(seed=5, n_docs=2))
        index.close()
    BACKENDS["milvus"].drop(config, shard, index_name="gone", shard=0)
    BACKENDS["milvus"].drop(config, shard, index_name="never-made", shard=3)  # nothing to drop: no error
    names = set(MilvusClient(uri=milvus_server, dedicated=True).list_collections())
    assert set(collection_names(config.milvus, "kept", 0)) <= names
    assert not set(collection_names(config.milvus, "gone", 0)) & names


def test_dropping_an_embedded_shard_removes_its_directory(shard: Path) -> None:
    from actors.backends import BACKENDS
    from schemas.settings import IndexConfig

    index = MilvusIndex(shard, MODEL, DIM, MilvusConfig())
    index.upsert(make_corpus(seed=6, n_docs=2))
    index.close()
    assert (shard / DB_NAME).exists()
    BACKENDS["milvus"].drop(IndexConfig(backend="milvus"), shard, index_name="", shard=0)
    assert not shard.exists()
