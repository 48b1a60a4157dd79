"""`riverbed index list`, `index alias`, `index release` and the checks of `index reindex`.

A new embedding model means a new index: `riverbed index reindex --model PATH --as NAME` replays
the documents topic into ``NAME`` (its own consumer group starts at the topic's beginning) with
``embed.model`` PATH while the served index goes on serving; `riverbed index alias ALIAS --to NAME`
then moves the alias that the app serves (``index.alias``), which the app follows without a failed
request (:mod:`deployments.alias`). The index an app serves (``index.name``, or where an alias
points) is never a reindex target: replaying into it would mix two models' vectors.

Once the alias has moved, the old index's shard actors (detached: they outlive the commands that
started them) still hold its vectors in memory; `riverbed index release NAME` stops them (text,
image and graph shards). Its data stays on disk, and the next command that reads it starts them
again. It refuses a served index and one being ingested (its source or embedder actors alive).
"""

from __future__ import annotations

from typing import Any

from actors.index_alias import alias_record, list_aliases, write_alias
from deployments.alias import for_index
from schemas.errors import ConfigError
from schemas.settings import Settings
from schemas.topology import GRAPH_SUFFIX, IMAGES_SUFFIX, graph_index, images_index


def indexes(settings: Settings) -> list[str]:
    """Every index with data under this home (not the images or graph indexes beside them)."""
    root = settings.home / "data"
    names = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    return [n for n in names if not n.endswith((IMAGES_SUFFIX, GRAPH_SUFFIX))]


def check_reindex_target(settings: Settings, target: str, model: str) -> Settings:
    """The settings a reindex into ``target`` with ``model`` runs with; ConfigError when
    ``target`` is served (the configured index, or an alias's target) or holds another model's
    vectors."""
    from cluster.serving import recorded_model

    served = served_indexes(settings)
    if target in served:
        raise ConfigError(
            f"index {target!r} is served ({served[target]} names it): reindex into a new name, then move "
            "the alias to it (`riverbed index alias ALIAS --to NAME`)"
        )
    new = for_index(settings, target, model)
    recorded = recorded_model(new)
    if recorded is not None and recorded[0] != model:
        raise ConfigError(
            f"index {target!r} already holds vectors of {recorded[0]!r}, not {model!r}: pick another name"
        )
    return new


def served_indexes(settings: Settings) -> dict[str, str]:
    """The indexes served under this home, each with what names it: every alias's target, and
    ``index.name`` unless the app serves an alias (``index.alias``; then ``index.name`` is only
    what commands ingest into by default)."""
    configured = {} if settings.index.alias else {settings.index.name: "index.name"}
    aliases = list_aliases(settings.state_dir)
    return configured | {index: f"alias {alias!r}" for alias, index in aliases.items()}


SWITCH_GRACE_S = 60.0
"""After an alias moves, what each ingress replica may take beyond ``index.alias_check_s`` to
notice it and warm the new index's retriever up (load its model) before it stops reading the old."""


def release_index(settings: Settings, target: str, now: float | None = None) -> dict[str, Any]:
    """Stops the shard actors of index ``target`` and of its images and graph indexes (see the
    module docstring); ``{"index", "stopped": [actor names]}``. ConfigError when ``target`` is
    served, an alias moved away from it less than ``alias_check_s`` + :data:`SWITCH_GRACE_S` ago
    (replicas may still read it), it is an images or graph index (release the index itself), or
    it is being ingested."""
    import time

    import ray

    if target.endswith((IMAGES_SUFFIX, GRAPH_SUFFIX)):
        raise ConfigError(
            f"index {target!r} is the images or graph index beside another: release that index instead "
            "(its images and graph go with it)"
        )
    served = served_indexes(settings)
    if target in served:
        raise ConfigError(
            f"index {target!r} is served ({served[target]} names it): move the alias away first "
            "(`riverbed index alias ALIAS --to NAME`)"
        )
    grace = settings.index.alias_check_s + SWITCH_GRACE_S
    now = time.time() if now is None else now
    for alias in list_aliases(settings.state_dir):
        record = alias_record(settings.state_dir, alias) or {}
        left = float(record.get("set_at") or 0) + grace - now
        if record.get("previous") == target and left > 0:
            raise ConfigError(
                f"alias {alias!r} moved from index {target!r} {grace - left:.0f} s ago: serving replicas may "
                f"still read it; release it in {left:.0f} s"
            )
    sides = {target, images_index(target), graph_index(target)}
    mine = {  # <index>/<role>/<i> (schemas.topology.actor_name) -> role
        a["name"]: parts[1]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a.get("namespace") == settings.ray.namespace
        and len(parts := a["name"].rsplit("/", 2)) == 3
        and parts[0] in sides
    }
    busy = sorted(name for name, role in mine.items() if role != "shard")
    if busy:
        raise ConfigError(
            f"index {target!r} is being ingested ({', '.join(busy)} running): stop that ingest first"
        )
    stopped = []
    for name in sorted(mine):
        try:
            ray.kill(ray.get_actor(name, namespace=settings.ray.namespace))
            stopped.append(name)
        except ValueError:  # gone meanwhile
            continue
    return {"index": target, "stopped": stopped}


def move_alias(settings: Settings, alias: str, target: str) -> dict[str, Any]:
    """Points ``alias`` at ``target``, which must hold data; ``{"alias", "index", "previous"}``."""
    from cluster.serving import recorded_model

    recorded = recorded_model(for_index(settings, target))
    if recorded is None:
        raise ConfigError(f"index {target!r} holds no data under {settings.home}: build it first")
    previous = write_alias(settings.state_dir, alias, target)
    return {"alias": alias, "index": target, "previous": previous, "model": recorded[0]}


def list_indexes(settings: Settings, broker: bool = True) -> list[dict[str, Any]]:
    """Per index: its model, documents, chunks, lag (with ``broker``) and the aliases naming it."""
    from cluster.serving import recorded_model
    from cluster.stats import index_stats

    aliases = list_aliases(settings.state_dir)
    rows = []
    for name in indexes(settings):
        scoped = for_index(settings, name)
        recorded = recorded_model(scoped)
        stats = index_stats(scoped, broker=broker)
        rows.append(
            {
                "index": name,
                "model": recorded[0] if recorded else None,
                "dim": recorded[1] if recorded else None,
                "documents": stats["documents"],
                "chunks": stats["chunks"],
                "lag": stats.get("lag"),
                "aliases": sorted(a for a, index in aliases.items() if index == name),
                "configured": name == settings.index.name,
            }
        )
    return rows
