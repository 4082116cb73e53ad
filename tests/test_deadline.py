"""One timer for a deadline that moves from wait to wait (copiamail/deadline.py)."""

from __future__ import annotations

import asyncio

from copiamail.deadline import Deadline


def test_a_wait_is_due_at_its_own_deadline_though_the_wait_before_had_a_later_one():
    async def go() -> float:
        loop = asyncio.get_running_loop()
        due = loop.create_future()
        deadline = Deadline(lambda: due.set_result(loop.time()))
        deadline.start(loop, 30)
        deadline.end()
        started = loop.time()
        deadline.start(loop, 0.05)
        return await asyncio.wait_for(due, 5) - started

    assert 0.04 <= asyncio.run(go()) < 1.0


def test_the_timer_of_an_earlier_wait_neither_ends_a_later_one_early_nor_one_that_is_over():
    async def go() -> list[str]:
        loop = asyncio.get_running_loop()
        calls: list[str] = []
        deadline = Deadline(lambda: calls.append("due"))
        deadline.start(loop, 0.03)
        deadline.end()  # its timer still fires at 0.03 s
        deadline.start(loop, 0.2)
        await asyncio.sleep(0.1)
        calls.append("still waiting")
        deadline.end()
        await asyncio.sleep(0.2)
        return calls

    assert asyncio.run(go()) == ["still waiting"]


def test_a_cancelled_deadline_leaves_no_timer_and_is_never_due():
    async def go() -> tuple[list[str], int]:
        loop = asyncio.get_running_loop()
        calls: list[str] = []
        deadline = Deadline(lambda: calls.append("due"))
        deadline.start(loop, 0.01)
        deadline.cancel()
        await asyncio.sleep(0.05)
        return calls, len([h for h in loop._scheduled if not h.cancelled()])  # type: ignore[attr-defined]

    assert asyncio.run(go()) == ([], 0)


def test_a_wait_begun_after_the_deadline_was_cancelled_makes_no_timer():
    async def go() -> tuple[list[str], int]:
        loop = asyncio.get_running_loop()
        calls: list[str] = []
        deadline = Deadline(lambda: calls.append("due"))
        deadline.cancel()
        deadline.start(loop, 0.01)
        pending = len([h for h in loop._scheduled if not h.cancelled()])  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
        return calls, pending

    assert asyncio.run(go()) == ([], 0)
