"""``python -m stead.lab.demo_service --port P --data DIR``: the lab's protected service.

A small HTTP key-value store whose data lives under the protected path (``DIR``), so that
what a client stores through the service address on the active is replicated, and is still
there when another node takes over. The lab configures it as the service ``demo`` that the
active agent runs and checks (``GET /health``).

- ``GET /health``: 200 ``ok``.
- ``GET /whoami``: ``{"node", "hostname", "epoch"}``: which node answered (``$STEAD_NODE``,
  else the host name) in which epoch (``$STEAD_EPOCH``, set by the agent; null without it).
- ``PUT /kv/KEY``: stores the body as ``DIR/KEY`` and answers 201 only once it is durable
  (temporary file, flushed, renamed into place, the directory flushed), so that an
  acknowledged write survives a crash of the node right after the answer. Writes that
  arrive together share one flush (group commit, as a database does): one ``syncfs`` for
  their data, then the renames, then one ``fsync`` of the directory. The first write makes
  ``DIR``; starting the service changes nothing on disk.
- ``GET /kv/KEY``: the bytes, or 404.

Keys are 1-128 characters of ``A-Z a-z 0-9 . _ -`` (not ``.`` or ``..``); anything else is
400. SIGTERM and SIGINT stop it cleanly: the listener closes, requests in flight finish.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import socket
import sys
import tempfile
from pathlib import Path

from aiohttp import web

from stead.aio import cancel_and_wait
from stead.fsutil import load_syncfs

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_BODY = 16 * 1024**2
DATA_DIR: web.AppKey[Path] = web.AppKey("data_dir", Path)
WRITER: web.AppKey[GroupWriter] = web.AppKey("writer")


def valid_key(key: str) -> bool:
    return KEY_RE.fullmatch(key) is not None and key not in (".", "..")


def _fsync_dir(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` and missing parents, each entry durable in its parent."""
    missing = [d for d in (directory, *directory.parents) if not d.is_dir()]
    for each in reversed(missing):
        each.mkdir(exist_ok=True)
        _fsync_dir(each.parent)


_SYNCFS = load_syncfs()
GROUP_MAX = 256  # writes per group commit


def _sync_data(directory: Path, fds: list[int]) -> None:
    """Make the written files' data durable: one ``syncfs``, or an fsync each without it."""
    if _SYNCFS is None:
        for fd in fds:
            os.fsync(fd)
        return
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(dir_fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(dir_fd)


def write_durably(directory: Path, key: str, data: bytes) -> None:
    """Replace ``directory/key`` with ``data``: all of it, durably, or not at all."""
    write_group_durably(directory, [(key, data)])


def write_group_durably(directory: Path, items: list[tuple[str, bytes]]) -> None:
    """Replace each ``directory/key`` with its data, in order, durably, or raise.

    ``directory`` is made by the first write, not at start: a service that only starts
    changes nothing in the protected path. A temporary name holds a ``~``, which no key
    does, so a half-written file is never served as a key. A failure before the renames
    leaves every old value and no temporary file.
    """
    _make_dirs(directory)
    temps: list[tuple[str, str, int]] = []
    try:
        for key, data in items:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}~", suffix=".tmp")
            temps.append((key, tmp, fd))
            os.fchmod(fd, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        _sync_data(directory, [fd for _, _, fd in temps])
        for key, tmp, _ in temps:
            os.replace(tmp, directory / key)
    except BaseException:
        for _, tmp, _ in temps:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    finally:
        for _, _, fd in temps:
            os.close(fd)
    _fsync_dir(directory)


class GroupWriter:
    """Collects the writes that arrive while a group is being made durable, and makes
    them durable together: throughput grows with concurrency, as a database's group
    commit does, while every answer still waits for its own write to be durable."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._queue: list[tuple[str, bytes, asyncio.Future[None]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.groups = 0

    async def write(self, key: str, data: bytes) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((key, data, future))
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        await future

    async def _run(self) -> None:
        while self._queue:
            group, self._queue = self._queue[:GROUP_MAX], self._queue[GROUP_MAX:]
            try:
                await asyncio.to_thread(
                    write_group_durably, self.directory, [(k, d) for k, d, _ in group]
                )
            except Exception as exc:  # every writer of the group hears it
                for _, _, future in group:
                    if not future.done():
                        future.set_exception(exc)
            else:
                for _, _, future in group:
                    if not future.done():
                        future.set_result(None)
            self.groups += 1

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)


def _epoch() -> int | str | None:
    value = os.environ.get("STEAD_EPOCH")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return value


def _key(request: web.Request) -> str:
    key = request.match_info["key"]
    if not valid_key(key):
        raise web.HTTPBadRequest(text="a key is 1-128 characters of A-Z a-z 0-9 . _ -\n")
    return key


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def whoami(request: web.Request) -> web.Response:
    hostname = socket.gethostname()
    node = os.environ.get("STEAD_NODE") or hostname
    return web.json_response({"node": node, "hostname": hostname, "epoch": _epoch()})


async def put_key(request: web.Request) -> web.Response:
    key = _key(request)
    data = await request.read()
    await request.app[WRITER].write(key, data)
    return web.Response(status=201, text="stored\n")


async def get_key(request: web.Request) -> web.Response:
    path = request.app[DATA_DIR] / _key(request)
    try:
        data = await asyncio.to_thread(path.read_bytes)
    except (FileNotFoundError, IsADirectoryError):
        raise web.HTTPNotFound(text=f"no key {path.name}\n") from None
    return web.Response(body=data, content_type="application/octet-stream")


def create_app(data_dir: Path) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[DATA_DIR] = data_dir
    app[WRITER] = GroupWriter(data_dir)

    async def close_writer(app: web.Application) -> None:
        await app[WRITER].close()

    app.on_cleanup.append(close_writer)
    app.router.add_get("/health", health)
    app.router.add_get("/whoami", whoami)
    app.router.add_put("/kv/{key}", put_key)
    app.router.add_get("/kv/{key}", get_key)
    return app


async def serve(port: int, data_dir: Path, host: str = "0.0.0.0") -> None:
    """Serve until SIGTERM or SIGINT; prints ``listening on HOST:PORT`` once it accepts.

    ``data_dir`` need not exist yet: the first write makes it.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # No access log: the agent's health check asks every second.
    runner = web.AppRunner(create_app(data_dir), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        bound = runner.addresses[0][1]
        print(f"demo: listening on {host}:{bound}, data in {data_dir}", flush=True)
        await stop.wait()
        log.info("stopping")
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stead.lab.demo_service")
    parser.add_argument("--port", type=int, required=True, help="TCP port (0: any free one)")
    parser.add_argument("--data", type=Path, required=True, help="directory of the data")
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="demo: %(message)s")
    asyncio.run(serve(args.port, args.data, args.host))
    return 0


if __name__ == "__main__":
    sys.exit(main())
