"""Budget batching: pure logic (no torch), shared by the embedders and the streaming side.

The tools:

- :func:`plan_batches` groups the texts of one call into batches whose *padded* size fits a token
  budget, so a batch of short texts holds many of them and a batch of long texts few, and texts of
  similar length share a batch (little padding).
- :func:`plan_pixel_batches` groups the images of one call into batches whose pixels (summed)
  fit a budget, in input order.
- :func:`pad_rows` pads one planned batch of token ids into arrays, as a tokenizer's padding
  would, without tokenizing again.
- :class:`TokenBudgetQueue` is a micro-batcher for a stream: items wait until their tokens fill a
  budget or the oldest of them has waited long enough, whichever comes first.

Units: lengths and budgets are tokens as the embedding model counts them (specials included), or
pixels (width times height) for images; times are seconds of a monotonic clock.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


def _check_positive(name: str, value: int | float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Groups item indices into batches for a padded forward pass.

    Contract:

    - every index of ``lengths`` appears in exactly one batch;
    - a batch's padded cost, ``len(batch) * max(lengths of its items)`` tokens, is at most
      ``max_batch_tokens``, and it holds at most ``max_batch_size`` items; the one exception is an
      item longer than the budget by itself, which gets a batch of its own (never dropped);
    - items are taken longest first (ties in input order), so each batch holds neighbours in
      length and padding stays small; within a batch, indices are in that order too;
    - deterministic: the same arguments give the same plan.

    Greedy on the sorted order: batches start with their longest item, so the padded cost of a
    candidate batch is known before adding to it. Cost: O(n log n).
    """
    _check_positive("max_batch_tokens", max_batch_tokens)
    _check_positive("max_batch_size", max_batch_size)
    for i, length in enumerate(lengths):
        if length < 0:
            raise ValueError(f"lengths[{i}] is negative ({length})")

    # sorted() is stable, so equal lengths keep input order: the plan is deterministic.
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for i in order:
        if batch and (len(batch) >= max_batch_size or (len(batch) + 1) * longest > max_batch_tokens):
            batches.append(batch)
            batch = []
        if not batch:
            longest = lengths[i]
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


def plan_pixel_batches(pixels: Sequence[int], max_batch_pixels: int, max_batch_size: int) -> list[list[int]]:
    """Groups image indices into batches for one forward pass each.

    Contract:

    - every index of ``pixels`` appears in exactly one batch, and the batches, read one after the
      other, list the indices in input order (``[[0, 1], [2], [3, 4]]``);
    - a batch's pixels (the sum of its items') are at most ``max_batch_pixels``, and it holds at
      most ``max_batch_size`` items; the one exception is an image over the budget by itself, which
      gets a batch of its own (never dropped);
    - deterministic: the same arguments give the same plan.

    No sorting: the model resizes every image to its own input size, so batches cost the same
    whatever their mix; the budget bounds the memory the images of one batch hold before that.
    Greedy: a batch is closed when the next image would not fit. Cost: O(n).
    """
    _check_positive("max_batch_pixels", max_batch_pixels)
    _check_positive("max_batch_size", max_batch_size)
    for i, n in enumerate(pixels):
        if n < 0:
            raise ValueError(f"pixels[{i}] is negative ({n})")

    batches: list[list[int]] = []
    batch: list[int] = []
    total = 0
    for i, n in enumerate(pixels):
        if batch and (len(batch) >= max_batch_size or total + n > max_batch_pixels):
            batches.append(batch)
            batch, total = [], 0
        batch.append(i)
        total += n
    if batch:
        batches.append(batch)
    return batches


def pad_rows(
    columns: Mapping[str, Sequence[Sequence[int]]],
    batch: Sequence[int],
    pad_values: Mapping[str, int],
    left: bool = False,
) -> dict[str, np.ndarray]:
    """The rows ``batch`` of each column (``input_ids``, ``token_type_ids``...), padded to the
    longest of them, plus ``attention_mask`` (1 on tokens, 0 on padding).

    Arrays are int64, shape ``(len(batch), longest)``, row ``r`` for ``columns[key][batch[r]]``;
    padding is ``pad_values.get(key, 0)``, on the right, or the left when ``left``. Every column
    must hold rows of the same lengths as ``columns["input_ids"]``.
    """
    lengths = [len(columns["input_ids"][i]) for i in batch]
    shape = (len(batch), max(lengths, default=0))
    arrays = {key: np.full(shape, pad_values.get(key, 0), dtype=np.int64) for key in columns}
    mask = np.zeros(shape, dtype=np.int64)
    for row, (i, length) in enumerate(zip(batch, lengths, strict=True)):
        span = slice(shape[1] - length, None) if left else slice(0, length)
        mask[row, span] = 1
        for key, array in arrays.items():
            array[row, span] = columns[key][i]
    arrays["attention_mask"] = mask
    return arrays


@dataclass(frozen=True)
class _Pending(Generic[T]):
    item: T
    n_tokens: int
    enqueued_at: float


class TokenBudgetQueue(Generic[T]):
    """A FIFO micro-batcher: collect items until their tokens fill a budget or the oldest is stale.

    - ``max_batch_tokens``: a batch is ready once the pending items hold at least this many tokens
      (a plain sum, before padding: the embedder pads per planned sub-batch);
    - ``max_wait_s``: or once the oldest pending item has waited this many seconds (bounds latency
      when the stream is slow); ``0`` makes any pending item ready at once;
    - ``max_batch_size``: or once this many items are pending (``None``: no item cap).

    :meth:`take` returns at most one batch's worth, oldest first, and leaves the rest pending, so
    a burst is cut into batches of bounded size. The clock (``clock()``, monotonic seconds) is
    injectable so that tests need no sleeps; ``now`` arguments override it per call.

    Order: items come out in the order they were added. Not thread-safe: one owner (an actor's
    event loop) adds and takes.
    """

    def __init__(
        self,
        max_batch_tokens: int,
        max_wait_s: float,
        max_batch_size: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _check_positive("max_batch_tokens", max_batch_tokens)
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must not be negative, got {max_wait_s}")
        if max_batch_size is not None:
            _check_positive("max_batch_size", max_batch_size)
        self._max_tokens = max_batch_tokens
        self._max_wait_s = max_wait_s
        self._max_size = max_batch_size
        self._clock = clock
        self._pending: deque[_Pending[T]] = deque()
        self._tokens = 0

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def pending_tokens(self) -> int:
        """Sum of the pending items' token counts."""
        return self._tokens

    def add(self, item: T, n_tokens: int, now: float | None = None) -> None:
        """Appends ``item`` costing ``n_tokens`` tokens, enqueued at ``now`` (default: the clock)."""
        if n_tokens < 0:
            raise ValueError(f"n_tokens must not be negative, got {n_tokens}")
        at = self._clock() if now is None else now
        self._pending.append(_Pending(item, n_tokens, at))
        self._tokens += n_tokens

    def deadline(self) -> float | None:
        """When (clock seconds) the oldest pending item's wait runs out; ``None`` when empty.

        An owner loop sleeps until ``min(deadline, next arrival)`` rather than polling."""
        if not self._pending:
            return None
        return self._pending[0].enqueued_at + self._max_wait_s

    def ready(self, now: float | None = None) -> bool:
        """Whether a batch should be taken now: budget filled, item cap reached, or oldest stale."""
        if not self._pending:
            return False
        if self._tokens >= self._max_tokens:
            return True
        if self._max_size is not None and len(self._pending) >= self._max_size:
            return True
        at = self._clock() if now is None else now
        return at - self._pending[0].enqueued_at >= self._max_wait_s

    def take(self) -> list[T]:
        """Removes and returns the oldest items, as many as fit ``max_batch_tokens`` (and
        ``max_batch_size``), at least one when any is pending; ``[]`` when empty.

        Does not check :meth:`ready`: a caller draining on shutdown takes regardless.
        """
        batch: list[T] = []
        tokens = 0
        while self._pending:
            head = self._pending[0]
            if batch and (
                tokens + head.n_tokens > self._max_tokens
                or (self._max_size is not None and len(batch) >= self._max_size)
            ):
                break
            self._pending.popleft()
            batch.append(head.item)
            tokens += head.n_tokens
        self._tokens -= tokens
        return batch
