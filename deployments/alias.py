"""Serving an index alias: the retriever follows the index the alias points at.

:class:`AliasedRetriever` stands where the ingress's own retriever stands
(``serve.search_in_ingress``) when ``index.alias`` is set. It builds a retriever for the index the
alias points at, with that index's own embedding model (the one its shards recorded: queries must
be embedded as its chunks were), and checks the alias every ``index.alias_check_s``. When the alias
moves, the new index's retriever is built and warmed beside the old one (off the event loop), then
replaces it in one assignment: requests already running finish on the old one, every later
request goes to the new one, and none fails for the switch. A new target that cannot be served
(its shards are not running, its model does not load) is logged and retried; the old keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from actors.index_alias import read_alias
from deployments.retriever import RayShards
from schemas.errors import ConfigError
from schemas.settings import EmbedConfig, Settings

log = logging.getLogger(__name__)


def alias_target(settings: Settings) -> str:
    """The index ``settings.index.alias`` points at; ConfigError when it points nowhere."""
    alias = settings.index.alias
    if alias is None:
        raise ConfigError("index.alias is not set")
    target = read_alias(settings.state_dir, alias)
    if target is None:
        raise ConfigError(
            f"alias {alias!r} points at no index yet: run `riverbed index alias {alias} --to INDEX`"
        )
    return target


def for_index(settings: Settings, index: str, model: str | None = None) -> Settings:
    """``settings`` for index ``index`` (and embedding model ``model``)."""
    update: dict[str, Any] = {"index": settings.index.model_copy(update={"name": index})}
    if model is not None:
        update["embed"] = settings.embed.model_copy(update={"model": model})
    return settings.model_copy(update=update)


class AliasedRetriever:
    """The retriever of the index ``settings.index.alias`` points at (see the module docstring).
    ``retriever_class(settings, embed)`` builds one. Attribute access goes to the current one."""

    def __init__(self, settings: Settings, embed: EmbedConfig, retriever_class: Any) -> None:
        self._settings = settings
        self._embed = embed
        self._class = retriever_class
        self._target = alias_target(settings)
        self._current = self._build(self._target)
        self._watch: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        """The index served now."""
        return self._target

    def _build(self, index: str) -> Any:
        """A warmed retriever for ``index``, its queries embedded with the model its shards
        recorded (the configured one when they recorded none yet). Blocking."""
        settings = for_index(self._settings, index)
        embed = self._embed
        recorded = ray.get(RayShards(settings).handle(0).recorded_model.remote(), timeout=120)
        if recorded is not None and recorded[0] != embed.model:
            embed = embed.model_copy(update={"model": str(recorded[0])})
        return self._class(settings, embed)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        self._ensure_watching()
        return getattr(self._current, name)

    def _ensure_watching(self) -> None:
        if self._watch is None or self._watch.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # called outside the replica's loop: the next call starts it
                return
            self._watch = loop.create_task(self._follow())

    async def _follow(self) -> None:
        """Moves to the alias's new target whenever it changes (see the module docstring)."""
        alias = self._settings.index.alias
        while True:
            await asyncio.sleep(self._settings.index.alias_check_s)
            try:
                target = await asyncio.to_thread(alias_target, self._settings)
                if target == self._target:
                    continue
                log.info("alias %s moved from %s to %s: building its retriever", alias, self._target, target)
                new = await asyncio.to_thread(self._build, target)
                self._current, self._target = new, target
                log.info("alias %s now serves %s", alias, target)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving the old target; try again next time
                log.warning(
                    "alias %s: cannot serve its target yet (%s); still serving %s", alias, exc, self._target
                )
