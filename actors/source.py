"""The documents source: a :class:`~actors.stream_consumer.StreamConsumer` of the documents topic
with the :class:`~actors.text_processor.TextProcessor`, one member of an index's consumer group.

Its delivery, failure, ordering and backpressure contracts are the stream consumer's.
"""

from __future__ import annotations

from actors.processor import Downstream
from actors.stream_consumer import ConsumerFactory, DeadLetterSink, StreamConsumer
from actors.text_processor import TextProcessor
from schemas.settings import ChunkConfig, IngestConfig, KafkaConfig


def document_consumer(
    kafka: KafkaConfig,
    ingest: IngestConfig,
    chunk: ChunkConfig,
    model: str,
    servers: str,
    group: str,
    downstream: Downstream,
    *,
    name: str = "source",
    max_wait_s: float = 0.05,
    embed_timeout_s: float = 300.0,
    consumer_factory: ConsumerFactory | None = None,
    dead_letters: DeadLetterSink | None = None,
    retry_initial_s: float = 0.5,
) -> StreamConsumer:
    """A consumer of ``kafka.topics.documents`` in ``group`` that chunks with ``model``'s tokenizer
    and writes through ``downstream``."""
    return StreamConsumer(
        kafka,
        ingest,
        kafka.topics.documents,
        servers,
        group,
        TextProcessor(chunk, model),
        downstream,
        name=name,
        max_wait_s=max_wait_s,
        embed_timeout_s=embed_timeout_s,
        consumer_factory=consumer_factory,
        dead_letters=dead_letters,
        retry_initial_s=retry_initial_s,
    )
