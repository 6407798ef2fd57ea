"""Operator commands run around each role change.

The executor runs ``before_active``, takes the identity, then runs ``after_active`` (and the
same for passive). Each phase runs its commands one after the other, each with the configured
timeout; the first that fails stops the phase and raises ``IdentityError`` with the command,
how it ended and the last lines it wrote to standard error.

A command gets the agent's environment, the variables given to ``Hooks`` and
``STEAD_PHASE``. It runs in a process group of its own, which is killed when the command
times out or the phase is cancelled, so that a hook's children do not outlive it. Its output
goes to temporary files rather than pipes: a hook that leaves a daemon behind holding its
standard error does not keep the phase waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import signal
import tempfile
from typing import IO, Literal

from stead.config.schema import HooksSection
from stead.errors import IdentityError

log = logging.getLogger(__name__)

Phase = Literal["before_active", "after_active", "before_passive", "after_passive"]
PHASES: tuple[Phase, ...] = ("before_active", "after_active", "before_passive", "after_passive")
STDERR_LINES = 5  # lines of a failed hook's standard error in the error message
OUTPUT_TAIL = 64 * 1024  # bytes of output read back after a hook ends


class Hooks:
    """The configured hooks of every phase, with the environment they run in."""

    __slots__ = ("_env", "_hooks")

    def __init__(self, hooks: HooksSection, env: dict[str, str] | None = None) -> None:
        self._hooks = hooks
        self._env = dict(env or {})

    def commands(self, phase: Phase) -> list[list[str]]:
        return [list(argv) for argv in getattr(self._hooks, phase)]

    async def run(self, phase: Phase) -> None:
        """Run the phase's commands in order; raise IdentityError at the first failure."""
        if phase not in PHASES:
            raise ValueError(f"unknown hook phase {phase!r}")
        env = {**os.environ, **self._env, "STEAD_PHASE": phase}
        for argv in self.commands(phase):
            await self._run_one(phase, argv, env)

    async def _run_one(self, phase: Phase, argv: list[str], env: dict[str, str]) -> None:
        command = shlex.join(argv)
        if not argv:
            raise IdentityError(f"{phase} hook: empty command")
        timeout = self._hooks.timeout
        log.info("running %s hook `%s`", phase, command)
        with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=stdout,
                    stderr=stderr,
                    env=env,
                    start_new_session=True,
                )
            except OSError as exc:
                raise IdentityError(f"{phase} hook `{command}` could not start: {exc}") from exc
            try:
                async with asyncio.timeout(timeout):
                    status = await proc.wait()
            except TimeoutError:
                await _kill_group(proc)
                raise IdentityError(
                    f"{phase} hook `{command}` timed out after {timeout:g} s" + _last_lines(stderr)
                ) from None
            finally:
                if proc.returncode is None:  # cancelled: the hook goes with us
                    await _kill_group(proc)
            for line in _tail(stdout).splitlines()[-STDERR_LINES:]:
                log.debug("%s hook `%s`: %s", phase, command, line)
            if status != 0:
                raise IdentityError(
                    f"{phase} hook `{command}` {_ended(status)}" + _last_lines(stderr)
                )


def _ended(status: int) -> str:
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"was killed by {name}"
    return f"failed with exit status {status}"


def _tail(handle: IO[bytes]) -> str:
    size = handle.seek(0, os.SEEK_END)
    handle.seek(max(0, size - OUTPUT_TAIL))
    return handle.read().decode("utf-8", "replace")


def _last_lines(handle: IO[bytes]) -> str:
    text = _tail(handle)
    lines = [line.rstrip() for line in text.splitlines() if line.strip()][-STDERR_LINES:]
    return ": " + " | ".join(lines) if lines else ""


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
