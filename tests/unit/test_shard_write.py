"""ShardWrite's own checks, before any backend sees it (the backends' contract: test_backend_*.py)."""

from __future__ import annotations

import numpy as np
import pytest

from actors.vector_index import ShardWrite


def test_versions_are_checked_and_normalised() -> None:
    for bad in [("docs", -1, 0), ("docs", 0), (0, 0, 0), ("docs", 0, 1.5), "docs:0:1"]:
        with pytest.raises(ValueError, match=r"versions\['d'\]"):
            ShardWrite(versions={"d": bad})  # type: ignore[dict-item]
    write = ShardWrite(versions={"d": ["docs", np.int64(1), np.int32(7)]})  # type: ignore[dict-item]
    assert write.versions == {"d": ("docs", 1, 7)}
    assert all(type(x) in (str, int) for x in write.versions["d"])
