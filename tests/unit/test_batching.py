"""plan_batches, plan_pixel_batches, pad_rows and TokenBudgetQueue: pure logic, injected clock, no sleeps."""

from __future__ import annotations

import random
from collections.abc import Callable
from itertools import pairwise

import numpy as np
import pytest

from actors.batching import TokenBudgetQueue, pad_rows, plan_batches, plan_pixel_batches


def _padded_cost(batch: list[int], lengths: list[int]) -> int:
    return len(batch) * max(lengths[i] for i in batch)


# -- plan_batches -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_plan_covers_every_index_once_and_respects_budget_and_size(seed: int) -> None:
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(500)]
    plan = plan_batches(lengths, max_batch_tokens=2048, max_batch_size=16)
    flat = [i for batch in plan for i in batch]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in plan:
        assert 1 <= len(batch) <= 16
        assert _padded_cost(batch, lengths) <= 2048


def test_plan_groups_by_length_longest_first() -> None:
    lengths = [5, 100, 6, 99, 7, 98]
    plan = plan_batches(lengths, max_batch_tokens=300, max_batch_size=3)
    assert plan == [[1, 3, 5], [4, 2, 0]]
    # Sorted grouping: every item of an earlier batch is at least as long as any later one.
    flat = [lengths[i] for batch in plan for i in batch]
    assert flat == sorted(flat, reverse=True)


def test_plan_ties_keep_input_order_and_is_deterministic() -> None:
    lengths = [10] * 7
    plan = plan_batches(lengths, max_batch_tokens=30, max_batch_size=100)
    assert plan == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan_batches(lengths, 30, 100) == plan


def test_plan_budget_packs_short_items_many_to_a_batch() -> None:
    lengths = [200, 200, 10, 10, 10, 10, 10, 10, 10, 10]
    plan = plan_batches(lengths, max_batch_tokens=400, max_batch_size=64)
    assert plan == [[0, 1], [2, 3, 4, 5, 6, 7, 8, 9]]


def test_plan_oversize_item_gets_its_own_batch() -> None:
    lengths = [50, 1000, 40]
    plan = plan_batches(lengths, max_batch_tokens=100, max_batch_size=8)
    assert plan == [[1], [0, 2]]  # 1000 is never dropped; 50 and 40 padded to 2 x 50 fit


def test_plan_size_cap() -> None:
    plan = plan_batches([1] * 10, max_batch_tokens=10_000, max_batch_size=4)
    assert [len(b) for b in plan] == [4, 4, 2]


def test_plan_empty_and_zero_lengths() -> None:
    assert plan_batches([], 100, 4) == []
    assert plan_batches([0, 0, 0], 100, 2) == [[0, 1], [2]]


@pytest.mark.parametrize("plan", [plan_batches, plan_pixel_batches])
@pytest.mark.parametrize(("costs", "budget", "size"), [([1], 0, 1), ([1], 1, 0), ([3, -1], 10, 1)])
def test_plans_reject_bad_arguments(
    plan: Callable[..., object], costs: list[int], budget: int, size: int
) -> None:
    with pytest.raises(ValueError):
        plan(costs, budget, size)


# -- plan_pixel_batches -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_pixel_plan_contract_on_random_inputs(seed: int) -> None:
    rng = random.Random(seed)
    budget, size = rng.randint(1, 5000), rng.randint(1, 8)
    pixels = [rng.choice([0, rng.randint(1, budget), rng.randint(budget, 3 * budget)]) for _ in range(200)]
    plan = plan_pixel_batches(pixels, budget, size)
    assert [i for batch in plan for i in batch] == list(range(len(pixels)))  # each once, in order
    for batch in plan:
        assert 1 <= len(batch) <= size
        assert sum(pixels[i] for i in batch) <= budget or len(batch) == 1  # over budget: alone
    for before, after in pairwise(plan):  # greedy: a batch closes only when full
        assert len(before) == size or sum(pixels[i] for i in before + after[:1]) > budget
    assert plan_pixel_batches(pixels, budget, size) == plan


def test_pixel_plan_packs_small_images_and_keeps_order() -> None:
    side = 64 * 64
    assert plan_pixel_batches([side] * 5, 3 * side, 100) == [[0, 1, 2], [3, 4]]
    assert plan_pixel_batches([10, 90, 5, 5, 90], 100, 100) == [[0, 1], [2, 3, 4]]


def test_pixel_plan_an_image_over_budget_gets_its_own_batch() -> None:
    assert plan_pixel_batches([10, 500, 10, 10], 100, 8) == [[0], [1], [2, 3]]
    assert plan_pixel_batches([500], 100, 8) == [[0]]


def test_pixel_plan_size_cap_empty_and_zero() -> None:
    assert plan_pixel_batches([1] * 5, 10_000, 2) == [[0, 1], [2, 3], [4]]
    assert plan_pixel_batches([], 100, 4) == []
    assert plan_pixel_batches([0, 0, 0], 100, 2) == [[0, 1], [2]]


# -- pad_rows -----------------------------------------------------------------------------------


def test_pad_rows_right_and_left() -> None:
    columns = {
        "input_ids": [[101, 7, 102], [101, 102], [101, 5, 6, 102]],
        "token_type_ids": [[0] * 3, [0] * 2, [1] * 4],
    }
    right = pad_rows(columns, [1, 0], {"input_ids": 9, "token_type_ids": 3})
    np.testing.assert_array_equal(right["input_ids"], [[101, 102, 9], [101, 7, 102]])
    np.testing.assert_array_equal(right["token_type_ids"], [[0, 0, 3], [0, 0, 0]])
    np.testing.assert_array_equal(right["attention_mask"], [[1, 1, 0], [1, 1, 1]])
    assert right["input_ids"].dtype == np.int64
    left = pad_rows(columns, [2, 1], {"input_ids": 0}, left=True)
    np.testing.assert_array_equal(left["input_ids"], [[101, 5, 6, 102], [0, 0, 101, 102]])
    np.testing.assert_array_equal(left["token_type_ids"], [[1, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_array_equal(left["attention_mask"], [[1, 1, 1, 1], [0, 0, 1, 1]])


# -- TokenBudgetQueue ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_queue_ready_when_budget_reached() -> None:
    clock = FakeClock()
    queue: TokenBudgetQueue[str] = TokenBudgetQueue(100, max_wait_s=10.0, clock=clock)
    assert not queue.ready()
    queue.add("a", 60)
    assert not queue.ready()
    assert queue.pending_tokens == 60
    queue.add("b", 40)
    assert queue.ready()
    assert queue.take() == ["a", "b"]
    assert len(queue) == 0
    assert queue.pending_tokens == 0
    assert not queue.ready()


def test_queue_ready_when_oldest_waited_max_wait() -> None:
    clock = FakeClock()  # steps are powers of two: exact in binary floating point
    queue: TokenBudgetQueue[str] = TokenBudgetQueue(1000, max_wait_s=0.5, clock=clock)
    queue.add("a", 1)
    clock.now += 0.25
    queue.add("b", 1)
    assert queue.deadline() == 100.5
    assert not queue.ready()
    clock.now += 0.25  # "a" has now waited 0.5 s, "b" only 0.25 s: the oldest decides
    assert queue.ready()
    assert queue.ready(now=100.0) is False  # an explicit now overrides the clock
    assert queue.take() == ["a", "b"]
    assert queue.deadline() is None


def test_queue_zero_wait_is_ready_at_once() -> None:
    queue: TokenBudgetQueue[int] = TokenBudgetQueue(1000, max_wait_s=0.0, clock=FakeClock())
    queue.add(1, 1)
    assert queue.ready()


def test_queue_take_keeps_order_and_cuts_at_budget() -> None:
    queue: TokenBudgetQueue[int] = TokenBudgetQueue(100, max_wait_s=1.0, clock=FakeClock())
    for i in range(10):
        queue.add(i, 30)
    assert queue.take() == [0, 1, 2]  # a fourth would make 120 > 100
    assert queue.take() == [3, 4, 5]
    assert queue.pending_tokens == 4 * 30
    assert queue.take() + queue.take() == [6, 7, 8, 9]
    assert queue.take() == []


def test_queue_oversize_item_comes_out_alone() -> None:
    queue: TokenBudgetQueue[str] = TokenBudgetQueue(100, max_wait_s=1.0, clock=FakeClock())
    queue.add("huge", 500)
    queue.add("small", 1)
    assert queue.ready()
    assert queue.take() == ["huge"]
    assert queue.take() == ["small"]


def test_queue_item_cap() -> None:
    queue: TokenBudgetQueue[int] = TokenBudgetQueue(
        10_000, max_wait_s=1.0, max_batch_size=2, clock=FakeClock()
    )
    queue.add(1, 1)
    assert not queue.ready()
    queue.add(2, 1)
    queue.add(3, 1)
    assert queue.ready()
    assert queue.take() == [1, 2]
    assert queue.take() == [3]


def test_queue_explicit_add_time() -> None:
    queue: TokenBudgetQueue[str] = TokenBudgetQueue(1000, max_wait_s=1.0, clock=FakeClock())
    queue.add("a", 1, now=5.0)
    assert queue.deadline() == 6.0
    assert queue.ready(now=6.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_batch_tokens": 0, "max_wait_s": 1.0},
        {"max_batch_tokens": 1, "max_wait_s": -1.0},
        {"max_batch_tokens": 1, "max_wait_s": 1.0, "max_batch_size": 0},
    ],
)
def test_queue_rejects_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TokenBudgetQueue(**kwargs)  # type: ignore[arg-type]


def test_queue_rejects_negative_tokens() -> None:
    queue: TokenBudgetQueue[str] = TokenBudgetQueue(10, max_wait_s=1.0)
    with pytest.raises(ValueError):
        queue.add("a", -1)
