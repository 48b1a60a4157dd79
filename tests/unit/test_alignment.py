"""Alignment: the piecewise map from a chunk's text back into its document, and its stored form."""

from __future__ import annotations

import sys
import unicodedata

import pytest

from actors.alignment import Alignment, chunk_alignment


def pieces(*spec: tuple[int, int, int, bool]) -> Alignment:
    align = Alignment()
    for derived, src_start, src_end, linear in spec:
        align.add(derived, src_start, src_end, linear)
    return align


def test_linear_pieces_map_each_position_and_opaque_ones_their_whole_source() -> None:
    # "a b" from "a\r\nb": "a" linear, " " from the two code points "\r\n", "b" linear
    align = pieces((0, 0, 1, True), (1, 1, 3, False), (2, 3, 4, True))
    assert [align.start(i) for i in range(3)] == [0, 1, 3]
    assert [align.end(i) for i in range(1, 4)] == [1, 3, 4]
    assert list(align.pieces(0, 3)) == [(0, 1, 0, 1, True), (1, 2, 1, 3, False), (2, 3, 3, 4, True)]
    assert list(align.pieces(1, 2)) == [(1, 2, 1, 3, False)]


def test_contiguous_linear_pieces_merge_and_the_identity_is_stored_as_empty() -> None:
    align = pieces((0, 5, 8, True), (3, 8, 10, True))
    assert align.dumps() == ""
    assert Alignment.loads("", 4, origin=7).start(2) == 9


def test_stored_form_round_trips_relative_to_the_first_source_position() -> None:
    align = pieces((0, 10, 12, True), (2, 12, 15, False), (3, 16, 20, True))
    stored = align.dumps()
    assert stored == "[[0,0],[2,2,5],[3,6]]"
    back = Alignment.loads(stored, 7, origin=10)
    for pos in range(7):
        assert (back.start(pos), back.end(pos + 1)) == (align.start(pos), align.end(pos + 1))


def test_then_composes_two_steps_over_a_range() -> None:
    inner = pieces((0, 0, 2, True), (2, 2, 4, False), (3, 4, 5, True))  # "xé b" <- "xé  b"
    outer = pieces((0, 0, 1, True), (1, 1, 3, False), (2, 3, 6, True))  # "xé  b" <- "xe\u0301  b"
    composed = inner.then(outer, 1, 4)  # "é b" <- "e\u0301  b", counted from 0
    assert list(composed.pieces(0, 3)) == [(0, 1, 1, 3, False), (1, 2, 3, 5, False), (2, 3, 5, 6, True)]


@pytest.mark.parametrize(
    "bad",
    [
        "nope",
        "{}",
        "[]",
        "[[1,0]]",
        "[[0,0],[0,1]]",
        "[[0,-1]]",
        "[[0,0,1,2]]",
        "[[0,true]]",
        "[[0,0],[9,9]]",
    ],
)
def test_malformed_stored_forms_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="alignment"):
        Alignment.loads(bad, 5)


def test_a_chunk_without_an_alignment_gets_the_identity_only_where_it_is_exact() -> None:
    ascii_same_length = chunk_alignment(None, "plain text", (40, 50))
    assert ascii_same_length is not None and (ascii_same_length.start(6), ascii_same_length.end(10)) == (
        46,
        50,
    )
    assert chunk_alignment(None, "plain text", (40, 51)) is None  # something was collapsed
    assert chunk_alignment(None, "café", (0, 4)) is None  # NFC may have composed and grown
    assert chunk_alignment("[[0,0],[9,9]]", "short", (0, 5)) is None  # malformed: no offsets


def test_no_code_point_normalises_to_two_or_more_ascii_ones() -> None:
    """The premise of the identity for ASCII chunks without an alignment: cleaning then never
    grew anything, so a text as long as its span had nothing removed either."""
    grown = [
        cp
        for cp in range(sys.maxunicode + 1)
        if (d := unicodedata.decomposition(chr(cp))) and not d.startswith("<")  # canonical only
        and (n := unicodedata.normalize("NFC", chr(cp))).isascii() and len(n) > 1
    ]  # fmt: skip
    assert grown == []
