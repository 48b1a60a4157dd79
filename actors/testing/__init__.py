"""Test helpers shipped with the package (STYLE.md principle 10), for fast unit tests of other
components; the real backends are exercised by the integration tests."""

from actors.testing.downstream import LocalDownstream
from actors.testing.hash_embedder import HashEmbedder
from actors.testing.memory_index import InMemoryIndex

__all__ = ["HashEmbedder", "InMemoryIndex", "LocalDownstream"]
