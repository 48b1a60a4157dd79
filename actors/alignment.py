"""Alignment: where each position of a derived string (cleaned text) lies in its source.

The chunker builds one per cleaning step and composes them into one per chunk, from the chunk's
text to the document's text; that one is stored beside the chunk as plain JSON text (so every
backend can keep it in a string column), and read back to map search-time offsets, such as the
query words found in a hit, into the document.

Stored form (``ChunkRecord.alignment``, ``Hit.alignment``), positions relative to the chunk:

- ``""``: the identity. Position ``i`` of the chunk's text is position ``start + i`` of the
  document (the common case: the cleaning changed nothing in the chunk, or replaced whitespace
  characters one for one).
- a JSON list of pieces in increasing derived order, the first at 0: ``[d, s]`` is a linear piece
  (derived ``d + i`` is source ``s + i`` up to the next piece), ``[d, s, e]`` an opaque one
  (all of it comes from source ``[s, e)``: a collapsed whitespace run, or a cluster that NFC
  rewrote). Source positions count from the chunk's ``start``.
- ``None``: not known (a chunk written before alignments were stored).
"""

from __future__ import annotations

import json
from bisect import bisect_right
from collections.abc import Iterator
from itertools import pairwise

Piece = tuple[int, int, int, int, bool]
"""``(derived start, derived end, source start, source end, linear)``."""


class Alignment:
    """Maps positions of a derived string back to its source, piece by piece. A linear piece maps
    code point ``i`` to ``i``; an opaque one maps to its whole source range, which keeps mapped
    spans conservative: the source range always covers what the derived range came from."""

    def __init__(self) -> None:
        self._starts: list[int] = []  # derived start of each piece, increasing
        self._pieces: list[tuple[int, int, bool]] = []  # (source start, source end, linear)

    def add(self, derived: int, src_start: int, src_end: int, linear: bool) -> None:
        """Appends the piece that begins at ``derived`` (after every piece so far)."""
        if linear and self._pieces and self._pieces[-1][2] and self._pieces[-1][1] == src_start:
            self._pieces[-1] = (self._pieces[-1][0], src_end, True)  # fewer pieces, faster bisect
            return
        self._starts.append(derived)
        self._pieces.append((src_start, src_end, linear))

    def start(self, pos: int) -> int:
        """Source position where derived code point ``pos`` begins."""
        i = bisect_right(self._starts, pos) - 1
        src_start, _, linear = self._pieces[i]
        return src_start + pos - self._starts[i] if linear else src_start

    def end(self, pos: int) -> int:
        """Source position where derived code point ``pos - 1`` ends (an exclusive end)."""
        i = bisect_right(self._starts, pos - 1) - 1
        src_start, src_end, linear = self._pieces[i]
        return src_start + pos - self._starts[i] if linear else src_end

    def pieces(self, lo: int, hi: int) -> Iterator[Piece]:
        """The pieces over derived ``[lo, hi)``, clipped to it (a clipped opaque piece keeps its
        whole source range); empty ones skipped."""
        i = max(bisect_right(self._starts, lo) - 1, 0)
        while i < len(self._starts) and self._starts[i] < hi:
            d0, (s0, s1, linear) = self._starts[i], self._pieces[i]
            d1 = self._starts[i + 1] if i + 1 < len(self._starts) else hi
            a, b = max(d0, lo), min(d1, hi)
            if a < b:
                yield (a, b, s0 + a - d0, s0 + b - d0, True) if linear else (a, b, s0, s1, False)
            i += 1

    def then(self, outer: Alignment | None, lo: int, hi: int) -> Alignment:
        """This alignment over derived ``[lo, hi)``, followed by ``outer`` (which maps this one's
        source on to its own; None: the identity). Derived positions of the result count from
        ``lo``; its source positions are ``outer``'s."""
        out = Alignment()
        for d0, _, s0, s1, linear in self.pieces(lo, hi):
            if outer is None:
                out.add(d0 - lo, s0, s1, linear)
            elif not linear:
                out.add(d0 - lo, outer.start(s0), outer.end(s1), False)
            else:
                for e0, _, t0, t1, inner_linear in outer.pieces(s0, s1):
                    out.add(d0 - lo + e0 - s0, t0, t1, inner_linear)
        return out

    def dumps(self) -> str:
        """The stored form, with source positions counted from the first piece's source start:
        ``""`` for the identity, else the JSON list of pieces."""
        origin = self._pieces[0][0] if self._pieces else 0
        if len(self._pieces) <= 1 and all(linear for _, _, linear in self._pieces):
            return ""
        pieces = [
            [d, s - origin] if linear else [d, s - origin, e - origin]
            for d, (s, e, linear) in zip(self._starts, self._pieces, strict=True)
        ]
        return json.dumps(pieces, separators=(",", ":"))

    @classmethod
    def loads(cls, data: str, length: int, origin: int = 0) -> Alignment:
        """An alignment from its stored form, for a derived string of ``length`` code points whose
        source positions count from ``origin``. Raises ``ValueError`` when ``data`` is not one."""
        if data == "":
            align = cls()
            align.add(0, origin, origin + length, linear=True)
            return align
        try:
            pieces = json.loads(data)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not an alignment: {exc}") from exc
        if not (isinstance(pieces, list) and pieces and all(_is_piece(p) for p in pieces)):
            raise ValueError(f"not an alignment: {data[:80]!r}")
        starts = [p[0] for p in pieces] + [length]
        if starts[0] != 0 or any(a >= b for a, b in pairwise(starts)):
            raise ValueError(f"alignment pieces must start at 0 and increase within {length}: {data[:80]!r}")
        align = cls()
        ends = starts[1:]
        for piece, derived_end in zip(pieces, ends, strict=True):
            d, s = piece[0], origin + piece[1]
            linear = len(piece) == 2
            align.add(d, s, s + derived_end - d if linear else origin + piece[2], linear)
        return align


def chunk_alignment(stored: str | None, text: str, span: tuple[int, int]) -> Alignment | None:
    """How a hit's ``text`` maps into its document, in the document's coordinates (``span`` is the
    hit's ``(start, end)``), or None where that cannot be known exactly: a malformed alignment, or
    none stored (a chunk from before alignments) unless the identity is certain, which it is for
    ASCII text exactly as long as its span (cleaning then replaced nothing but whitespace one for
    one: NFC turns no code point into two or more ASCII ones, so nothing grew to make up for
    anything removed)."""
    start, end = span
    if stored is None:
        stored = "" if text.isascii() and len(text) == end - start else None
    if stored is None:
        return None
    try:
        return Alignment.loads(stored, len(text), origin=start)
    except ValueError:
        return None


def _is_piece(piece: object) -> bool:
    if not isinstance(piece, list) or len(piece) not in (2, 3):
        return False
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in piece):
        return False
    return len(piece) == 2 or piece[2] >= piece[1]
