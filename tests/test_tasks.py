"""TaskRegistry: referenced named tasks, one log line per failure, bounded drain."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from clipia_proxy.tasks import TaskRegistry
from tests.harness import BOUND


async def test_spawn_keeps_a_reference_until_done() -> None:
    registry = TaskRegistry()
    gate = asyncio.Event()
    finished: list[str] = []

    async def work() -> str:
        await gate.wait()
        finished.append("done")
        return "result"

    dropped = registry.spawn(work(), name="kept")
    del dropped  # the caller holds no reference: only the registry does
    gc.collect()
    assert len(registry) == 1
    (task,) = [t for t in asyncio.all_tasks() if t.get_name() == "kept"]
    gate.set()
    assert await task == "result"
    await asyncio.sleep(0)
    assert finished == ["done"]
    assert len(registry) == 0


async def test_spawned_task_is_named() -> None:
    registry = TaskRegistry()

    async def work() -> int:
        return 7

    task = registry.spawn(work(), name="catalog-refresh")
    assert task.get_name() == "catalog-refresh"
    assert await task == 7


async def test_failing_task_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    registry = TaskRegistry()

    async def boom() -> None:
        raise RuntimeError("boom")

    with caplog.at_level(logging.DEBUG, logger="clipia_proxy.tasks"):
        task = registry.spawn(boom(), name="doomed")
        await asyncio.wait({task})
        await asyncio.sleep(0)
        # Reading the exception again (as a waiter would) must not log it again.
        assert isinstance(task.exception(), RuntimeError)
        await asyncio.sleep(0)
    failures = [r for r in caplog.records if r.name == "clipia_proxy.tasks"]
    assert len(failures) == 1
    assert failures[0].levelno == logging.ERROR
    assert "doomed" in failures[0].getMessage()
    assert failures[0].exc_info is not None
    assert len(registry) == 0


async def test_cancelled_or_successful_tasks_log_nothing(caplog: pytest.LogCaptureFixture) -> None:
    registry = TaskRegistry()

    async def forever() -> None:
        await asyncio.Event().wait()

    async def fine() -> None:
        return None

    with caplog.at_level(logging.DEBUG, logger="clipia_proxy.tasks"):
        cancelled = registry.spawn(forever(), name="cancelled")
        ok = registry.spawn(fine(), name="ok")
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.wait({cancelled, ok})
        await asyncio.sleep(0)
    assert [r for r in caplog.records if r.name == "clipia_proxy.tasks"] == []
    assert len(registry) == 0


async def test_drain_waits_for_tasks_that_finish_in_time() -> None:
    registry = TaskRegistry()
    done: list[int] = []

    async def short(number: int) -> None:
        await asyncio.sleep(0.05)
        done.append(number)

    tasks = [registry.spawn(short(i), name=f"short-{i}") for i in range(5)]
    # An hour of grace: a drain that waited out its grace instead of the tasks hits the bound.
    async with asyncio.timeout(BOUND):
        await registry.drain(3600.0)
    assert sorted(done) == list(range(5))
    assert all(t.done() and not t.cancelled() for t in tasks)
    assert len(registry) == 0


async def test_drain_cancels_what_is_left(caplog: pytest.LogCaptureFixture) -> None:
    registry = TaskRegistry()
    cleaned: list[str] = []

    async def stuck() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append("stuck")

    async def quick() -> str:
        await asyncio.sleep(0.01)
        return "quick"

    slow_task = registry.spawn(stuck(), name="stuck")
    quick_task = registry.spawn(quick(), name="quick")
    with caplog.at_level(logging.WARNING, logger="clipia_proxy.tasks"):
        async with asyncio.timeout(BOUND):  # a drain that waited for the stuck task hangs here
            await registry.drain(0.1)
    assert quick_task.result() == "quick"
    assert slow_task.cancelled()
    assert cleaned == ["stuck"]
    warnings = [r.getMessage() for r in caplog.records if r.name == "clipia_proxy.tasks"]
    assert len(warnings) == 1
    assert "stuck" in warnings[0]
    assert len(registry) == 0


async def test_drain_is_bounded_even_if_a_task_resists_cancellation() -> None:
    registry = TaskRegistry()
    release = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()  # ignores the cancellation until the test lets it go

    task = registry.spawn(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    async with asyncio.timeout(BOUND):  # grace + the bounded wait after cancel, never forever
        await registry.drain(0.05)
    assert not task.done()
    release.set()
    await asyncio.wait({task}, timeout=1.0)
    assert task.done()


async def test_drain_with_nothing_returns_at_once() -> None:
    registry = TaskRegistry()
    async with asyncio.timeout(BOUND):  # an hour of grace, and nothing to wait for
        await registry.drain(3600.0)
