"""Stand-ins shared by the services tests (no tests here): a fake ``systemctl`` and helpers.

systemd is not PID 1 on the test machines, so Systemd backends and systemd checks talk to a
shell script that keeps each unit's state as a file in the directory ``state`` next to it.
A file ``UNIT.fail-CMD`` makes ``CMD`` fail the way systemctl does; ``UNIT.hang-CMD`` makes it
hang (its pid goes to ``UNIT.pid``). Every start and stop is appended to ``state/log``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

FAKE_SYSTEMCTL = r"""#!/bin/sh
state="$(dirname "$0")/state"
command="$1"
shift
[ "$1" = --quiet ] && shift
unit="$1"
if [ -e "$state/$unit.fail-$command" ]; then
    echo "Job for $unit failed because the control process exited with error code." >&2
    echo "See \"systemctl status $unit\" and \"journalctl -xeu $unit\" for details." >&2
    exit 1
fi
if [ -e "$state/$unit.hang-$command" ]; then
    echo $$ > "$state/$unit.pid"
    exec sleep 60
fi
case "$command" in
start) echo "start $unit" >> "$state/log"; touch "$state/$unit.active" ;;
stop) echo "stop $unit" >> "$state/log"; rm -f "$state/$unit.active" ;;
is-active) [ -e "$state/$unit.active" ] || exit 3 ;;
*) echo "fake systemctl: unknown command $command" >&2; exit 1 ;;
esac
"""


def write_fake_systemctl(directory: Path) -> Path:
    """Write the fake ``systemctl`` into ``directory`` (with its ``state``); return its path."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "state").mkdir(exist_ok=True)
    path = directory / "systemctl"
    path.write_text(FAKE_SYSTEMCTL)
    path.chmod(0o755)
    return path


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def exists(pid: int) -> bool:
    """Whether ``pid`` exists at all, zombie or not."""
    return os.path.exists(f"/proc/{pid}")


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll ``condition()`` until true; fail the test after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(0.01)


async def read_pid(path: Path) -> int:
    await until(lambda: path.exists() and path.read_text().strip())
    return int(path.read_text().strip())
