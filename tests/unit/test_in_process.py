"""``serve.search_in_ingress``: the retriever built inside the ingress replica and called through a
handle's shape (``h.method.remote(...)`` awaited), and the app that binds it in place of the
Retriever deployment, its resources added to the ingress's."""

from __future__ import annotations

import asyncio

import pytest

from deployments.app import build_app
from deployments.in_process import InIngressRetriever, InProcessHandle
from schemas.errors import InvalidRequestError
from schemas.settings import load_settings


class Thing:
    def __init__(self) -> None:
        self.calls: list[str] = []

    async def search(self, query: str, k: int = 1) -> list[str]:
        self.calls.append(query)
        return [query] * k

    def describe(self) -> dict[str, str]:
        return {"model": "m"}

    def broken(self) -> None:
        raise InvalidRequestError("bad filter", "filter")

    async def broken_later(self) -> None:
        raise InvalidRequestError("bad mode", "mode")


def test_calls_go_through_the_shape_of_a_handle():
    thing = Thing()
    handle = InProcessHandle(thing)

    async def run() -> tuple:
        return await handle.search.remote("q", k=2), await handle.describe.remote()

    assert asyncio.run(run()) == (["q", "q"], {"model": "m"})
    assert thing.calls == ["q"]


def test_errors_come_out_of_the_await_not_the_call():
    handle = InProcessHandle(Thing())
    pending = handle.broken.remote()  # a plain method's error waits for the await, as a handle's does
    with pytest.raises(InvalidRequestError, match="bad filter"):
        asyncio.run(pending)
    with pytest.raises(InvalidRequestError, match="bad mode"):
        asyncio.run(handle.broken_later.remote())


def test_only_public_methods_are_reachable():
    with pytest.raises(AttributeError):
        InProcessHandle(Thing())._private  # noqa: B018
    with pytest.raises(AttributeError):
        InProcessHandle(Thing()).missing  # noqa: B018


def _ingress(overrides: dict) -> object:
    app = build_app(load_settings(overrides=overrides), "kafka:9092")
    return app._bound_deployment  # type: ignore[attr-defined]


def test_the_app_builds_the_retriever_in_the_ingress_with_its_resources():
    serve = {  # search_in_ingress by default
        "ingress": {"num_cpus": 0.1},
        "retriever": {"num_cpus": 0.5, "num_gpus": 0.25},
        "query_threads": 3,
    }
    ingress = _ingress({"serve": serve})
    retriever = [a for a in ingress.init_args if isinstance(a, InIngressRetriever)]
    assert len(retriever) == 1
    assert ingress.ray_actor_options == {"num_cpus": pytest.approx(0.6), "num_gpus": 0.25}
    assert retriever[0].embed.num_cpus == 3  # serve.query_threads torch threads, as the deployment


def test_the_retriever_can_be_a_deployment_of_its_own():
    ingress = _ingress({"serve": {"search_in_ingress": False, "ingress": {"num_cpus": 0.1}}})
    assert not any(isinstance(a, InIngressRetriever) for a in ingress.init_args)
    assert ingress.ray_actor_options["num_cpus"] == pytest.approx(0.1)
