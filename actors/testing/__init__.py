"""Test helpers shipped with the package (STYLE.md principle 10), for fast unit tests of other
components; the real backends are exercised by the integration tests."""

from actors.testing.memory_index import InMemoryIndex

__all__ = ["InMemoryIndex"]
