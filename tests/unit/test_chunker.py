"""Chunker: cleaning with spans into the original text, token windows, content hash.

Uses the real packaged tokenizer of all-MiniLM-L6-v2 (offline, via resolve_model).
"""

from __future__ import annotations

import itertools
import random
import re
import unicodedata

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from actors.alignment import chunk_alignment
from actors.chunker import Chunk, ChunkedDocument, Chunker, clean_text
from actors.models import resolve_model
from schemas.envelope import DocumentEnvelope
from schemas.settings import ChunkConfig

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
VOCABULARY = (
    "the stream keeps a searchable memory of documents and images that arrive on topics while "
    "actors clean chunk tokenize embed them in batches write sharded indexes unbelievably "
    "extraordinary riverbed kafka partition offset replay"
)
WORDS = VOCABULARY.split()
WORD = re.compile(r"\w+")
JUNK = re.compile(r"[\s\x00-\x1f\x7f-\x9f\ud800-\udfff]")


@pytest.fixture(scope="module")
def chunker() -> Chunker:
    chunker = Chunker(ChunkConfig(), MODEL)
    chunker.warm_up()
    return chunker


@pytest.fixture(scope="module")
def small() -> Chunker:
    """Tiny windows, to get many cuts out of short texts."""
    small = Chunker(ChunkConfig(max_tokens=16, overlap_tokens=4), MODEL)
    small.warm_up()
    return small


@pytest.fixture(scope="module")
def reference() -> PreTrainedTokenizerBase:
    """The model's tokenizer loaded on its own, through transformers, to check counts against."""
    return AutoTokenizer.from_pretrained(resolve_model(MODEL).location)


def doc(text: str, id: str = "doc", **fields: object) -> DocumentEnvelope:
    return DocumentEnvelope.model_validate({"id": id, "text": text, **fields})


def count(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def sentences(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n_words:
        out += [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
        out[-1] += "."
    return " ".join(out)


def check_spans(
    original: str, chunked: ChunkedDocument, max_tokens: int, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The contract every result meets, whatever the input."""
    assert [c.number for c in chunked.chunks] == list(range(len(chunked.chunks)))
    previous: Chunk | None = None
    for c in chunked.chunks:
        assert c.chunk_id == f"{chunked.document_id}#{c.number}"
        assert 0 <= c.start < c.end <= len(original)
        assert c.text and c.text in clean_text(original[c.start : c.end])
        assert c.n_tokens == count(tokenizer, c.text) <= max_tokens
        if previous is not None:
            assert previous.start <= c.start and previous.end <= c.end
            # No token falls between chunks: with no overlap, only whitespace (or marks the
            # tokenizer drops) may.
            assert (
                c.start <= previous.end or count(tokenizer, clean_text(original[previous.end : c.start])) == 0
            )
        previous = c
        check_words(original, c)


def word_spans(original: str, chunk: Chunk) -> list[tuple[str, str]]:
    """Each word of the chunk's text, with the slice of ``original`` its alignment maps it to."""
    align = chunk_alignment(chunk.alignment, chunk.text, (chunk.start, chunk.end))
    assert align is not None
    assert (align.start(0), align.end(len(chunk.text))) == (chunk.start, chunk.end)
    return [
        (m.group(), original[align.start(m.start()) : align.end(m.end())]) for m in WORD.finditer(chunk.text)
    ]


def check_words(original: str, chunk: Chunk) -> None:
    """Every word of a chunk maps to the words as the producer wrote them: the slice begins and
    ends with the word, and cleans to it; or, the one exception (an edge inside a cluster NFC
    rewrote so that no part of the original is the word's end), cleans to it plus marks."""
    for word, written in word_spans(original, chunk):
        assert not JUNK.match(written[0]) and not JUNK.match(written[-1]), (word, written)
        cleaned = clean_text(written)
        if cleaned != word:
            rest = cleaned.removeprefix(word)
            assert rest != cleaned and all(unicodedata.category(c).startswith("M") for c in rest)


def test_short_document_is_one_chunk_covering_the_text(chunker: Chunker, reference) -> None:
    text = "Riverbed keeps a searchable memory of a stream."
    chunked = chunker.chunk(doc(text))
    assert chunked.document_id == "doc"
    assert chunked.chunks == [
        Chunk("doc#0", "doc", 0, text, 0, len(text), count(reference, text), alignment=""),
    ]


def test_long_document_windows_fit_overlap_and_cover(chunker: Chunker, reference) -> None:
    text = sentences(2000)
    chunked = chunker.chunk(doc(text))
    config = ChunkConfig()
    assert len(chunked.chunks) > 5
    check_spans(text, chunked, config.max_tokens, reference)
    assert chunked.chunks[0].start == 0 and chunked.chunks[-1].end == len(text)
    # The text is already clean, so token positions follow from the spans.
    offsets = reference(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)[
        "offset_mapping"
    ]
    windows = [{i for i, (s, e) in enumerate(offsets) if c.start <= s and e <= c.end} for c in chunked.chunks]
    assert set().union(*windows) == set(range(len(offsets)))
    for a, b in itertools.pairwise(windows):
        assert config.overlap_tokens <= len(a & b) <= config.overlap_tokens + 8
    # Every window but the last ends at a sentence: one always lies in its last 20%.
    assert all(c.text.endswith(".") for c in chunked.chunks)


def test_long_document_raises_no_length_warning(chunker: Chunker, capfd: pytest.CaptureFixture[str]) -> None:
    chunker.chunk(doc(sentences(3000, seed=1)))
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_spans_point_into_the_original_text_when_cleaning_changed_it(chunker: Chunker) -> None:
    original = "  Cafe\u0301\t\tau   lait.\x07 \r\n\r\n Second\x00 para\u0000graph\u200b. \n"
    chunked = chunker.chunk(doc(original))
    [c] = chunked.chunks
    assert c.text == "Café au lait.\n\nSecond paragraph\u200b."
    assert (c.start, c.end) == (2, len(original) - 2)
    assert clean_text(original[c.start : c.end]) == c.text


def test_spans_of_many_chunks_in_messy_text(small: Chunker, reference) -> None:
    rng = random.Random(7)
    seps = [" ", "  ", "\t", " \x07", "\n", "\r\n\r\n", "\x00 "]
    words = [w.replace("e", "e\u0301") if rng.random() < 0.3 else w for w in WORDS]
    original = "".join(rng.choice(words) + rng.choice(seps) for _ in range(300))
    chunked = small.chunk(doc(original))
    assert len(chunked.chunks) > 20
    check_spans(original, chunked, 16, reference)
    # Token edges never fall inside an NFC cluster here, so the slice cleans to exactly the text.
    for c in chunked.chunks:
        assert clean_text(original[c.start : c.end]) == c.text


def test_words_map_back_to_the_words_as_the_producer_wrote_them(chunker: Chunker) -> None:
    """Whitespace runs, CRLF, NFD that NFC composes, controls inside and between words: each
    word's mapped offsets slice the original to that word as written."""
    original = (
        "  Cafe\u0301\t\tau   lait.\r\n\r\nSecond\x00 para\x00graph,\x07  cre\u0300me\r\n"
        "bru\u0302le\u0301e   and A\u030angstro\u0308m.\n"
    )
    [c] = chunker.chunk(doc(original)).chunks
    assert c.text == "Café au lait.\n\nSecond paragraph, crème brûlée and Ångström."
    assert c.alignment != ""
    as_written = dict(word_spans(original, c))
    assert as_written == {
        "Café": "Cafe\u0301",
        "au": "au",
        "lait": "lait",
        "Second": "Second",
        "paragraph": "para\x00graph",
        "crème": "cre\u0300me",
        "brûlée": "bru\u0302le\u0301e",
        "and": "and",
        "Ångström": "A\u030angstro\u0308m",
    }
    for word, written in as_written.items():
        assert clean_text(written) == word
        assert unicodedata.normalize("NFC", written.replace("\x00", "")) == word


def test_clusters_nfc_rewrote_are_cut_where_that_maps_exactly(chunker: Chunker) -> None:
    # NFC reorders the marks after q and composes the first acute into é, leaving the second:
    # the letters alone still map to themselves.
    original = "q\u0301\u0323 e\u0301\u0301 x"
    [c] = chunker.chunk(doc(original)).chunks
    assert c.text == "q\u0323\u0301 \u00e9\u0301 x"
    assert word_spans(original, c) == [("q", "q"), ("\u00e9", "e\u0301"), ("x", "x")]
    # No part of "é" + dot below is the "ẹ" that NFC makes of it: the word takes the cluster.
    [c] = chunker.chunk(doc("caf\u00e9\u0323 ok")).chunks
    assert word_spans("caf\u00e9\u0323 ok", c) == [("caf\u1eb9", "caf\u00e9\u0323"), ("ok", "ok")]


def test_clean_text_has_the_identity_alignment(chunker: Chunker) -> None:
    for text in ("Plain text, one space each.", "Line one\nline two\ttabbed.", "Déjà vu, naïve café."):
        assert [c.alignment for c in chunker.chunk(doc(text)).chunks] == [""]


def test_cleaning_rules() -> None:
    assert clean_text("a  b\tc\nd") == "a b c d"
    assert clean_text("a\n \nb\r\n\r\nc\n\n\n\nd") == "a\n\nb\n\nc\n\nd"
    assert clean_text("ab\x00cd \x07 e\ud800f") == "abcd ef"
    assert clean_text("\u1100\u1161\u11a8 A\u030a") == "\uac01 \u00c5"  # NFC, jamo included


def test_content_hash_is_stable_and_tracks_what_chunks_depend_on(chunker: Chunker) -> None:
    base = {"id": "doc", "text": "Some text here.", "title": "T", "metadata": {"lang": "en"}}
    first = chunker.chunk(DocumentEnvelope.model_validate(base)).content_hash
    assert first == chunker.chunk(DocumentEnvelope.model_validate(base)).content_hash
    again = Chunker(ChunkConfig(), MODEL).chunk(DocumentEnvelope.model_validate(base))
    assert again.content_hash == first
    changes = [
        {"text": "Some other text here."},
        {"text": "Some  text here."},  # same cleaned text, but the stored spans move
        {"text": "Some text  here."},  # the same spans as above, but another alignment
        {"title": "U"},
        {"title": None},
        {"metadata": {"lang": "de"}},
        {"metadata": {"lang": "en", "year": 2020}},
    ]
    hashes = {first}
    for change in changes:
        hashes.add(chunker.chunk(DocumentEnvelope.model_validate({**base, **change})).content_hash)
    for config in (ChunkConfig(max_tokens=100), ChunkConfig(overlap_tokens=8)):
        hashes.add(Chunker(config, MODEL).chunk(DocumentEnvelope.model_validate(base)).content_hash)
    # The same files under another name are another model: a new index identity.
    by_path = Chunker(ChunkConfig(), resolve_model(MODEL).location)
    hashes.add(by_path.chunk(DocumentEnvelope.model_validate(base)).content_hash)
    assert len(hashes) == len(changes) + 4


def test_chunk_batch_equals_chunk_of_each(chunker: Chunker) -> None:
    docs = [doc(sentences(n, seed=n), id=f"d{n}") for n in (3, 40, 600, 1)]
    assert chunker.chunk_batch(docs) == [chunker.chunk(d) for d in docs]
    assert chunker.chunk_batch([]) == []


def test_deterministic_across_instances(chunker: Chunker) -> None:
    text = sentences(900, seed=3)
    fresh = Chunker(ChunkConfig(), MODEL)
    assert fresh.chunk(doc(text)) == chunker.chunk(doc(text)) == chunker.chunk(doc(text))


def test_rejects_delete_and_text_that_cleans_to_nothing(chunker: Chunker) -> None:
    with pytest.raises(ValueError, match=r"'gone'.*delete"):
        chunker.chunk(DocumentEnvelope(id="gone", op="delete"))
    with pytest.raises(ValueError, match=r"'ctl'.*no text"):
        chunker.chunk(doc("\x00\x07\x1b", id="ctl"))
    with pytest.raises(ValueError, match=r"'zw'.*no tokens"):
        chunker.chunk(doc("\u200b\ufeff", id="zw"))
    with pytest.raises(ValueError, match="'ctl'"):
        chunker.chunk_batch([doc("fine"), doc("\x00", id="ctl")])


@pytest.mark.parametrize("overlap", [0, 4, 15])
def test_random_strings_keep_the_contract(overlap: int, reference) -> None:
    chunker = Chunker(ChunkConfig(max_tokens=16, overlap_tokens=overlap), MODEL)
    rng = random.Random(1234 + overlap)
    alphabet = (
        "abcdefghijklmnopqrstuvwxyz" * 4
        + "ABCXYZ0123456789.,;:!?'\"()-"
        + " " * 30
        + "\t\n\r\x00\x07\x1b\x7f\x85\u00a0\u2028\ud800"
        + "\u0301\u0308\u0323\u00e9\u00df\u0130\u212b\u0f73\u1100\u1161\u11a8\uac00\u0b47\u0b3e"
        + "日本語中文\u3002\uff01\U0001f600\u200b\ufeff\ufb01"
    )
    for i in range(200):
        original = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400)))
        try:
            # Built without validation: envelopes refuse lone surrogates, but the chunker must still
            # clean them out of whatever reaches it.
            chunked = chunker.chunk(DocumentEnvelope.model_construct(id=f"r{i}", text=original or "x"))
        except ValueError:
            assert not clean_text(original) or count(reference, clean_text(original)) == 0
            continue
        check_spans(original, chunked, 16, reference)
