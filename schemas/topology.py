"""Names shared by every layer, defined once: actors, shard directories, consumer groups, lag.

- A long-lived actor is named ``<index>/<role>/<i>`` in the settings' Ray namespace, so a command
  finds the actors another command started (``serve`` finds the shards ``ingest`` writes).
- Shard ``i`` of an index keeps its node-local state in ``<home>/data/<index>/shard-NNN``.
- The ingest consumer group of an index is ``riverbed.<index>``: each index has its own offsets.
- The images of an index live in an index beside it, ``<index>-images`` (:func:`images_index`): its
  own shards, data directory and consumer group (on the images topic), so the image path reuses
  every piece of the text path's machinery. Index names ending in ``-images`` are reserved.
- :data:`Offsets` maps ``{topic: {partition: offset}}``; for a consumer group the offset is the
  next one to read, so lag is ``end - committed`` summed over partitions.
- :data:`Version` is the ``(topic, partition, offset)`` of the record a change comes from. Two
  versions of one id are ordered only when they come from the same topic and partition (Kafka
  orders nothing else): :func:`is_older` says whether a change must yield to a stored one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

Offsets = dict[str, dict[int, int]]
Version = tuple[str, int, int]
SearchMode = Literal["vector", "keyword", "hybrid", "graph"]
"""``graph``: hybrid, fused with the chunks the knowledge graph finds around the query's entities."""
SEARCH_MODES: tuple[SearchMode, ...] = get_args(SearchMode)
Role = Literal["shard", "embedder", "source"]
ROLES: tuple[Role, ...] = get_args(Role)


def actor_name(index: str, role: Role, i: int) -> str:
    """``<index>/<role>/<i>``: the name of a long-lived actor of ``index``."""
    return f"{index}/{role}/{i}"


def shard_directory(data_dir: Path, shard: int) -> Path:
    """Where shard ``shard`` of the index whose data directory is ``data_dir`` keeps its state."""
    return data_dir / f"shard-{shard:03d}"


def consumer_group(index: str) -> str:
    """The ingest consumer group of ``index``."""
    return f"riverbed.{index}"


IMAGES_SUFFIX = "-images"


def images_index(index: str) -> str:
    """The index that holds ``index``'s images: ``<index>-images``."""
    return f"{index}{IMAGES_SUFFIX}"


GRAPH_SUFFIX = "-graph"


def graph_index(index: str) -> str:
    """The index that holds ``index``'s knowledge graph: ``<index>-graph``."""
    return f"{index}{GRAPH_SUFFIX}"


def lag(ends: Offsets, committed: Offsets) -> int:
    """Records written to the topics in ``ends`` and not yet committed (missing partitions: 0)."""
    return sum(
        max(0, end - committed.get(topic, {}).get(partition, 0))
        for topic, parts in ends.items()
        for partition, end in parts.items()
    )


def is_older(change: Version | None, stored: Version | None) -> bool:
    """Whether ``change`` is older than ``stored`` and so must not overwrite it: both known, from
    the same topic and partition, and ``change``'s offset lower. Equal versions are the same
    record delivered again (idempotent), never older."""
    if change is None or stored is None:
        return False
    return change[:2] == stored[:2] and change[2] < stored[2]
