"""Processes of the lab: start them detached, tell if they live, find and end leftovers.

Lab processes are never children of the process that starts them (``setsid --fork``): the
CLI exits right after ``stead lab up``, and a test process must not collect zombies or warn
about children still running. A pid alone can be reused, so every recorded pid comes with
its start time from ``/proc/PID/stat`` and is only trusted when both match.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from stead.errors import LabError

HOLDER_MARKER = "stead.lab.holder"


@dataclass(frozen=True)
class ProcRef:
    """A process known by pid and start time, so that a reused pid is not mistaken for it."""

    pid: int
    start: int

    @classmethod
    def of(cls, pid: int) -> ProcRef | None:
        start = start_time(pid)
        return None if start is None else cls(pid, start)

    def alive(self) -> bool:
        return start_time(self.pid) == self.start and not is_zombie(self.pid)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return text[text.rfind(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def pids() -> Iterator[int]:
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            yield int(entry.name)


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def ns_inode(pid: int, kind: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{kind}").st_ino
    except OSError:
        return None


def spawn_detached(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: str = "/",
) -> None:
    """Start ``argv`` in a new session, reparented away from us; output goes to ``log_path``.

    ``setsid --fork`` returns as soon as the child is started; the child learns and reports
    its own pid (pid files), since ``setsid`` does not tell.
    """
    with open(log_path, "ab") as out:
        proc = subprocess.run(
            ["setsid", "--fork", *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            check=False,
        )
    if proc.returncode != 0:
        raise LabError(f"could not start {argv[0]} (exit {proc.returncode}); see {log_path}")


def wait_until(condition: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    """Poll ``condition()`` until it is true or ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def signal_group(ref: ProcRef, sig: signal.Signals) -> bool:
    """Send ``sig`` to the process group led by ``ref``; False if it no longer runs."""
    if not ref.alive():
        return False
    try:
        os.killpg(ref.pid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        os.kill(ref.pid, sig)
    return True


def group_members(pgid: int) -> list[int]:
    found = []
    for pid in pids():
        fields = _stat_fields(pid)
        if fields and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(pid)
    return found


def kill_group(ref: ProcRef, timeout: float = 5.0) -> None:
    """SIGKILL the group led by ``ref`` and wait until every member is gone."""
    signal_group(ref, signal.SIGKILL)
    if not wait_until(lambda: not group_members(ref.pid) and not ref.alive(), timeout):
        raise LabError(f"process group {ref.pid} survived SIGKILL for {timeout:.0f} s")


def kill_pids(victims: Sequence[int], timeout: float = 5.0) -> None:
    """SIGKILL these processes and wait until none of them runs any more."""
    refs = [r for r in (ProcRef.of(p) for p in victims) if r is not None]
    for ref in refs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(ref.pid, signal.SIGKILL)
    if not wait_until(lambda: not any(r.alive() for r in refs), timeout):
        left = [r.pid for r in refs if r.alive()]
        raise LabError(f"processes {left} survived SIGKILL for {timeout:.0f} s")


def processes_in_namespaces(net: set[int], mnt: set[int]) -> list[int]:
    """Every live process whose network or mount namespace is one of these inodes."""
    me = os.getpid()
    found = []
    for pid in pids():
        if pid == me or is_zombie(pid):
            continue
        if ns_inode(pid, "net") in net or ns_inode(pid, "mnt") in mnt:
            found.append(pid)
    return found


def holder_processes(lab_dir: str | None = None) -> list[int]:
    """Holder processes (of the lab at ``lab_dir``, or of every lab)."""
    found = []
    for pid in pids():
        argv = cmdline(pid)
        if HOLDER_MARKER not in argv:
            continue
        if lab_dir is None or f"--lab-dir={lab_dir}" in argv:
            found.append(pid)
    return found
