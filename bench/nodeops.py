"""Operations run inside a lab node (``python bench/nodeops.py OP ARGS...``).

Each operation prints one JSON line on stdout with its figures. Times are CLOCK_MONOTONIC,
the same clock in every namespace of the machine, so a writer in one node and a watcher in
another can be compared. Besides the standard library it imports only ``stead.cli.client``
(to wait for the agent without the CLI's start-up), before any clock starts.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from typing import Any

# Imported before any clock starts: the timed part is the agent's work, not our start-up.
from stead.cli.client import AgentClient, find_socket

MIB = 1 << 20


def emit(**figures: Any) -> None:
    print(json.dumps(figures), flush=True)


def wait_sync(timeout: float) -> float:
    """What ``stead wait-sync`` does, without the CLI's start-up: one call to the agent."""
    start = time.monotonic()
    AgentClient(find_socket(), timeout=timeout + 30).call(
        "POST", "/v1/wait-sync", {"timeout": timeout}, timeout=timeout + 30
    )
    return time.monotonic() - start


def _names(root: str, count: int, per_dir: int) -> list[str]:
    names = []
    for i in range(count):
        sub = os.path.join(root, f"d{i // per_dir:04d}")
        names.append(os.path.join(sub, f"f{i:07d}"))
    return names


def op_write(root: str, count: str, size: str, per_dir: str, sync: str) -> None:
    """Write ``count`` new files of ``size`` bytes, distinct contents; then wait until applied."""
    n, nbytes, per = int(count), int(size), int(per_dir)
    base = bytearray(os.urandom(max(nbytes, 16)))[:nbytes]
    names = _names(root, n, per)
    dirs = sorted({os.path.dirname(name) for name in names})
    start = time.monotonic()
    for directory in dirs:
        os.makedirs(directory, exist_ok=True)
    for i, name in enumerate(names):
        base[:8] = i.to_bytes(8, "little")
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, base)
        finally:
            os.close(fd)
    written = time.monotonic()
    synced = wait_sync(float(sync)) if float(sync) > 0 else 0.0
    emit(write_s=written - start, sync_s=synced, total_s=time.monotonic() - start, files=n)


def op_change(root: str, count: str, per_dir: str, changed: str, nbytes: str, sync: str) -> None:
    """Overwrite ``nbytes`` in place, mid-file, in ``changed`` files spread over the set."""
    names = _names(root, int(count), int(per_dir))
    step = max(1, len(names) // int(changed))
    picked = names[::step][: int(changed)]
    data = os.urandom(int(nbytes))
    start = time.monotonic()
    for name in picked:
        fd = os.open(name, os.O_WRONLY)
        try:
            size = os.fstat(fd).st_size
            os.pwrite(fd, data, max(0, size // 2 - len(data) // 2))
        finally:
            os.close(fd)
    written = time.monotonic()
    synced = wait_sync(float(sync))
    emit(
        write_s=written - start, sync_s=synced, total_s=time.monotonic() - start, files=len(picked)
    )


def op_touch(root: str, count: str, per_dir: str) -> None:
    """Create ``count`` empty files in directories of ``per_dir`` (no waiting)."""
    names = _names(root, int(count), int(per_dir))
    start = time.monotonic()
    for directory in sorted({os.path.dirname(name) for name in names}):
        os.makedirs(directory, exist_ok=True)
    for name in names:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644))
    emit(seconds=time.monotonic() - start, files=len(names))


def op_timed(*argv: str) -> None:
    """Run a command; its time and exit code (its output goes to stderr)."""
    start = time.monotonic()
    result = subprocess.run(argv, stdout=sys.stderr, check=False)
    emit(seconds=time.monotonic() - start, rc=result.returncode)


def op_tcp_recv(host: str, port: str) -> None:
    """Receive one connection until EOF; time from the first byte to EOF."""
    with socket.create_server((host, int(port))) as server:
        emit(ready=True)
        conn, _ = server.accept()
        with conn:
            buf = bytearray(4 * MIB)
            view = memoryview(buf)
            got = conn.recv_into(view)
            start = time.monotonic()
            total = got
            while got:
                got = conn.recv_into(view)
                total += got
            seconds = time.monotonic() - start
    emit(bytes=total, seconds=seconds)


def op_tcp_send(host: str, port: str, nbytes: str) -> None:
    block = os.urandom(4 * MIB)
    remaining = int(nbytes)
    start = time.monotonic()
    with socket.create_connection((host, int(port))) as conn:
        while remaining > 0:
            chunk = block[: min(len(block), remaining)]
            conn.sendall(chunk)
            remaining -= len(chunk)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
    emit(seconds=time.monotonic() - start)


def op_lag_write(root: str, rate: str, seconds: str, out: str) -> None:
    """New small files at a steady rate; the monotonic time of each, once closed."""
    per_second, duration = float(rate), float(seconds)
    total = int(per_second * duration)
    payload = b"x" * 100
    times: dict[str, float] = {}
    start = time.monotonic()
    late = 0  # writes more than 10 ms behind their schedule
    for i in range(total):
        due = start + i / per_second
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)  # pacing the writer, not synchronising with anything
        elif delay < -0.010:
            late += 1
        name = f"w{i:07d}"
        fd = os.open(os.path.join(root, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
        times[name] = time.monotonic()
    elapsed = time.monotonic() - start
    with open(out, "w") as fh:
        json.dump(times, fh)
    emit(files=total, seconds=elapsed, rate=total / elapsed, late=late)


def op_lag_watch(root: str, count: str, timeout: str, out: str) -> None:
    """Arrival time of each new name in ``root`` (the applier renames files into place)."""
    from inotify_simple import INotify, flags

    want, deadline = int(count), time.monotonic() + float(timeout)
    seen: dict[str, float] = {}
    with INotify() as ino:
        ino.add_watch(root, flags.MOVED_TO | flags.CREATE | flags.CLOSE_WRITE)
        emit(ready=True)
        while len(seen) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            events = ino.read(timeout=int(min(left, 1.0) * 1000))
            now = time.monotonic()
            for event in events:
                if event.name and event.name not in seen:
                    seen[event.name] = now
    with open(out, "w") as fh:
        json.dump(seen, fh)
    emit(arrived=len(seen))


def op_wait_sync(timeout: str) -> None:
    emit(seconds=wait_sync(float(timeout)))


OPS = {
    "write": op_write,
    "change": op_change,
    "touch": op_touch,
    "timed": op_timed,
    "tcp-recv": op_tcp_recv,
    "tcp-send": op_tcp_send,
    "lag-write": op_lag_write,
    "lag-watch": op_lag_watch,
    "wait-sync": op_wait_sync,
}


if __name__ == "__main__":
    OPS[sys.argv[1]](*sys.argv[2:])
