"""Unit tier: no Ray, no Kafka, no GPU. Starting Ray here is a bug, so it raises."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        import ray
    except ImportError:  # pragma: no cover
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unit tests must not start Ray; put this test in tests/integration")

    monkeypatch.setattr(ray, "init", refuse)
