"""Chunker: cleans a document and cuts it into windows of the embedding model's own tokens.

Cleaning (:func:`clean_text`): NFC; C0/C1 controls and lone surrogates dropped; every whitespace
run becomes one space, or ``"\\n\\n"`` where it holds two or more line breaks (paragraphs survive,
for cutting and for readers); ends stripped.

Spans (``Chunk.start``, ``Chunk.end``) are code-point offsets into the document's ``text`` exactly
as the producer sent it, so citations point at the producer's text. They are conservative:
``clean_text(text[start:end])`` always contains ``chunk.text``, and equals it unless a chunk edge
falls inside a cluster (a base character and its marks) that NFC rewrote and that cannot be cut
there; then the slice holds at most the rest of that cluster.

Each chunk also carries its alignment (``Chunk.alignment``, :mod:`actors.alignment`): the same map
for every position of its text, so that any range of it (a word a query matched) maps back into
the original text. A range ``[a, b)`` of ``chunk.text`` maps to ``[s, e)`` with
``clean_text(text[s:e]) == chunk.text[a:b]`` whenever ``a`` and ``b`` lie at whitespace or word
edges, with one exception: an edge inside a cluster that NFC rewrote so that no part of the
original is the part before the edge (``"é\u0323"`` becomes ``"ẹ\u0301"``: no code point of it is
the ``ẹ`` alone), or inside such a cluster of more than 32 code points. Then the range takes the
whole cluster, and its cleaning holds the marks that follow.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from hashlib import blake2b
from itertools import pairwise
from typing import TYPE_CHECKING

from actors.alignment import Alignment
from actors.models import resolve_model
from schemas.envelope import DocumentEnvelope
from schemas.errors import ConfigError
from schemas.ids import chunk_id
from schemas.settings import ChunkConfig

if TYPE_CHECKING:
    from tokenizers import Encoding, Tokenizer

# Part of every content hash: bump it when cleaning or cutting rules change, so that chunks stored
# under older rules count as changed and get rewritten. 2: chunks carry their alignment, and
# clusters NFC rewrote are cut finer where that maps exactly (spans may move).
CHUNKER_VERSION = 2

# Whitespace, C0/C1 controls and lone surrogates (JSON allows them; UTF-8 and tokenizers do not).
_JUNK = r"[\s\x00-\x1f\x7f-\x9f\ud800-\udfff]"
_JUNK_CHAR = re.compile(_JUNK)
_CHANGED_JUNK = re.compile(f"{_JUNK}{{2,}}|(?! ){_JUNK}")  # all runs but the common lone space
_LINE_BREAK = re.compile(r"\r\n?|[\n\v\f\x85\u2028\u2029]")
_WHITESPACE = re.compile(r"\s")
# NFC leaves ASCII alone, but an ASCII letter may take the marks that follow it.
_NON_ASCII_RUN = re.compile(r"[\x00-\x7f]?[^\x00-\x7f]+")
_SENTENCE_END = re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"')\]}\u00bb\u201d\u2019]*\Z")
_CJK_STOPS = "\u3002\uff01\uff1f"  # end a sentence with no space after them
_BOUNDARY_ZONE = 0.2  # a window looks for a nice place to end in its last 20%
_MAX_SNAP = 8  # tokens a window's start may move back so that it begins at a word
_MAX_SPLIT = 32  # code points of a cluster NFC rewrote beyond which it is not cut finer
# Probes whether a tokenizer tokenizes a piece cut out at word edges as it did in context.
_PROBE = "Riverbed keeps a memory. Don't panic: 42 naïve cafés, 日本語 too!\n\nNext (paragraph)."


@dataclass(frozen=True)
class Chunk:
    chunk_id: str
    document_id: str
    number: int
    """0-based position in the document."""
    text: str
    """Cleaned text, from the window's first token to its last; no title."""
    start: int
    """Code points into the original ``text``: ``text[start:end]`` covers this chunk."""
    end: int
    n_tokens: int
    """Tokens of ``text`` alone by the model's tokenizer, no special tokens; ``<= max_tokens``."""
    alignment: str
    """Where each code point of ``text`` lies in the original ``text``, relative to ``start``: ``""``
    (position ``i`` is ``start + i``) or JSON pieces (see :mod:`actors.alignment`)."""


@dataclass(frozen=True)
class ChunkedDocument:
    document_id: str
    content_hash: str
    """Hex digest of all that stored chunks depend on: cleaned text, chunk bounds and spans,
    title, metadata, ``max_tokens``, ``overlap_tokens``, model name, :data:`CHUNKER_VERSION`."""
    chunks: list[Chunk]


def _nfc(text: str) -> tuple[str, Alignment | None]:
    """NFC, with an alignment only when it changed something (rare: most text arrives NFC)."""
    if text.isascii() or unicodedata.is_normalized("NFC", text):
        return text, None
    cuts = [0]  # NFC of the text is the concatenation of NFC of the parts between cuts
    for match in _NON_ASCII_RUN.finditer(text):
        cuts.append(match.start())
        # A cluster ends before a starter unless NFC would merge the two (Hangul jamo, a few
        # vowel signs): checked, not assumed, so no Unicode table is needed.
        for pos in range(match.start() + 1, match.end()):
            if not unicodedata.combining(text[pos]):
                before, after = text[cuts[-1] : pos], text[pos]
                merged = unicodedata.normalize("NFC", before + after)
                if merged == unicodedata.normalize("NFC", before) + unicodedata.normalize("NFC", after):
                    cuts.append(pos)
        cuts.append(match.end())
    cuts.append(len(text))
    out: list[str] = []
    align, length = Alignment(), 0
    for src_start, src_end in pairwise(cuts):
        if src_end == src_start:
            continue
        piece = text[src_start:src_end]
        normal = unicodedata.normalize("NFC", piece)
        parts = [(len(piece), normal)] if normal == piece else _exact_parts(piece, normal)
        for size, part in parts:
            align.add(length, src_start, src_start + size, linear=part == text[src_start : src_start + size])
            out.append(part)
            length += len(part)
            src_start += size
    return "".join(out), align


def _exact_parts(cluster: str, normal: str) -> list[tuple[int, str]]:
    """``cluster``, which NFC rewrote into ``normal``, as parts ``(code points, their NFC)`` cut
    wherever both sides normalise apart ("q" + reordered marks, "é" + a mark left over), so that
    positions there map exactly. One part when there is no such cut, or the cluster is longer
    than :data:`_MAX_SPLIT` (the search is quadratic)."""
    if len(cluster) > _MAX_SPLIT:
        return [(len(cluster), normal)]
    parts: list[tuple[int, str]] = []
    lo, done = 0, 0  # code points of cluster and of normal taken so far
    for cut in range(1, len(cluster)):
        left = unicodedata.normalize("NFC", cluster[lo:cut])
        rest = normal[done + len(left) :]
        if normal.startswith(left, done) and unicodedata.normalize("NFC", cluster[cut:]) == rest:
            parts.append((cut - lo, left))
            lo, done = cut, done + len(left)
    parts.append((len(cluster) - lo, normal[done:]))
    return parts


def _collapse(text: str) -> tuple[str, Alignment]:
    """The whitespace and control part of cleaning, with its alignment."""
    lo, hi = 0, len(text)
    while lo < hi and _JUNK_CHAR.match(text, lo):
        lo += 1
    while hi > lo and _JUNK_CHAR.match(text, hi - 1):
        hi -= 1
    out: list[str] = []
    align, length, done = Alignment(), 0, lo
    for match in _CHANGED_JUNK.finditer(text, lo, hi):
        run = match.group()
        # Controls alone join their neighbours ("ab\x00cd" -> "abcd"); whitespace separates.
        new = "\n\n" if len(_LINE_BREAK.findall(run)) >= 2 else " " if _WHITESPACE.search(run) else ""
        if new == run:
            continue
        out.append(text[done : match.start()])
        align.add(length, done, match.start(), linear=True)
        length += match.start() - done
        if new:
            out.append(new)
            align.add(length, match.start(), match.end(), linear=len(new) == len(run))
            length += len(new)
        done = match.end()
    out.append(text[done:hi])
    align.add(length, done, hi, linear=True)
    return "".join(out), align


def clean_text(text: str) -> str:
    """The cleaning every chunk's text went through (see the module's docstring). Pure."""
    return _collapse(_nfc(text)[0])[0]


def _word_edge(words: list[int | None], j: int) -> bool:
    """Whether a cut before token ``j`` falls between two of the tokenizer's words."""
    return j == 0 or j == len(words) or words[j] is None or words[j] != words[j - 1]


def _region(text: str, offsets: list[tuple[int, int]], first: int, end: int) -> tuple[int, int]:
    """Cleaned-text range of tokens ``first..end-1``, less spaces a tokenizer folds into them."""
    c0, c1 = offsets[first][0], offsets[end - 1][1]
    while c0 < c1 and text[c0].isspace():
        c0 += 1
    while c1 > c0 and text[c1 - 1].isspace():
        c1 -= 1
    return c0, c1


def _cut_quality(text: str, offsets: list[tuple[int, int]], words: list[int | None], j: int) -> int:
    """How good a cut before token ``j`` is: 4 paragraph, 3 sentence, 2 space, 1 word, 0 none."""
    if not _word_edge(words, j):
        return 0
    # Up to the next token's first code point: some tokenizers fold a space into their tokens.
    prev_end, next_start = offsets[j - 1][1], offsets[j][0] + 1
    if "\n" in text[prev_end:next_start]:
        return 4
    spaced = _WHITESPACE.search(text, prev_end, next_start) is not None
    sentence = _SENTENCE_END.search(text, max(0, prev_end - 4), prev_end)
    if sentence and (spaced or sentence.group()[0] in _CJK_STOPS):
        return 3
    return 2 if spaced else 1


class Chunker:
    """Cleans document envelopes and cuts them into windows of ``model``'s own tokens.

    Contract: deterministic (same envelope, config and model give the same chunks and hash). A
    window holds at most ``config.max_tokens`` content tokens and a text that fits is one chunk.
    Consecutive windows share ``config.overlap_tokens`` tokens, up to 8 more so that a window
    begins at a word (fewer only after a re-tokenized window had to shrink below the overlap).
    A window ends, by preference, at a paragraph, a sentence or a space in its last 20%, and
    splits a word only when no word edge lies past the overlap. Wherever a cut could change how
    a chunk's edges tokenize, its text is tokenized again, so ``n_tokens`` is what the embedder
    will see. Not thread-safe: one ``Chunker`` per actor.
    """

    def __init__(self, config: ChunkConfig, model: str) -> None:
        self._config = config
        self._model = model
        self._tokenizer: Tokenizer | None = None
        self._verify_all = False  # re-tokenize every window, for context-sensitive tokenizers

    def warm_up(self) -> None:
        """Loads the model's fast tokenizer (local files, or the hub if not packaged). Idempotent."""
        if self._tokenizer is not None:
            return
        from transformers import AutoTokenizer  # seconds to import: keep this module light

        location = resolve_model(self._model).location
        try:
            loaded = AutoTokenizer.from_pretrained(location, use_fast=True)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the tokenizer of {self._model!r}: {exc}") from exc
        if not loaded.is_fast:
            raise ConfigError(f"{self._model!r} has no fast tokenizer; chunking needs its offsets")
        # The Rust tokenizer itself: the wrapper's per-call conversions cost ~20% of the time.
        # Documents are tokenized whole for their offsets, so no truncation; and it never warns
        # about length (only windows of at most max_tokens ever reach a model).
        tokenizer = loaded.backend_tokenizer
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tokenizer = tokenizer
        self._verify_all = not self._cuts_are_clean()

    def chunk(self, document: DocumentEnvelope) -> ChunkedDocument:
        """Chunks one upsert; see :meth:`chunk_batch`."""
        return self.chunk_batch([document])[0]

    def chunk_batch(self, documents: Sequence[DocumentEnvelope]) -> list[ChunkedDocument]:
        """Chunks upserts with one tokenizer call; the result has the same length and order.

        Warms up first if needed. Raises ``ValueError`` naming the first document that is a
        delete, or has no text or no tokens once cleaned; then nothing of the batch is returned.
        """
        if not documents:
            return []
        cleaned = [self._clean(document) for document in documents]
        encodings = self._encode([text for text, _, _ in cleaned])
        return [
            self._chunk_one(document, *clean, encoding)
            for document, clean, encoding in zip(documents, cleaned, encodings, strict=True)
        ]

    def _clean(self, document: DocumentEnvelope) -> tuple[str, Alignment | None, Alignment]:
        if document.op != "upsert":
            raise ValueError(f"document {document.id!r}: cannot chunk a {document.op!r} envelope")
        nfc_text, nfc = _nfc(document.text or "")
        text, collapse = _collapse(nfc_text)
        if not text:
            raise ValueError(f"document {document.id!r}: no text left after cleaning")
        return text, nfc, collapse

    def _encode(self, texts: list[str]) -> list[Encoding]:
        if self._tokenizer is None:
            self.warm_up()
        assert self._tokenizer is not None  # for mypy: warm_up sets it or raises
        return self._tokenizer.encode_batch(texts, add_special_tokens=False)

    def _cuts_are_clean(self) -> bool:
        """Whether text cut at word edges tokenizes as it did in context: true for WordPiece
        (BERT); byte-level BPE without a prefix space differs, so its windows are all checked."""
        encoding = self._encode([_PROBE])[0]
        ids, offsets = encoding.ids, encoding.offsets
        cuts = [j for j in range(1, len(ids)) if _word_edge(encoding.word_ids, j)]
        heads = [_PROBE[: offsets[j - 1][1]] for j in cuts]
        tails = [_PROBE[offsets[j][0] :] for j in cuts]
        got = [e.ids for e in self._encode(heads + tails)]
        return got == [ids[:j] for j in cuts] + [ids[j:] for j in cuts]

    def _windows(
        self, text: str, offsets: list[tuple[int, int]], words: list[int | None]
    ) -> list[tuple[int, int, int]]:
        """Token windows ``(first, end, n_tokens)`` that cover all ``len(offsets)`` tokens."""
        size, overlap, n = self._config.max_tokens, self._config.overlap_tokens, len(offsets)
        windows: list[tuple[int, int, int]] = []
        first = 0
        while True:
            end = n if first + size >= n else self._cut(text, offsets, words, first)
            n_tokens = end - first
            if (first, end) != (0, n) and (
                self._verify_all or not (_word_edge(words, first) and _word_edge(words, end))
            ):
                floor = windows[-1][1] if windows else 0
                first, end, n_tokens = self._fit(text, offsets, first, end, floor)
            windows.append((first, end, n_tokens))
            if end >= n:
                return windows
            # Back by the overlap, then a little further if that lands inside a word.
            nxt = max(end - overlap, first + 1)
            edges = (k for k in range(nxt, max(first, nxt - _MAX_SNAP), -1) if _word_edge(words, k))
            first = next(edges, nxt)

    def _cut(self, text: str, offsets: list[tuple[int, int]], words: list[int | None], first: int) -> int:
        """The end (exclusive) of a full window that starts at token ``first``."""
        size, overlap = self._config.max_tokens, self._config.overlap_tokens
        hi = first + size
        lo = max(first + overlap + 1, hi - int(size * _BOUNDARY_ZONE))
        best, best_quality = hi, -1
        for j in range(hi, lo - 1, -1):  # from the end: among equals, the longest window wins
            quality = _cut_quality(text, offsets, words, j)
            if quality > best_quality:
                best, best_quality = j, quality
        if best_quality == 0:  # no word edge near the end: any word edge beats splitting a word
            return next((j for j in range(lo - 1, first + overlap, -1) if _word_edge(words, j)), hi)
        return best

    def _fit(
        self, text: str, offsets: list[tuple[int, int]], first: int, end: int, floor: int
    ) -> tuple[int, int, int]:
        """Shrinks a window until its text, tokenized alone, fits: from the end while that stays
        past ``floor`` (the previous window's end, so ends keep increasing), then from the start.
        Returns ``(first, end, n_tokens)``."""
        while True:
            c0, c1 = _region(text, offsets, first, end)
            n_tokens = len(self._encode([text[c0:c1]])[0].ids)
            if n_tokens <= self._config.max_tokens or end - first == 1:
                return first, end, n_tokens
            if end > floor + 1:
                end -= 1
            else:
                first += 1

    def _chunk_one(
        self,
        document: DocumentEnvelope,
        text: str,
        nfc: Alignment | None,
        collapse: Alignment,
        encoding: Encoding,
    ) -> ChunkedDocument:
        offsets = encoding.offsets
        if not offsets:
            raise ValueError(f"document {document.id!r}: the tokenizer finds no tokens in its text")
        chunks: list[Chunk] = []
        bounds: list[tuple[int, int, int, int, str]] = []
        for number, (first, end, n_tokens) in enumerate(self._windows(text, offsets, encoding.word_ids)):
            c0, c1 = _region(text, offsets, first, end)
            align = collapse.then(nfc, c0, c1)
            start, stop, stored = align.start(0), align.end(c1 - c0), align.dumps()
            cid = chunk_id(document.id, number)
            chunks.append(Chunk(cid, document.id, number, text[c0:c1], start, stop, n_tokens, stored))
            bounds.append((c0, c1, start, stop, stored))
        # Spans and alignments are stored with the chunks, so an edit of the original text that
        # moves them but leaves the cleaned text alone (whitespace) changes the hash too.
        payload = {
            "chunker": CHUNKER_VERSION,
            "model": self._model,
            "max_tokens": self._config.max_tokens,
            "overlap_tokens": self._config.overlap_tokens,
            "title": document.title,
            "metadata": document.metadata,
            "text": text,
            "chunks": bounds,
        }
        data = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        digest = blake2b(data.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
        return ChunkedDocument(document.id, digest, chunks)
