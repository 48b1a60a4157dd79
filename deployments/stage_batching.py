"""Continuous batching for one stage of a replica (the query embedder's forward pass, the shards'
search): a call starts at once when its stage is idle, and the calls that arrive while a batch
runs share the next one.

Serve's ``@serve.batch`` forms a batch by waiting ``batch_wait_timeout_s`` after its first call
and only then queues it for a free slot: a lone query always pays the wait, and under load the
batches are cut by the clock rather than by what piled up while the model was busy. Here the
queue is drained by a worker (one per lane; see :class:`Batcher`): finding the stage idle, it
takes the call at once (or, with ``wait_s``, waits that long for company unless the batch fills);
busy, it leaves the arrivals in the queue and takes up to ``max_batch_size`` of them when it is
done. One query at a time is then never delayed, and a loaded stage runs batches as large as the
load, with no tuning of a window.

Each caller gets its own result, or the exception its batch raised; a caller that is cancelled
(its client went away) before its batch starts is left out of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


class Batcher(Generic[In, Out]):
    """``await batcher(item)`` → ``run(batch)``'s result for ``item``, ``run`` taking a list of
    items and returning one result per item, in order; ``observe`` is told each batch's size.

    ``lanes``: how many batches may run at once. A second lane opens only when every open one is
    running a batch, so one slow batch (a shard that does not answer, a reranking) does not hold up
    the queries behind it; with one lane (the query model's, whose batches share its cores anyway)
    everything waits for the running batch. Not thread-safe: one event loop's coroutines call it
    (a replica's)."""

    def __init__(
        self,
        run: Callable[[list[In]], Awaitable[Sequence[Out]]],
        max_batch_size: int,
        wait_s: float = 0.0,
        observe: Callable[[int], None] | None = None,
        lanes: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        if wait_s < 0:
            raise ValueError(f"wait_s must not be negative, not {wait_s}")
        if lanes < 1:
            raise ValueError(f"lanes must be at least 1, not {lanes}")
        self._run = run
        self._observe = observe
        self.max_batch_size = max_batch_size
        self.wait_s = wait_s
        self.lanes = lanes
        self._queue: deque[tuple[In, asyncio.Future[Out]]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: set[asyncio.Task[None]] = set()
        self._running = 0  # workers running a batch now
        self._filled: asyncio.Event | None = None
        self.batches = 0
        """How many batches ran (with :attr:`items`: the mean batch size)."""
        self.items = 0

    async def __call__(self, item: In) -> Out:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # first use, or a new loop (the old one's queue died with it)
            self._loop, self._filled, self._running = loop, asyncio.Event(), 0
            self._workers.clear()
            self._queue.clear()
        future: asyncio.Future[Out] = loop.create_future()
        self._queue.append((item, future))
        if len(self._queue) >= self.max_batch_size and self._filled is not None:
            self._filled.set()
        self._workers = {worker for worker in self._workers if not worker.done()}
        if len(self._workers) < self.lanes and len(self._workers) == self._running:
            # A fresh context: the worker outlives this request, whose context (Serve's request id,
            # tracing) must not tag the batches of the requests after it.
            self._workers.add(loop.create_task(self._drain(), context=contextvars.Context()))
        return await future

    async def _drain(self) -> None:
        idle = True  # only a batch that finds the stage idle waits wait_s for company
        try:
            while self._queue:
                if idle and self.wait_s > 0 and len(self._queue) < self.max_batch_size and self._filled:
                    self._filled.clear()
                    with contextlib.suppress(TimeoutError):  # at most wait_s, less when the batch fills
                        await asyncio.wait_for(self._filled.wait(), self.wait_s)
                idle = False
                batch: list[tuple[In, asyncio.Future[Out]]] = []
                while self._queue and len(batch) < self.max_batch_size:
                    item, future = self._queue.popleft()
                    if not future.done():  # a cancelled caller is left out
                        batch.append((item, future))
                if batch:
                    self._running += 1
                    try:
                        await self._one(batch)
                    finally:
                        self._running -= 1
        except BaseException:  # the worker is cancelled (its loop is closing): so are the queued calls
            while self._queue:
                self._queue.popleft()[1].cancel()
            raise

    async def _one(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            if self._observe is not None:
                self._observe(len(batch))
        except Exception:  # a metric is never worth a request
            log.exception("reporting a batch's size failed")
        try:
            results = await self._run([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} items returned {len(results)} results")
        except Exception as exc:  # the batch's callers get its error; the stage goes on
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:  # the worker itself is cancelled (its loop is closing)
            for _, future in batch:
                future.cancel()
            raise
        for (_, future), result in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(result)
