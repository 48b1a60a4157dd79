"""Knowledge-graph extraction with the packaged spaCy pipeline: entity keys, entities and relations of
fixed sentences, aliases within a document, the title, spans in the document, routing to shards."""

from __future__ import annotations

from collections import Counter

import pytest

from actors.chunker import Chunk, Chunker
from actors.graph_extract import (
    CO_OCCURS,
    MENTIONS,
    TITLE,
    Extractor,
    document_graph,
    entity_key,
    for_shard,
    resolve_aliases,
    title_key,
)
from schemas.envelope import DocumentEnvelope
from schemas.errors import ConfigError
from schemas.ids import shard_of
from schemas.settings import ChunkConfig, GraphConfig

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
TESLA = (
    "Nikola Tesla was born in Smiljan. Tesla invented the induction motor, which Westinghouse bought "
    "in 1888. He worked for Thomas Edison in New York City."
)


@pytest.fixture(scope="module")
def extractor() -> Extractor:
    extractor = Extractor(GraphConfig())
    extractor.warm_up()
    return extractor


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Nikola Tesla", "nikola tesla"),
        ("The Beatles", "beatles"),
        ("the U.S. Army's", "us army"),
        ("Beyoncé  Knowles-Carter", "beyoncé knowles carter"),
        ("Cafe\u0301 (Paris)", "café paris"),  # NFC joins e + combining accent
        ("O'Neill", "oneill"),
        ("ΣΊΣΥΦΟΣ", "σίσυφοσ"),  # casefold, not lower
        ("...", ""),
    ],
)
def test_entity_keys_are_normalised(name: str, key: str) -> None:
    assert entity_key(name) == key


def test_entities_and_relations_of_fixed_sentences(extractor: Extractor) -> None:
    (facts,) = extractor.extract([TESLA])
    keys = [m.key for m in facts.mentions]
    assert keys == ["nikola tesla", "smiljan", "westinghouse", "thomas edison", "new york city"]
    assert "1888" not in keys  # a DATE: not an entity by default
    for m in facts.mentions:
        assert TESLA[m.start : m.end] == m.name
        assert TESLA[m.sentence[0] : m.sentence[1]].endswith(".")
    triples = {(r.source, r.target, r.label) for r in facts.relations}
    assert ("nikola tesla", "smiljan", "born in") in triples  # subject, passive verb, preposition
    assert ("new york city", "thomas edison", CO_OCCURS) in triples  # no verb joins them
    # co_occurs only within a sentence
    assert not any({r.source, r.target} == {"smiljan", "westinghouse"} for r in facts.relations)


def test_a_subject_verb_object_triple_replaces_the_pair_s_co_occurrence(extractor: Extractor) -> None:
    (facts,) = extractor.extract(["Microsoft acquired GitHub."])
    assert [(r.source, r.target, r.label) for r in facts.relations] == [("microsoft", "github", "acquire")]


def test_skipped_labels_and_the_window_are_settings() -> None:
    text = "Tesla met Edison, Westinghouse and Morgan in New York in June 1888."
    (facts,) = Extractor(GraphConfig()).extract([text])
    assert "june 1888" not in [m.key for m in facts.mentions]
    (facts,) = Extractor(GraphConfig(skip_labels=())).extract([text])
    assert "june 1888" in [m.key for m in facts.mentions]  # a DATE
    narrow = Extractor(GraphConfig(pair_window=1))
    (few,) = narrow.extract([text])
    keys = list(dict.fromkeys(m.key for m in few.mentions))
    co = [r for r in few.relations if r.label == CO_OCCURS]
    assert len(keys) >= 4
    # each entity is paired with the next one only: at most len(keys) - 1 pairs
    assert 0 < len(co) <= len(keys) - 1


def test_short_forms_join_the_longest_key_they_are_part_of() -> None:
    counts = Counter({"nikola tesla": 1, "tesla": 3, "tesla motors company": 1, "edison": 1, "new york": 1})
    assert resolve_aliases(counts) == {"tesla": "tesla motors company"}
    counts = Counter({"thomas edison": 2, "thomas alva edison": 1, "edison": 1, "alva": 1})
    # "thomas edison" is not a contiguous run of "thomas alva edison"
    assert resolve_aliases(counts) == {"edison": "thomas alva edison", "alva": "thomas alva edison"}
    counts = Counter({"john smith": 1, "adam smith": 2, "smith": 1})
    assert resolve_aliases(counts) == {"smith": "adam smith"}  # equal length: the one mentioned more


def test_nationalities_and_languages_join_only_their_own_kind() -> None:
    counts = Counter({"american": 2, "american airlines": 1, "korean": 1, "south korean": 1, "english": 1})
    labels = {
        "american": {"NORP"},
        "american airlines": {"ORG"},
        "korean": {"NORP"},
        "south korean": {"NORP"},
        "english": {"LANGUAGE", "NORP"},
    }
    assert resolve_aliases(counts, labels) == {"korean": "south korean"}
    assert resolve_aliases(counts) == {"american": "american airlines", "korean": "south korean"}


@pytest.mark.parametrize(
    ("title", "key"),
    [
        ("Poison (American band)", "poison"),
        ("Winner (band)", "winner"),
        ("Paris, Texas", "paris texas"),
        ("(What's the Story) Morning Glory?", "whats the story morning glory"),  # not trailing
        ("(1)", "1"),  # only a parenthesis: kept
        ("It (novel)", "it novel"),  # too short on its own: the whole title
        ("M (1931 film)", "m 1931 film"),
        ("Ray (film)", "ray"),
    ],
)
def test_a_title_s_key_drops_its_disambiguation(title: str, key: str) -> None:
    assert title_key(title) == key


def test_a_disambiguated_title_is_the_entity_its_name_is(extractor: Extractor) -> None:
    text = "Poison is an American rock band. Poison sold many records."
    chunks = _chunks(text, "Poison (American band)", max_tokens=64)
    graphs = document_graph(
        "poison", "Poison (American band)", chunks, extractor.extract([c.text for c in chunks])
    )
    titles = [m for g in graphs for m in g.mentions if m.label == TITLE]
    assert {(m.key, m.name) for m in titles} == {("poison", "Poison (American band)")}
    norp = {m.key for g in graphs for m in g.mentions if m.label == "NORP"}
    assert norp == {"american"}  # not the title's alias: a nationality, part of the longer name


def _chunks(text: str, title: str, max_tokens: int = 16) -> list[Chunk]:
    chunker = Chunker(ChunkConfig(max_tokens=max_tokens, overlap_tokens=0), MINILM)
    doc = chunker.chunk(DocumentEnvelope(id="tesla", text=text, title=title))
    return doc.chunks


def test_a_document_graph_resolves_aliases_adds_the_title_and_keeps_document_spans(
    extractor: Extractor,
) -> None:
    # collapsed whitespace: chunk text and document text differ in length
    text = (
        "Nikola   Tesla was born in Smiljan.\n\n\nTesla later moved to New York City, where Tesla met Edison."
    )
    chunks = _chunks(text, "Nikola Tesla")
    assert len(chunks) >= 2
    graphs = document_graph("tesla", "Nikola Tesla", chunks, extractor.extract([c.text for c in chunks]))
    assert [g.chunk_id for g in graphs] == [c.chunk_id for c in chunks]
    mentions = [m for g in graphs for m in g.mentions]
    for m in mentions:
        if m.label == TITLE:
            assert m.name == "Nikola Tesla"
            continue
        # the span, in the document's own text, holds the name (whitespace as the document has it)
        assert " ".join(text[m.start : m.end].split()) == m.name
        assert m.sentence[0] <= m.start < m.end <= m.sentence[1]
    keys = {m.key for m in mentions}
    assert "tesla" not in keys and "nikola tesla" in keys  # "Tesla" joined the title's key
    for g, c in zip(graphs, chunks, strict=True):
        titles = [m for m in g.mentions if m.label == TITLE]
        assert [(m.start, m.end) for m in titles] == [(c.start, c.end)]
        named = {m.key for m in g.mentions if m.label != TITLE} - {"nikola tesla"}
        assert {r.target for r in g.relations if r.label == MENTIONS} == named
        assert all(r.source != r.target for r in g.relations)


def test_a_document_without_a_title_has_no_title_entity(extractor: Extractor) -> None:
    chunks = _chunks(TESLA, "")
    graphs = document_graph("tesla", None, chunks, extractor.extract([c.text for c in chunks]))
    assert not [m for g in graphs for m in g.mentions if m.label == TITLE]
    assert not [r for g in graphs for r in g.relations if r.label == MENTIONS]
    with pytest.raises(ValueError, match="2 chunks but 1 facts"):
        document_graph("tesla", None, [chunks[0], chunks[0]], extractor.extract(["x"]))


def test_shards_hold_their_entities_mentions_and_every_edge_touching_them(extractor: Extractor) -> None:
    chunks = _chunks(TESLA, "Nikola Tesla", max_tokens=256)
    (graph,) = document_graph("tesla", "Nikola Tesla", chunks, extractor.extract([c.text for c in chunks]))
    n = 3
    parts = [for_shard(graph, i, n) for i in range(n)]
    assert Counter(m for p in parts for m in p.mentions) == Counter(graph.mentions)
    for i, part in enumerate(parts):
        assert all(shard_of(m.key, n) == i for m in part.mentions)
        expected = [r for r in graph.relations if i in (shard_of(r.source, n), shard_of(r.target, n))]
        assert list(part.relations) == expected
    assert for_shard(graph, 0, 1) == graph


def test_a_model_that_cannot_be_loaded_is_named() -> None:
    with pytest.raises(ConfigError, match=r"graph\.model 'no_such_pipeline' cannot be loaded"):
        Extractor(GraphConfig(model="no_such_pipeline")).warm_up()
