"""The sources: members of an index's consumer groups, each a
:class:`~actors.stream_consumer.StreamConsumer` of one topic with the processor of its kind.

- :func:`document_consumer`: the documents topic, with the
  :class:`~actors.text_processor.TextProcessor` (its downstream: the text embedder and the index's
  shards);
- :func:`image_consumer`: the images topic, with the
  :class:`~actors.image_processor.ImageProcessor` (its downstream: an embedder of the processor's
  pixel arrays and the shards of the images index);
- :func:`graph_consumer`: the documents topic again, in the knowledge graph's own group, with the
  :class:`~actors.graph_processor.GraphProcessor` (its downstream: the extractors and the graph
  shards).

Their delivery, failure, ordering and backpressure contracts are the stream consumer's.
"""

from __future__ import annotations

from typing import TypedDict, Unpack

from actors.graph_processor import GraphProcessor
from actors.image_processor import ImageProcessor
from actors.processor import Downstream
from actors.stream_consumer import ConsumerFactory, DeadLetterSink, StreamConsumer
from actors.text_processor import TextProcessor
from schemas.settings import ChunkConfig, ImagesConfig, IngestConfig, KafkaConfig


class SourceOptions(TypedDict, total=False):
    """A source's keyword options, passed on to :class:`~actors.stream_consumer.StreamConsumer`
    (whose defaults apply to those left out): ``name`` (in logs and stats), ``max_wait_s`` (the
    longest a poll waits to fill a batch), ``embed_timeout_s`` (when a batch waiting for vectors is
    reported stalled), ``consumer_factory`` (a Kafka consumer stand-in, for tests),
    ``dead_letters`` (a dead-letter sink; default: a producer to the dead-letter topic),
    ``retry_initial_s`` (the first back-off of a retry)."""

    name: str
    max_wait_s: float
    embed_timeout_s: float
    consumer_factory: ConsumerFactory | None
    dead_letters: DeadLetterSink | None
    retry_initial_s: float


def document_consumer(
    kafka: KafkaConfig,
    ingest: IngestConfig,
    chunk: ChunkConfig,
    model: str,
    servers: str,
    group: str,
    downstream: Downstream,
    **options: Unpack[SourceOptions],
) -> StreamConsumer:
    """A consumer of ``kafka.topics.documents`` in ``group`` that chunks with ``model``'s tokenizer
    and writes through ``downstream``."""
    processor = TextProcessor(chunk, model)
    return StreamConsumer(
        kafka, ingest, kafka.topics.documents, servers, group, processor, downstream, **options
    )


def image_consumer(
    kafka: KafkaConfig,
    ingest: IngestConfig,
    images: ImagesConfig,
    servers: str,
    group: str,
    downstream: Downstream,
    **options: Unpack[SourceOptions],
) -> StreamConsumer:
    """A consumer of ``kafka.topics.images`` in ``group`` that reads and decodes images within
    ``images``' limits and writes through ``downstream``, whose embedder takes the processor's
    inputs (``uint8`` arrays of shape ``(height, width, 3)``)."""
    processor = ImageProcessor(images)
    return StreamConsumer(
        kafka, ingest, kafka.topics.images, servers, group, processor, downstream, **options
    )


def graph_consumer(
    kafka: KafkaConfig,
    ingest: IngestConfig,
    chunk: ChunkConfig,
    model: str,
    servers: str,
    group: str,
    downstream: Downstream,
    **options: Unpack[SourceOptions],
) -> StreamConsumer:
    """A consumer of ``kafka.topics.documents`` in ``group`` (the graph's own) that chunks as the
    text path does (``model``'s tokenizer: the same chunk ids) and writes each chunk's entities and
    relations through ``downstream``, whose "embedder" extracts them."""
    processor = GraphProcessor(chunk, model)
    return StreamConsumer(
        kafka, ingest, kafka.topics.documents, servers, group, processor, downstream, **options
    )
