"""Test helpers shipped with the package (so other packages' tests can use them), for fast unit
tests of other components; the real backends are exercised by the integration tests."""

from actors.testing.downstream import LocalDownstream
from actors.testing.hash_embedder import HashEmbedder
from actors.testing.memory_index import InMemoryIndex

__all__ = ["HashEmbedder", "InMemoryIndex", "LocalDownstream"]
