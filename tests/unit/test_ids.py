from hashlib import blake2b

import pytest

from schemas.ids import chunk_id, in_tune_split, shard_of, split_chunk_id, stable_hash


def test_stable_hash_is_blake2b_64_big_endian():
    expected = int.from_bytes(blake2b(b"doc-42#0", digest_size=8).digest(), "big")
    assert stable_hash("doc-42#0") == expected
    # A fixed value: the same on every machine and in every process, unlike hash().
    assert stable_hash("") == 0xE4A6A0577479B2B4


def test_stable_hash_known_vector():
    assert stable_hash("riverbed") == int(blake2b(b"riverbed", digest_size=8).hexdigest(), 16)
    assert 0 <= stable_hash("é漢字") < 2**64


def test_chunk_id_round_trip_with_hash_in_document_id():
    cid = chunk_id("a#b", 12)
    assert cid == "a#b#12"
    assert split_chunk_id(cid) == ("a#b", 12)


@pytest.mark.parametrize("bad", ["nohash", "doc#", "doc#x", "doc#-1"])
def test_split_chunk_id_rejects(bad):
    with pytest.raises(ValueError, match="not a chunk id"):
        split_chunk_id(bad)


def test_chunk_id_rejects_negative():
    with pytest.raises(ValueError):
        chunk_id("d", -1)


def test_shard_routing_is_stable_and_spreads():
    ids = [chunk_id(f"doc-{i}", n) for i in range(500) for n in range(4)]
    shards = [shard_of(c, 4) for c in ids]
    assert shards == [stable_hash(c) % 4 for c in ids]
    counts = [shards.count(s) for s in range(4)]
    assert min(counts) > 400  # 2000 ids over 4 shards: roughly even
    with pytest.raises(ValueError):
        shard_of("x", 0)


def test_tune_split_is_parity_of_stable_hash():
    ids = [f"q{i}" for i in range(1000)]
    tune = [i for i in ids if in_tune_split(i)]
    assert all(stable_hash(i) % 2 == 0 for i in tune)
    assert 400 < len(tune) < 600
