"""Search results as the HTTP surface shows them: passages, images, and images as RAG passages.

An image is stored as one record of the images index (chunk ``<image id>#0``, document id = image
id, text = its caption or "", span ``[0, len(caption)]``), whose metadata holds, beside the
envelope's own, two keys Riverbed reserves: ``_image_uri`` (where it was read from, only when it
came by uri) and ``_image_thumbnail_b64`` (a small JPEG). Hits return them as ``uri`` and
``thumbnail_b64`` and never in ``metadata``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from actors.vector_index import Hit
from deployments.fusion import Ranked, matched_terms
from schemas.api import Citation, Explanation, ImageHit, SearchHit
from schemas.envelope import IMAGE_METADATA_KEYS, IMAGE_THUMBNAIL_KEY, IMAGE_URI_KEY
from schemas.metadata import MetadataValue


def user_metadata(metadata: Mapping[str, MetadataValue]) -> dict[str, MetadataValue]:
    """``metadata`` without the keys Riverbed reserves for an image's uri and thumbnail."""
    return {k: v for k, v in metadata.items() if k not in IMAGE_METADATA_KEYS}


def _text_or_none(metadata: Mapping[str, MetadataValue], key: str) -> str | None:
    value = metadata.get(key)
    return value if isinstance(value, str) else None


def search_hit(ranked: Ranked, explain_query: str | None = None) -> SearchHit:
    """A ``/v1/search`` hit (a passage, or an image with its id, uri and thumbnail); with
    ``explain_query``, the score breakdown and the query's words found in the text (an image's:
    its caption)."""
    hit = ranked.hit
    explanation = None
    if explain_query is not None:
        explanation = Explanation(
            vector_rank=ranked.vector_rank,
            vector_score=ranked.vector_score,
            keyword_rank=ranked.keyword_rank,
            keyword_score=ranked.keyword_score,
            fused_score=ranked.fused_score,
            rerank_score=ranked.rerank_score,
            graph_rank=ranked.graph_rank,
            graph_entities=list(ranked.graph_entities),
            matched_terms=matched_terms(explain_query, hit),
        )
    image: dict[str, Any] = {}
    metadata = dict(hit.metadata)
    if ranked.modality == "image":
        image = {
            "image_id": hit.document_id,
            "uri": _text_or_none(metadata, IMAGE_URI_KEY),
            "thumbnail_b64": _text_or_none(metadata, IMAGE_THUMBNAIL_KEY),
        }
        metadata = user_metadata(metadata)
    return SearchHit(
        chunk_id=hit.chunk_id,
        document_id=hit.document_id,
        title=hit.title,
        text=hit.text,
        span=(hit.start, hit.end),
        score=ranked.score,
        metadata=metadata,
        explanation=explanation,
        modality=ranked.modality,
        **image,
    )


def image_hit(ranked: Ranked) -> ImageHit:
    """A ``/v1/images/search`` hit: the image's id, score, caption (None when it has none),
    metadata, uri and thumbnail."""
    hit = ranked.hit
    return ImageHit(
        image_id=hit.document_id,
        score=ranked.score,
        caption=hit.text or None,
        metadata=user_metadata(hit.metadata),
        uri=_text_or_none(hit.metadata, IMAGE_URI_KEY),
        thumbnail_b64=_text_or_none(hit.metadata, IMAGE_THUMBNAIL_KEY),
    )


def as_passage(ranked: Ranked) -> Hit:
    """The hit as the generator reads it. A passage as it is; an image as a passage of its own
    words: titled ``image <id>``, its caption (or "(no caption)") followed by its metadata
    (``key: value; ...``), without the reserved keys (a thumbnail is no words, and up to
    megabytes). Its span stays the caption's."""
    hit = ranked.hit
    if ranked.modality != "image":
        return hit
    metadata = user_metadata(hit.metadata)
    text = hit.text.strip() or "(no caption)"
    if metadata:
        text += " (" + "; ".join(f"{k}: {_shown(v)}" for k, v in sorted(metadata.items())) + ")"
    return dataclasses.replace(hit, title=f"image {hit.document_id}", text=text, metadata=metadata)


def _shown(value: MetadataValue) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def citation(fields: Mapping[str, Any], ranked: Ranked) -> Citation:
    """A RAG citation (the generator's ``fields``) of the passage ``ranked``, saying its modality
    and, for an image, its id and uri. An image's ``text`` is the caption its ``span`` covers (the
    generator read the caption with the metadata after it: :func:`as_passage`)."""
    extra: dict[str, Any] = {"modality": ranked.modality}
    if ranked.modality == "image":
        hit = ranked.hit
        start, end = fields["span"]
        extra.update(image_id=hit.document_id, uri=_text_or_none(hit.metadata, IMAGE_URI_KEY))
        fields = {**fields, "text": hit.text[start - hit.start : end - hit.start]}
    return Citation(**fields, **extra)


def judged_score(ranked: Ranked) -> float | None:
    """The score weak retrieval is judged on (``serve.rag.min_score``, a cosine between a question
    and a passage): a passage's vector score; None for an image, whose cosine with a question is on
    another model's scale (or a text-to-image one) and never compares with the threshold."""
    return ranked.vector_score if ranked.modality == "text" else None
