"""deployments.stage_batching.Batcher: continuous batching of one stage (asyncio only, no Ray)."""

from __future__ import annotations

import asyncio
import time

import pytest

from deployments.stage_batching import Batcher


class Stage:
    """A stage that records its batches; ``gate`` (when set) holds each batch until released."""

    def __init__(self, gated: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.gate: asyncio.Event | None = asyncio.Event() if gated else None

    async def run(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
            self.gate.clear()
        if any(item < 0 for item in items):
            raise ValueError(f"negative item in {items}")
        return [item * 10 for item in items]


def test_a_lone_call_runs_at_once_and_gets_its_result():
    async def main() -> tuple[int, list[list[int]]]:
        stage = Stage()
        batcher = Batcher(stage.run, max_batch_size=8)
        return await batcher(3), stage.batches

    assert asyncio.run(main()) == (30, [[3]])


def test_calls_arriving_while_a_batch_runs_share_the_next_one_each_with_its_own_result():
    async def main() -> tuple[list[int], list[list[int]]]:
        stage = Stage(gated=True)
        batcher = Batcher(stage.run, max_batch_size=8)
        first = asyncio.create_task(batcher(1))
        await asyncio.sleep(0)  # the first batch starts alone and holds
        await asyncio.sleep(0)
        rest = [asyncio.create_task(batcher(i)) for i in (2, 3, 4)]
        await asyncio.sleep(0)
        assert stage.gate is not None
        stage.gate.set()  # the first batch ends; the three waiting go together
        while len(stage.batches) < 2:
            await asyncio.sleep(0)
        stage.gate.set()
        return await asyncio.gather(first, *rest), stage.batches

    results, batches = asyncio.run(main())
    assert results == [10, 20, 30, 40]
    assert batches == [[1], [2, 3, 4]]


def test_a_backlog_is_cut_at_max_batch_size_in_arrival_order():
    async def main() -> tuple[list[int], list[list[int]]]:
        stage = Stage()
        batcher = Batcher(stage.run, max_batch_size=2)
        results = await asyncio.gather(*(batcher(i) for i in range(5)))
        return results, stage.batches

    results, batches = asyncio.run(main())
    assert results == [0, 10, 20, 30, 40]
    assert batches == [[0, 1], [2, 3], [4]]


def test_a_batch_that_raises_fails_its_callers_only_and_the_stage_goes_on():
    async def main() -> list[object]:
        stage = Stage()
        batcher = Batcher(stage.run, max_batch_size=2)
        return await asyncio.gather(*(batcher(i) for i in (1, -1, 2, 3)), return_exceptions=True)

    first, second, third, fourth = asyncio.run(main())
    assert isinstance(first, ValueError) and first is second and "[1, -1]" in str(first)
    assert (third, fourth) == (20, 30)


def test_a_cancelled_caller_is_left_out_of_its_batch():
    async def main() -> tuple[list[object], list[list[int]]]:
        stage = Stage(gated=True)
        batcher = Batcher(stage.run, max_batch_size=8)
        first = asyncio.create_task(batcher(1))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        gone, kept = asyncio.create_task(batcher(2)), asyncio.create_task(batcher(3))
        await asyncio.sleep(0)
        gone.cancel()  # its client went away while it waited
        await asyncio.sleep(0)
        assert stage.gate is not None
        stage.gate.set()
        while len(stage.batches) < 2:
            await asyncio.sleep(0)
        stage.gate.set()
        return await asyncio.gather(first, gone, kept, return_exceptions=True), stage.batches

    (first, gone, kept), batches = asyncio.run(main())
    assert (first, kept) == (10, 30) and isinstance(gone, asyncio.CancelledError)
    assert batches == [[1], [3]]


def test_a_wrong_number_of_results_is_an_error_naming_both_counts():
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    async def main() -> list[object]:
        batcher = Batcher(short, max_batch_size=4)
        return await asyncio.gather(batcher(1), batcher(2), return_exceptions=True)

    first, second = asyncio.run(main())
    assert isinstance(first, RuntimeError) and "a batch of 2 items returned 1 results" in str(first)
    assert second is first


def test_wait_s_holds_a_lone_call_for_company_but_not_a_full_batch():
    async def main(calls: int) -> tuple[float, list[list[int]]]:
        stage = Stage()
        batcher = Batcher(stage.run, max_batch_size=2, wait_s=0.3)
        start = time.perf_counter()
        await asyncio.gather(*(batcher(i) for i in range(calls)))
        return time.perf_counter() - start, stage.batches

    alone, batches = asyncio.run(main(1))
    assert alone >= 0.3 and batches == [[0]]
    full, batches = asyncio.run(main(2))
    assert full < 0.25 and batches == [[0, 1]]


def test_each_batch_size_is_reported():
    async def main() -> tuple[list[int], list[list[int]]]:
        stage, sizes = Stage(), []
        batcher = Batcher(stage.run, max_batch_size=3, observe=sizes.append)
        await asyncio.gather(*(batcher(i) for i in range(5)))
        await batcher(9)
        return sizes, stage.batches

    sizes, batches = asyncio.run(main())
    assert sizes == [len(batch) for batch in batches] == [3, 2, 1]


def test_one_batcher_serves_successive_event_loops():
    stage = Stage()
    batcher = Batcher(stage.run, max_batch_size=4)
    assert asyncio.run(batcher(1)) == 10
    assert asyncio.run(batcher(2)) == 20
    assert (batcher.batches, batcher.items) == (2, 2)


@pytest.mark.parametrize(("size", "wait"), [(0, 0.0), (1, -0.1)])
def test_bad_settings_are_refused_by_name(size, wait):
    with pytest.raises(ValueError, match="max_batch_size" if size < 1 else "wait_s"):
        Batcher(Stage().run, max_batch_size=size, wait_s=wait)
