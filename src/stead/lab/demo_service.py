"""``python -m stead.lab.demo_service --port P --data DIR``: the lab's protected service.

A small HTTP key-value store whose data lives under the protected path (``DIR``), so that
what a client stores through the service address on the active is replicated, and is still
there when another node takes over. The lab configures it as the service ``demo`` that the
active agent runs and checks (``GET /health``).

- ``GET /health``: 200 ``ok``.
- ``GET /whoami``: ``{"node", "hostname", "epoch"}``: which node answered (``$STEAD_NODE``,
  else the host name) in which epoch (``$STEAD_EPOCH``, set by the agent; null without it).
- ``PUT /kv/KEY``: stores the body as ``DIR/KEY`` and answers 201 only once it is durable
  (temporary file, fsync, rename, fsync of the directory), so that an acknowledged write
  survives a crash of the node right after the answer. The first write makes ``DIR``;
  starting the service changes nothing on disk.
- ``GET /kv/KEY``: the bytes, or 404.

Keys are 1-128 characters of ``A-Z a-z 0-9 . _ -`` (not ``.`` or ``..``); anything else is
400. SIGTERM and SIGINT stop it cleanly: the listener closes, requests in flight finish.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import tempfile
from pathlib import Path

from aiohttp import web

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_BODY = 16 * 1024**2
DATA_DIR: web.AppKey[Path] = web.AppKey("data_dir", Path)


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


def write_durably(directory: Path, key: str, data: bytes) -> None:
    """Replace ``directory/key`` with ``data``: all of it, durably, or not at all.

    ``directory`` is made by the first write, not at start: a service that only starts
    changes nothing in the protected path. The temporary name holds a ``~``, which no key
    does, so a half-written file is never served as a key.
    """
    _make_dirs(directory)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{key}~", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o644)
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, directory / key)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


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
    await asyncio.to_thread(write_durably, request.app[DATA_DIR], key, data)
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
