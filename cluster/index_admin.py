"""`riverbed index list`, `index alias` and the checks of `index reindex`.

A new embedding model means a new index: `riverbed index reindex --model PATH --as NAME` replays
the documents topic into ``NAME`` (its own consumer group starts at the topic's beginning) with
``embed.model`` PATH while the served index goes on serving; `riverbed index alias ALIAS --to NAME`
then moves the alias that the app serves (``index.alias``), which the app follows without a failed
request (:mod:`deployments.alias`). The index an app serves (``index.name``, or where an alias
points) is never a reindex target: replaying into it would mix two models' vectors.
"""

from __future__ import annotations

from typing import Any

from actors.index_alias import list_aliases, write_alias
from deployments.alias import for_index
from schemas.errors import ConfigError
from schemas.settings import Settings
from schemas.topology import GRAPH_SUFFIX, IMAGES_SUFFIX


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

    served = {settings.index.name: "index.name"} | {
        index: f"alias {alias!r}" for alias, index in list_aliases(settings.state_dir).items()
    }
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
