"""Small asyncio helpers shared by the agent's tasks."""

from __future__ import annotations

import asyncio
import sys
from typing import Any


def first_cause(error: BaseException) -> BaseException:
    """The first real failure inside (nested) exception groups, cancellations skipped.

    A TaskGroup reports a failed child as an ExceptionGroup; a caller that handles channel
    errors wants the error itself, not the group.
    """
    pending = [error]
    fallback: BaseException = error
    while pending:
        current = pending.pop(0)
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
            continue
        if isinstance(current, asyncio.CancelledError):
            fallback = current
            continue
        return current
    return fallback


class TaskGroup(asyncio.TaskGroup):
    """``asyncio.TaskGroup`` that never loses a cancellation of its task.

    Before Python 3.13 (CPython gh-116720), when the task is cancelled at the moment a
    child fails, the group raises the child's error and the cancellation is gone: a loop
    that handles that error (a lost channel: connect again) goes on for ever, and whoever
    cancelled it (a role change) waits for ever. And when a child fails while the group
    waits for its children at the end of its block, the cancellation the group sends its
    own task to stop the block is never taken back, so the task looks cancelled later.
    Here, as in 3.13: the children's errors still come out, the group's own request is
    taken back, and an outside cancellation stays pending, so the task's next await is
    cancelled.
    """

    async def __aexit__(self, et: Any, exc: Any, tb: Any) -> Any:
        if sys.version_info >= (3, 13):
            return await super().__aexit__(et, exc, tb)
        task = asyncio.current_task()
        requested_before = self._parent_cancel_requested  # type: ignore[attr-defined]
        try:
            return await super().__aexit__(et, exc, tb)
        except BaseExceptionGroup:
            if task is not None:
                if self._parent_cancel_requested and not requested_before:  # type: ignore[attr-defined]
                    task.uncancel()
                if task.cancelling():
                    task.uncancel()
                    task.cancel()
            raise


async def cancel_and_wait(task: asyncio.Future[Any]) -> None:
    """Cancel ``task`` and wait until it has finished; a cancellation of the caller while it
    waits still propagates (``suppress(CancelledError)`` around the wait would swallow it)."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
