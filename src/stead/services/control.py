"""How a protected service is started, stopped and asked whether it runs.

One small seam, :class:`ServiceControl`, and three backends chosen by the service's
configuration: :class:`SupervisedProcess` (``exec``: the agent runs the process itself),
:class:`Commands` (``start``/``stop``/``status`` argv) and :class:`Systemd` (``unit``).

Commands are run with their output in temporary files, not pipes: a start script that leaves
a daemon behind would otherwise hold the pipe open and the wait for the script would never end.
Each command runs in a session of its own, so that a timeout kills it with everything it
started, and it is always waited for: no zombies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shlex
import signal
import tempfile
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import IO

from stead.errors import ServiceError
from stead.services.config import ServiceSpec

logger = logging.getLogger(__name__)

STATUS_TIMEOUT = 10.0  # seconds a status command may take; the configuration has no setting
KILL_GRACE = 5.0  # seconds a process group may take to vanish after SIGKILL
TAIL_LINES = 3  # lines of a command's output quoted in an error

ExitCallback = Callable[[int, str], None]
"""Told ``(returncode, sentence)`` when a supervised process ends without being stopped."""


# ---- running one command --------------------------------------------------------------------


@dataclass(frozen=True)
class Completed:
    """What became of one command: its exit status, or why it has none, and its last lines."""

    argv: tuple[str, ...]
    returncode: int | None  # None: it could not be started, or was killed for taking too long
    stdout: str = ""  # the last lines, joined with " | "
    stderr: str = ""
    problem: str = ""  # "timed out after 5 s", "could not run it: No such file or directory"

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def summary(self) -> str:
        """One line: how it ended, then its last stderr lines (stdout when stderr is empty)."""
        if self.problem:
            how = self.problem
        elif self.returncode is not None and self.returncode < 0:
            how = f"was killed by {_signal_name(-self.returncode)}"
        else:
            how = f"exited with status {self.returncode}"
        tail = self.stderr or self.stdout
        return f"{how}: {tail}" if tail else how


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _tail(handle: IO[bytes], lines: int = TAIL_LINES) -> str:
    handle.seek(0, os.SEEK_END)
    size = handle.tell()
    handle.seek(max(0, size - 8192))
    text = handle.read().decode(errors="replace")
    kept = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(kept[-lines:])


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group (0: just ask); False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member changed its user id: the group is still there
        return True
    return True


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process remains in the group.

    ``killpg(pgid, 0)`` alone also counts zombies, and orphaned zombies may never be reaped
    when PID 1 does not reap; those hold nothing, so they do not count.
    """
    if not signal_group(pgid, 0):
        return False
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as handle:
                    stat = handle.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                return True
    return False


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Kill the process's group and wait for the process itself, so it leaves no zombie."""
    signal_group(process.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(KILL_GRACE):
            await process.wait()


async def run_argv(
    argv: Sequence[str], timeout: float, env: Mapping[str, str] | None = None
) -> Completed:
    """Run ``argv`` to its end or for at most ``timeout`` seconds (then kill its group).

    Never raises for the command's sake: a missing program or a timeout is a ``Completed``
    without exit status. Cancellation kills the command before it propagates.
    """
    args = tuple(argv)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            process = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        except OSError as error:
            return Completed(args, None, problem=f"could not run it: {error.strerror or error}")
        problem = ""
        try:
            async with asyncio.timeout(timeout):
                returncode: int | None = await process.wait()
        except TimeoutError:
            await _reap(process)
            returncode, problem = None, f"timed out after {timeout:g} s"
        except BaseException:
            await _reap(process)
            raise
        return Completed(args, returncode, _tail(out), _tail(err), problem)


def _die_with_parent() -> None:
    """In the child: a supervised service ends when the agent dies (kill -9 included), so a
    crashed agent never leaves a service running on a node that may lose the role."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


PR_SET_PDEATHSIG = 1


def _command_failed(service: str, what: str, done: Completed) -> ServiceError:
    return ServiceError(
        f"{what} command `{shlex.join(done.argv)}` {done.summary()}",
        service=service,
        command=done.argv,
        returncode=done.returncode,
        output=done.stderr or done.stdout,
    )


def _environment(spec: ServiceSpec, env: Mapping[str, str]) -> dict[str, str]:
    return {**os.environ, **env, "STEAD_SERVICE": spec.name}


# ---- the seam -------------------------------------------------------------------------------


class ServiceControl(ABC):
    """Starts, stops and asks about one protected service.

    Duties of every backend, checked by the conformance tests (tests/unit/test_services_control.py):

    Idempotent
        ``start()`` of a running service and ``stop()`` of a stopped or never started one
        succeed and change nothing.
    Bounded in time
        ``start()`` returns within the spec's ``start_timeout``, ``stop()`` within its
        ``stop_timeout`` (plus a few seconds for a forced kill), ``running()`` within the
        status timeout. On expiry they raise :class:`ServiceError`; they never hang.
    Settled on return
        After ``start()`` returns, ``running()`` is true; after ``stop()``, false (until the
        service dies or someone else starts it). ``start()`` does not wait for the service to
        be ready to serve: that is what health checks are for.
    Not reentrant
        The caller (the manager) never runs two operations on one service at once.
    Errors
        Every failure is a :class:`ServiceError` naming the service, the command, its exit
        status and its last lines of stderr.
    """

    __slots__ = ()

    @abstractmethod
    async def start(self) -> None:
        """Start the service unless it runs; return once it runs (not once it is ready)."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop the service if it runs; return once it no longer runs."""

    @abstractmethod
    async def running(self) -> bool:
        """Whether the service runs now."""

    @abstractmethod
    def describe(self) -> str:
        """One line for humans: the service and how it is controlled."""

    def set_exit_callback(self, callback: ExitCallback | None) -> None:  # noqa: B027
        """Optional: be told at once when the service ends by itself.

        Backends that cannot notice this ignore the call; the manager polls ``running()``.
        """


def control_for(
    spec: ServiceSpec, env: Mapping[str, str], *, systemctl: str = "systemctl"
) -> ServiceControl:
    """The backend the configuration asks for. ``env`` is read at each start, not copied."""
    if spec.unit:
        return Systemd(spec, env, systemctl=systemctl)
    if spec.exec:
        return SupervisedProcess(spec, env)
    return Commands(spec, env)


# ---- start/stop/status commands and systemd -------------------------------------------------


class _ArgvControl(ServiceControl):
    """A service driven by three commands; the status command's exit 0 means it runs.

    ``start()`` and ``stop()`` ask first and do nothing when there is nothing to do (start
    scripts are often not idempotent), then wait until the status command agrees.
    """

    def __init__(
        self,
        spec: ServiceSpec,
        env: Mapping[str, str],
        *,
        status_timeout: float = STATUS_TIMEOUT,
    ) -> None:
        self.spec = spec
        self.env = env
        self.status_timeout = status_timeout

    @abstractmethod
    def argv(self, what: str) -> list[str]:
        """The command for ``start``, ``stop`` or ``status``."""

    async def _run(self, what: str, timeout: float) -> Completed:
        return await run_argv(self.argv(what), timeout, _environment(self.spec, self.env))

    async def running(self) -> bool:
        return await self._status(self.status_timeout)

    async def _status(self, timeout: float) -> bool:
        done = await self._run("status", timeout)
        if done.returncode is None:
            raise _command_failed(self.spec.name, "status", done)
        return done.ok

    async def start(self) -> None:
        await self._change("start", True, self.spec.start_timeout)

    async def stop(self) -> None:
        await self._change("stop", False, self.spec.stop_timeout)

    async def _change(self, what: str, want: bool, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout

        def left() -> float:
            return max(deadline - loop.time(), 0.01)

        if await self._status(min(self.status_timeout, left())) == want:
            return
        done = await self._run(what, left())
        if done.problem and loop.time() >= deadline:  # say which setting ran out, in full
            done = replace(done, problem=f"timed out after {timeout:g} s ({what}_timeout)")
        if not done.ok:
            raise _command_failed(self.spec.name, what, done)
        pause = 0.02
        while await self._status(min(self.status_timeout, left())) != want:
            if loop.time() >= deadline:
                state = "not running" if want else "still running"
                raise ServiceError(
                    f"{what} command `{shlex.join(done.argv)}` succeeded, but the status "
                    f"command says {state} after {timeout:g} s",
                    service=self.spec.name,
                    command=done.argv,
                    returncode=done.returncode,
                )
            await asyncio.sleep(min(pause, left()))
            pause = min(pause * 2, 0.5)


class Commands(_ArgvControl):
    """``start``, ``stop`` and ``status`` commands from the configuration, with the agent's
    environment plus ``env`` (STEAD_NODE, STEAD_ROLE, STEAD_EPOCH) and STEAD_SERVICE."""

    def argv(self, what: str) -> list[str]:
        return {"start": self.spec.start, "stop": self.spec.stop, "status": self.spec.status}[what]

    def describe(self) -> str:
        return f"{self.spec.name}: commands (start `{shlex.join(self.spec.start)}`)"


class Systemd(_ArgvControl):
    """A systemd unit, through ``systemctl start|stop|is-active --quiet UNIT``.

    ``systemctl start`` itself waits for the unit's start job, so the wait for the status to
    agree is short. ``systemctl`` is a path or a name looked up on PATH.
    """

    def __init__(
        self,
        spec: ServiceSpec,
        env: Mapping[str, str],
        *,
        systemctl: str = "systemctl",
        status_timeout: float = STATUS_TIMEOUT,
    ) -> None:
        super().__init__(spec, env, status_timeout=status_timeout)
        self.systemctl = systemctl

    def argv(self, what: str) -> list[str]:
        if what == "status":
            return [self.systemctl, "is-active", "--quiet", self.spec.unit]
        return [self.systemctl, what, self.spec.unit]

    def describe(self) -> str:
        return f"{self.spec.name}: systemd unit {self.spec.unit}"


# ---- a process the agent supervises ---------------------------------------------------------


class SupervisedProcess(ServiceControl):
    """``exec``: the agent runs the process itself, in a session and process group of its own.

    The process must stay in the foreground (a daemon that forks and exits counts as ended).
    Its output goes to this module's log, line by line, and its last lines are quoted when it
    ends. When it ends by itself, whatever is left in its group is killed, so that a restart
    starts clean, and the exit callback is told. ``stop()`` sends SIGTERM to the group and
    SIGKILL after ``stop_timeout``.
    """

    def __init__(
        self,
        spec: ServiceSpec,
        env: Mapping[str, str],
        *,
        on_exit: ExitCallback | None = None,
    ) -> None:
        self.spec = spec
        self.env = env
        self._on_exit = on_exit
        self._process: asyncio.subprocess.Process | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stopping = False
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)

    @property
    def pid(self) -> int | None:
        """The pid (and process group id) of the running process, if any."""
        process = self._process
        return process.pid if process is not None and process.returncode is None else None

    def set_exit_callback(self, callback: ExitCallback | None) -> None:
        self._on_exit = callback

    def describe(self) -> str:
        pid = self.pid
        where = f" (pid {pid})" if pid else ""
        return f"{self.spec.name}: supervised process `{shlex.join(self.spec.exec)}`{where}"

    async def running(self) -> bool:
        return self.pid is not None

    async def start(self) -> None:
        if self.pid is not None:
            return
        await self._finish_watcher()
        self._tail.clear()
        read_fd, write_fd = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                *self.spec.exec,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=write_fd,
                env=_environment(self.spec, self.env),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        except OSError as error:
            os.close(read_fd)
            raise ServiceError(
                f"could not run `{shlex.join(self.spec.exec)}`: {error.strerror or error}",
                service=self.spec.name,
                command=self.spec.exec,
            ) from error
        finally:
            os.close(write_fd)
        # Our own pipe rather than asyncio's: asyncio's wait() also waits for its pipes to
        # close, which a leftover grandchild could postpone forever.
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", buffering=0)
            )
        except BaseException:  # cancelled, or out of file descriptors: leave nothing behind
            await _reap(process)
            raise
        self._process, self._stopping = process, False
        pump = asyncio.create_task(self._pump(reader), name=f"output of {self.spec.name}")
        self._watcher = asyncio.create_task(
            self._watch(process, pump, transport), name=f"watch {self.spec.name}"
        )
        logger.info("%s: started pid %d", self.spec.name, process.pid)

    async def stop(self) -> None:
        process = self._process
        if process is None:
            return
        if self._watcher is not None and not self._watcher.done():
            self._stopping = True
            signal_group(process.pid, signal.SIGTERM)
            if not await _gone(process, self.spec.stop_timeout):
                logger.warning(
                    "%s: still running %g s after SIGTERM; sending SIGKILL",
                    self.spec.name,
                    self.spec.stop_timeout,
                )
                signal_group(process.pid, signal.SIGKILL)
                if not await _gone(process, KILL_GRACE):
                    raise ServiceError(
                        f"process group {process.pid} of `{shlex.join(self.spec.exec)}` "
                        f"survived SIGKILL for {KILL_GRACE:g} s",
                        service=self.spec.name,
                        command=self.spec.exec,
                    )
        await self._finish_watcher()
        self._process = None

    async def _finish_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            await watcher

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        """Log the process's output line by line and keep the last lines for reports."""
        pending = b""
        while chunk := await reader.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > 65536:  # a line without end: log what there is
                lines, pending = [*lines, pending], b""
            for raw in lines:
                self._keep(raw)
        if pending:
            self._keep(pending)

    def _keep(self, raw: bytes) -> None:
        line = raw.decode(errors="replace").rstrip()
        if line:
            self._tail.append(line)
            logger.info("%s: %s", self.spec.name, line)

    async def _watch(
        self,
        process: asyncio.subprocess.Process,
        pump: asyncio.Task[None],
        transport: asyncio.ReadTransport,
    ) -> None:
        try:
            returncode = await process.wait()
            if not self._stopping:
                signal_group(process.pid, signal.SIGKILL)  # what it left behind goes too
            # Leftovers that escaped the group may hold the pipe: read on only briefly.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await asyncio.shield(pump)
        finally:
            pump.cancel()
            transport.close()
        if self._stopping:
            logger.info("%s: stopped", self.spec.name)
            return
        how = Completed(tuple(self.spec.exec), returncode, stderr=" | ".join(self._tail))
        sentence = f"`{shlex.join(self.spec.exec)}` {how.summary()}"
        logger.warning("%s: %s", self.spec.name, sentence)
        if self._on_exit is not None:
            try:
                self._on_exit(returncode, sentence)
            except Exception:
                logger.exception("%s: exit callback failed", self.spec.name)


async def _gone(process: asyncio.subprocess.Process, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for the process and every live member of its group."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        async with asyncio.timeout(timeout):
            await process.wait()
    except TimeoutError:
        return False
    pause = 0.01
    while group_alive(process.pid):
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.2)
    return True
