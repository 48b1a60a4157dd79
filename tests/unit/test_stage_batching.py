"""deployments.stage_batching.Batcher: continuous batching of one stage (asyncio only, no Ray)."""

from __future__ import annotations

import asyncio
import contextvars
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


def test_a_failing_size_report_costs_no_request():
    def broken(size: int) -> None:
        raise RuntimeError("the metrics registry is gone")

    async def main() -> list[int]:
        batcher = Batcher(Stage().run, max_batch_size=4, observe=broken)
        return await asyncio.wait_for(asyncio.gather(batcher(1), batcher(2)), 5)

    assert asyncio.run(main()) == [10, 20]


def test_wait_s_is_for_a_batch_that_finds_the_stage_idle_not_for_the_backlog_of_a_busy_one():
    async def main() -> tuple[float, list[list[int]]]:
        stage = Stage(gated=True)
        batcher = Batcher(stage.run, max_batch_size=8, wait_s=0.3)
        first = asyncio.create_task(batcher(1))
        while not stage.batches:  # it waited wait_s for company, then started alone
            await asyncio.sleep(0.01)
        second = asyncio.create_task(batcher(2))
        await asyncio.sleep(0.05)
        assert stage.gate is not None
        released = time.perf_counter()
        stage.gate.set()
        while len(stage.batches) < 2:
            await asyncio.sleep(0.001)
        started = time.perf_counter() - released  # the backlog went at once
        stage.gate.set()
        await asyncio.gather(first, second)
        return started, stage.batches

    started, batches = asyncio.run(main())
    assert batches == [[1], [2]] and started < 0.2


def test_a_second_lane_opens_only_while_every_lane_runs_a_batch():
    async def main(lanes: int) -> list[list[int]]:
        stage = Stage(gated=True)
        batcher = Batcher(stage.run, max_batch_size=8, lanes=lanes)
        slow = asyncio.create_task(batcher(1))  # held until released below
        await asyncio.sleep(0.01)
        others = [asyncio.create_task(batcher(i)) for i in (2, 3)]
        await asyncio.sleep(0.01)
        seen = [list(b) for b in stage.batches]
        assert stage.gate is not None
        while not all(t.done() for t in (slow, *others)):
            stage.gate.set()
            await asyncio.sleep(0.001)
        return seen

    assert asyncio.run(main(lanes=2)) == [[1], [2, 3]]  # the two behind the slow one did not wait
    assert asyncio.run(main(lanes=1)) == [[1]]  # one lane: they wait for it


def test_no_second_lane_opens_while_a_batch_waits_for_company():
    async def main() -> list[list[int]]:
        stage = Stage()
        batcher = Batcher(stage.run, max_batch_size=8, wait_s=0.2, lanes=2)
        first = asyncio.create_task(batcher(1))
        await asyncio.sleep(0.02)  # the first waits for company: the second joins it
        await asyncio.gather(first, batcher(2))
        return stage.batches

    assert asyncio.run(main()) == [[1, 2]]


def test_a_cancelled_worker_cancels_the_calls_it_leaves_queued():
    async def main() -> list[object]:
        stage = Stage(gated=True)
        batcher = Batcher(stage.run, max_batch_size=1)
        calls = [asyncio.create_task(batcher(i)) for i in (1, 2, 3)]
        await asyncio.sleep(0.01)
        (worker,) = batcher._workers
        worker.cancel()  # as when the replica's loop shuts down
        return await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)

    assert all(isinstance(r, asyncio.CancelledError) for r in asyncio.run(main()))


def test_batches_do_not_run_in_the_first_callers_context():
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")
    seen: list[str] = []

    async def run(items: list[int]) -> list[int]:
        seen.append(request_id.get())
        return items

    async def call(batcher: Batcher[int, int], rid: str, item: int) -> int:
        request_id.set(rid)
        return await batcher(item)

    async def main() -> None:
        batcher = Batcher(run, max_batch_size=4)
        await asyncio.gather(call(batcher, "first", 1), call(batcher, "second", 2))

    asyncio.run(main())
    assert seen == ["none"]


def test_one_batcher_serves_successive_event_loops():
    stage = Stage()
    batcher = Batcher(stage.run, max_batch_size=4)
    assert asyncio.run(batcher(1)) == 10
    assert asyncio.run(batcher(2)) == 20
    assert (batcher.batches, batcher.items) == (2, 2)


@pytest.mark.parametrize(
    ("size", "wait", "lanes", "named"),
    [(0, 0.0, 1, "max_batch_size"), (1, -0.1, 1, "wait_s"), (1, 0.0, 0, "lanes")],
)
def test_bad_settings_are_refused_by_name(size, wait, lanes, named):
    with pytest.raises(ValueError, match=named):
        Batcher(Stage().run, max_batch_size=size, wait_s=wait, lanes=lanes)
