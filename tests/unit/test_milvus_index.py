"""What only the Milvus backend has to get right (the shared contract runs in
test_vector_index_contract): a write cut off at any call is completed by applying it again, ids
that a Milvus expression must escape, Milvus going away, values too long for Milvus, BM25 with a
title weight, the approximate index types once flushed, ``stored_state``, and the embedded data dir
handed back on close. All on a real Milvus Lite, embedded in the shard directory."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actors.milvus_index import DB_NAME, MAX_VARCHAR_BYTES, MilvusIndex, collection_names, stored_state
from actors.testing import InMemoryIndex
from actors.vector_index import ChunkRecord, DocumentRow, KeywordSearch, ShardWrite, VectorIndex
from schemas.errors import ConfigError, ProcessingError, RetryableError
from schemas.filters import MetadataFilter
from schemas.ids import chunk_id
from schemas.settings import MilvusConfig
from tests.unit.test_vector_index_contract import DIM, MODEL, make_corpus, make_document, scratch_dir, unit

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


def test_a_call_past_its_timeout_is_retryable(opened: Callable[..., MilvusIndex], shard: Path) -> None:
    opened().close()
    with pytest.raises(RetryableError, match=r"milvus shard 0 \(riverbed_0_chunks at .*milvus\.db\)"):
        opened(timeout_s=1e-6)


def test_milvus_going_away_under_an_open_shard_is_retryable_and_loses_nothing(
    opened: Callable[..., MilvusIndex], shard: Path
) -> None:
    from milvus_lite.server_manager import server_manager_instance

    index = opened()
    corpus = make_corpus(n_docs=5)
    index.apply(ShardWrite(upserts=corpus, offsets={"docs": {0: 5}}))
    server_manager_instance.release_server(str((shard / DB_NAME).absolute()))  # as if Milvus died
    with pytest.raises(RetryableError, match="riverbed_0_chunks"):
        index.count()
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


def test_objects_sharing_a_data_dir_in_one_process(opened: Callable[..., MilvusIndex]) -> None:
    first, second = opened(), opened()
    first.upsert(make_corpus(n_docs=2))
    assert second.count() == first.count() and second.store_id == first.store_id
    first.close()
    assert second.count() > 0  # the embedded server stays up while one object still uses it


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
    assert collection_names(config, "my-index", 3) == ("rb_my_index_3_chunks", "rb_my_index_3_ledger")
    assert collection_names(config, "", 0) == ("rb_0_chunks", "rb_0_ledger")
