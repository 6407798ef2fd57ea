"""Hooks: the operator's commands around each role change, run for real with /bin/sh."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stead.config.schema import HooksSection
from stead.identity import Hooks, IdentityError


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def _gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its reaper counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return status.rsplit(")", 1)[1].split()[0] in ("Z", "X")


async def _eventually(check: Callable[[], bool], within: float = 2.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if check():
                return
            await asyncio.sleep(0.02)


async def _until_gone(pid: int) -> None:
    await _eventually(lambda: _gone(pid))


@pytest.fixture
def strays() -> Iterator[list[int]]:
    """Pids a test leaves running on purpose; killed at the end whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def test_phases_run_their_own_commands_in_order(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hooks = Hooks(
        HooksSection(
            before_active=[sh(f"echo b1 >> {out}"), sh(f"echo b2 >> {out}")],
            after_active=[sh(f"echo a1 >> {out}")],
            before_passive=[sh(f"echo p1 >> {out}")],
        ),
        {},
    )
    await hooks.run("before_active")
    assert out.read_text() == "b1\nb2\n"
    await hooks.run("after_active")
    await hooks.run("after_passive")  # nothing configured: nothing runs
    assert out.read_text() == "b1\nb2\na1\n"


async def test_hooks_see_the_phase_the_given_variables_and_the_agent_environment(
    tmp_path: Path,
) -> None:
    out = tmp_path / "env"
    script = f'printf "%s %s %s\\n" "$STEAD_PHASE" "$STEAD_NODE" "${{PATH:+path}}" >> {out}'
    hooks = Hooks(HooksSection(before_passive=[sh(script)]), {"STEAD_NODE": "one"})
    await hooks.run("before_passive")
    assert out.read_text() == "before_passive one path\n"


async def test_a_failing_hook_stops_the_phase_and_says_why(tmp_path: Path) -> None:
    later = tmp_path / "later"
    hooks = Hooks(
        HooksSection(
            after_active=[
                sh("for n in 1 2 3 4 5 6 7; do echo line$n >&2; done; exit 3"),
                sh(f"touch {later}"),
            ]
        ),
        {},
    )
    with pytest.raises(IdentityError) as caught:
        await hooks.run("after_active")
    message = str(caught.value)
    assert "after_active hook `sh -c 'for n in" in message
    assert "exit status 3" in message
    assert message.endswith("line3 | line4 | line5 | line6 | line7")  # the last lines only
    assert not later.exists()


async def test_a_hook_killed_by_a_signal_is_reported() -> None:
    hooks = Hooks(HooksSection(before_active=[sh("kill -TERM $$")]), {})
    with pytest.raises(IdentityError, match="was killed by SIGTERM"):
        await hooks.run("before_active")


async def test_a_hook_that_cannot_start_is_reported() -> None:
    hooks = Hooks(HooksSection(before_active=[["/nonexistent/stidt-hook"]]), {})
    with pytest.raises(IdentityError, match="/nonexistent/stidt-hook` could not start"):
        await hooks.run("before_active")


async def test_a_hook_that_times_out_is_killed_with_its_children(tmp_path: Path) -> None:
    child = tmp_path / "child"
    script = f"sleep 60 & echo $! > {child}; echo waiting >&2; wait"
    hooks = Hooks(HooksSection(before_active=[sh(script)], timeout=0.5), {})
    started = time.monotonic()
    with pytest.raises(IdentityError, match=r"timed out after 0\.5 s: waiting$"):
        await hooks.run("before_active")
    assert time.monotonic() - started < 5
    await _until_gone(int(child.read_text()))


async def test_a_cancelled_phase_kills_its_hook(tmp_path: Path) -> None:
    child = tmp_path / "child"
    hooks = Hooks(HooksSection(before_passive=[sh(f"echo $$ > {child}; exec sleep 60")]), {})
    task = asyncio.create_task(hooks.run("before_passive"))
    await _eventually(lambda: child.exists() and child.read_text().strip() != "", within=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await _until_gone(int(child.read_text()))


async def test_a_daemon_left_behind_does_not_hold_the_phase(
    tmp_path: Path, strays: list[int]
) -> None:
    """A hook that starts a background process holding its output ends when the hook does."""
    child = tmp_path / "child"
    hooks = Hooks(HooksSection(after_active=[sh(f"sleep 60 & echo $! > {child}")]), {})
    async with asyncio.timeout(5):
        await hooks.run("after_active")
    strays.append(int(child.read_text()))
    assert not _gone(strays[0])  # left alone: it was the hook's business to start it


async def test_unknown_phase_and_empty_command_are_refused() -> None:
    hooks = Hooks(HooksSection(before_active=[[]]), {})
    with pytest.raises(ValueError, match="unknown hook phase"):
        await hooks.run("during_active")  # type: ignore[arg-type]
    with pytest.raises(IdentityError, match="empty command"):
        await hooks.run("before_active")
