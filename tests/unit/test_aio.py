"""Cancellation is never lost, whatever a task's children do at the same moment.

Python 3.11's TaskGroup drops the CancelledError when its task is cancelled while a child
fails (CPython gh-116720): the sender, which handles a lost channel by connecting again,
then went on for ever, and a switchover waiting for the active role's tasks to end hung.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import pytest

from stead import aio
from stead.errors import ChannelError


async def _retrying(fail: asyncio.Event, group: Any) -> None:
    """A loop shaped like the sender's: a child fails, the error is handled, try again."""

    async def child() -> None:
        await fail.wait()
        raise ChannelError("lost")

    while True:
        try:
            async with group() as tasks:
                tasks.create_task(child())
                await asyncio.Event().wait()
        except BaseExceptionGroup as error:
            with contextlib.suppress(ChannelError):
                raise aio.first_cause(error) from None
        fail.clear()


async def _cancel_while_a_child_fails(group: Any) -> asyncio.Task[None]:
    fail = asyncio.Event()
    task = asyncio.create_task(_retrying(fail, group))
    for _ in range(3):
        await asyncio.sleep(0)  # the child waits for its event
    fail.set()  # the child fails first in the next round of the loop...
    task.cancel()  # ...and the task is cancelled in the same round
    await asyncio.wait([task], timeout=0.5)
    return task


async def test_a_cancellation_that_meets_a_failing_child_is_kept() -> None:
    task = await _cancel_while_a_child_fails(aio.TaskGroup)
    assert task.done()
    assert task.cancelled()


@pytest.mark.skipif(sys.version_info >= (3, 13), reason="fixed in CPython 3.13")
async def test_the_plain_task_group_loses_it_on_this_python() -> None:
    """The premise: with asyncio's own TaskGroup the loop survives its cancellation."""
    task = await _cancel_while_a_child_fails(asyncio.TaskGroup)
    try:
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.wait([task], timeout=2.0)


async def test_a_failing_child_leaves_its_task_uncancelled() -> None:
    """The group's own request to stop its block is taken back, even when the child fails
    while the group already waits at the end of the block."""
    failed = asyncio.Event()

    async def fails_later() -> None:
        await asyncio.sleep(0)
        failed.set()
        raise ChannelError("lost")

    async def run() -> None:
        try:
            async with aio.TaskGroup() as tasks:
                tasks.create_task(fails_later())
        except BaseExceptionGroup as group:
            raise aio.first_cause(group) from None

    with pytest.raises(ChannelError, match="lost"):
        await run()
    assert failed.is_set()
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0
    await asyncio.sleep(0)  # and nothing is pending


async def test_a_failing_child_still_stops_the_block() -> None:
    async def run() -> None:
        async with aio.TaskGroup() as tasks:
            tasks.create_task(_fail_soon())
            await asyncio.Event().wait()

    with pytest.raises(ExceptionGroup):
        await run()
    current = asyncio.current_task()
    assert current is not None
    assert current.cancelling() == 0


async def _fail_soon() -> None:
    await asyncio.sleep(0)
    raise ChannelError("lost")


async def test_cancel_and_wait_passes_on_the_callers_own_cancellation() -> None:
    stubborn_started = asyncio.Event()

    async def stubborn() -> None:
        stubborn_started.set()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0.2)  # slow to finish: the caller is cancelled meanwhile

    async def caller() -> str:
        inner = asyncio.create_task(stubborn())
        await stubborn_started.wait()
        await aio.cancel_and_wait(inner)
        return "went on"

    task = asyncio.create_task(caller())
    await stubborn_started.wait()
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.wait([task], timeout=2.0)
    assert task.cancelled()


async def test_cancel_and_wait_returns_once_the_task_is_gone() -> None:
    inner = asyncio.create_task(asyncio.Event().wait())
    await asyncio.sleep(0)
    await aio.cancel_and_wait(inner)
    assert inner.cancelled()
