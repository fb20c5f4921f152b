"""The memory budget: immediate grants, first-come-first-served waits, timeouts and cancellations that leak nothing."""

from __future__ import annotations

import asyncio

import pytest

from latentd.server.admission import MemoryBudget, OverloadedError


def run(coroutine):
    return asyncio.run(coroutine)


def test_grants_within_capacity_and_takes_back_on_release():
    async def main():
        budget = MemoryBudget(100, wait_s=1)
        async with budget.hold(60):
            assert budget.held == 60
            async with budget.hold(40):
                assert budget.held == 100
        assert budget.held == 0
    run(main())


def test_a_waiter_gets_in_when_room_is_given_back():
    async def main():
        budget = MemoryBudget(100, wait_s=5)
        await budget.acquire(80)
        waiter = asyncio.create_task(budget.acquire(50))
        await asyncio.sleep(0)
        assert not waiter.done() and budget.held == 80
        budget.release(80)
        await asyncio.wait_for(waiter, 5)
        assert budget.held == 50
    run(main())


def test_no_room_within_the_wait_is_overloaded_and_holds_nothing():
    async def main():
        budget = MemoryBudget(100, wait_s=0.05)
        await budget.acquire(90)
        with pytest.raises(OverloadedError, match="memory budget"):
            await budget.acquire(20)
        assert budget.held == 90
        budget.release(90)
        await budget.acquire(100)  # the timed-out waiter left no claim behind
        assert budget.held == 100
    run(main())


def test_first_come_first_served_a_big_request_is_not_starved():
    async def main():
        budget = MemoryBudget(10, wait_s=5)
        await budget.acquire(6)
        big = asyncio.create_task(budget.acquire(8))
        await asyncio.sleep(0)
        small = asyncio.create_task(budget.acquire(2))  # would fit now, but arrived after the big one
        await asyncio.sleep(0.01)
        assert not big.done() and not small.done()
        budget.release(6)
        await asyncio.wait_for(asyncio.gather(big, small), 5)
        assert budget.held == 10
    run(main())


def test_a_cancelled_waiter_leaks_nothing_and_lets_the_next_in():
    async def main():
        budget = MemoryBudget(10, wait_s=5)
        await budget.acquire(6)
        first = asyncio.create_task(budget.acquire(8))
        await asyncio.sleep(0)
        second = asyncio.create_task(budget.acquire(4))
        await asyncio.sleep(0)
        first.cancel()
        await asyncio.wait_for(second, 5)  # the cancelled head no longer holds it back
        assert budget.held == 10
        with pytest.raises(asyncio.CancelledError):
            await first
    run(main())


def test_a_cancelled_holder_gives_its_share_back():
    async def main():
        budget = MemoryBudget(10, wait_s=5)

        async def work():
            async with budget.hold(7):
                await asyncio.sleep(10)
        task = asyncio.create_task(work())
        await asyncio.sleep(0.01)
        assert budget.held == 7
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert budget.held == 0
    run(main())


def test_more_than_the_whole_budget_is_refused():
    with pytest.raises(ValueError, match="never fit"):
        run(MemoryBudget(10, wait_s=1).acquire(11))
