"""Small asyncio helpers shared by the agent's tasks."""

from __future__ import annotations

import asyncio


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
