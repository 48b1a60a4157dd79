"""The index shard contract (:mod:`actors.vector_index`) as capability mixins, one module each:

- :mod:`~tests.contract.write`: upsert, get, count, re-applying, replacing, truncating, deleting,
  failed writes and wrong vectors;
- :mod:`~tests.contract.ledger`: document rows, versioned writes, offsets, scans (and a copy
  made from them);
- :mod:`~tests.contract.search`: vector search against the exact reference, edge cases;
- :mod:`~tests.contract.filter`: filtered search against :meth:`MetadataFilter.matches`, including
  the rows and filters that trip each backend's translation (SQL, Milvus expressions);
- :mod:`~tests.contract.keyword`: BM25 keyword search (backends that offer :class:`KeywordSearch`);
- :mod:`~tests.contract.persistence`: reopening, refusing another model or dim, crash durability.

A backend's test class (``tests/unit/test_backend_*.py``) combines the mixins of the roles it fills
and implements :meth:`~tests.contract.base.IndexContract.open_index`. Nothing here is collected by
itself: no module is named ``test_*`` and no class ``Test*``.
"""
