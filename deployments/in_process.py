"""A deployment's class run inside the replica that calls it, behind the interface of its handle.

With ``serve.search_in_ingress`` each ingress replica builds its own retriever (the query model,
the shard readers) and calls it as it would call the Retriever deployment: ``handle.search.remote(
...)`` still returns something to await, and errors still come out of the await (raised by the
retriever itself rather than wrapped by Ray). A search then costs no call between replicas: the
request is parsed, embedded, searched and answered in one process.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from schemas.settings import EmbedConfig, Settings


class _Method:
    __slots__ = ("_method",)

    def __init__(self, method: Callable[..., Any]) -> None:
        self._method = method

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """The call's result as an awaitable, as a handle's ``DeploymentResponse`` is (a coroutine
        method's coroutine, or a plain method's value or error delivered on the await)."""
        try:
            result = self._method(*args, **kwargs)
        except Exception as exc:
            return _raise(exc)
        return result if inspect.isawaitable(result) else _value(result)


async def _value(result: Any) -> Any:
    return result


async def _raise(exc: Exception) -> Any:
    raise exc


class InProcessHandle:
    """``instance`` called through the shape of a Serve deployment handle: ``h.name.remote(*args)``."""

    def __init__(self, instance: object) -> None:
        self._instance = instance

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(getattr(self._instance, name))


@dataclass(frozen=True)
class InIngressRetriever:
    """What an ingress replica needs to build its own retriever (``serve.search_in_ingress``): the
    settings and the query model's config. Bound in place of the Retriever deployment."""

    settings: Settings
    embed: EmbedConfig

    def build(self) -> InProcessHandle:
        from deployments.retriever import Retriever  # the class Serve's decorator wraps

        retriever_class: Any = Retriever.func_or_class  # type: ignore[attr-defined]
        if self.settings.index.alias is not None:  # follow the index the alias points at
            from deployments.alias import AliasedRetriever

            return InProcessHandle(AliasedRetriever(self.settings, self.embed, retriever_class))
        return InProcessHandle(retriever_class(self.settings, self.embed))
