"""The agent's local API: HTTP on a Unix socket, for the ``stead`` CLI.

Authentication: the socket is created mode 0600 and every request's peer credentials
(SO_PEERCRED) must belong to root or to the agent's own user; anyone else gets 403.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from stead.agent.jobs import MAX_WAIT
from stead.api import reclone
from stead.api.body import json_object
from stead.errors import SteadError
from stead.reclone import schedule_api

if TYPE_CHECKING:
    from stead.agent.daemon import Agent

AGENT_KEY = web.AppKey("agent", object)


def _peer_uid(request: web.Request) -> int | None:
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


@web.middleware
async def _authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
    uid = _peer_uid(request)
    if uid is None or uid not in (0, os.getuid()):
        return web.json_response({"error": "forbidden"}, status=403)
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except SteadError as exc:
        return web.json_response(
            {"error": str(exc), "kind": type(exc).__name__}, status=_status_for(exc)
        )


def _status_for(exc: SteadError) -> int:
    from stead.errors import TimeoutExpired, UsageError

    if isinstance(exc, UsageError):
        return 400
    if isinstance(exc, TimeoutExpired):
        return 504
    return 500


def _agent(request: web.Request) -> Agent:
    return request.app[AGENT_KEY]  # type: ignore[return-value]


async def status(request: web.Request) -> web.Response:
    return web.json_response(_agent(request).status())


async def wait_sync(request: web.Request) -> web.Response:
    from stead.errors import UsageError

    body = await json_object(request)
    timeout = body.get("timeout", 60.0)
    require_all = body.get("all", False)
    if (
        not isinstance(timeout, int | float)
        or isinstance(timeout, bool)
        or not 0 < timeout < 1e7  # refuses NaN and infinity too
    ):
        raise UsageError("timeout must be a positive number of seconds")
    if not isinstance(require_all, bool):
        raise UsageError("all must be true or false")
    result = await _agent(request).wait_sync(float(timeout), require_all=require_all)
    return web.json_response(result)


async def start_check(request: web.Request) -> web.Response:
    from stead.errors import UsageError

    body = await json_object(request)
    node = body.get("node")
    fast = body.get("fast", False)
    if node is not None and not isinstance(node, str):
        raise UsageError("node must be a node name")
    if not isinstance(fast, bool):
        raise UsageError("fast must be true or false")
    job = _agent(request).start_check(node=node, fast=fast)
    return web.json_response(job.describe(), status=202)


async def drift(request: web.Request) -> web.Response:
    from stead.errors import UsageError

    query = request.query
    flags = {}
    for key in ("trees", "packages"):
        value = query.get(key, "true")
        if value not in ("true", "false"):
            raise UsageError(f"{key} must be true or false")
        flags[key] = value == "true"
    if not any(flags.values()):
        raise UsageError("nothing to compare: trees and packages are both false")
    result = await _agent(request).drift(node=query.get("node") or None, **flags)
    return web.json_response(result)


async def switchover(request: web.Request) -> web.Response:
    from stead.errors import UsageError

    body = await json_object(request)
    to = body.get("to")
    if to is not None and not isinstance(to, str):
        raise UsageError("to must be a node name")
    job = _agent(request).start_switchover(to)
    return web.json_response(job.describe(), status=202)


async def failover(request: web.Request) -> web.Response:
    return web.json_response(await _agent(request).request_failover())


async def maintenance(request: web.Request) -> web.Response:
    from stead.errors import UsageError

    body = await json_object(request)
    on = body.get("on")
    if not isinstance(on, bool):
        raise UsageError("on must be true or false")
    await _agent(request).set_maintenance(on)
    return web.json_response({"maintenance": on})


async def quarantine(request: web.Request) -> web.Response:
    from stead.replication.quarantine import listing

    agent = _agent(request)
    return web.json_response({"node": agent.me, "generations": listing(agent.quarantine_dir)})


async def get_job(request: web.Request) -> web.Response:
    from stead.errors import UsageError

    try:
        job_id = int(request.match_info["job"])
    except ValueError:
        raise UsageError("job id must be a number") from None
    wait = 0.0
    if "wait" in request.query:
        try:
            wait = float(request.query["wait"])
        except ValueError:
            raise UsageError("wait must be a number of seconds") from None
        if not 0 <= wait <= MAX_WAIT:  # NaN fails this too
            raise UsageError(f"wait must be between 0 and {MAX_WAIT:g} seconds")
    job = _agent(request).jobs.get(job_id)
    if job is None:
        return web.json_response({"error": f"no job {job_id}"}, status=404)
    await job.wait(wait)
    return web.json_response(job.describe())


async def events(request: web.Request) -> web.Response:
    from stead.errors import UsageError

    try:
        limit = int(request.query.get("limit", "50"))
    except ValueError:
        raise UsageError("limit must be a whole number") from None
    if not 1 <= limit <= 1000:
        raise UsageError("limit must be between 1 and 1000")
    return web.json_response(_agent(request).store.events(limit=limit))


def build_app(agent: Agent) -> web.Application:
    app = web.Application(middlewares=[_authenticate])
    app[AGENT_KEY] = agent
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/wait-sync", wait_sync)
    app.router.add_post("/v1/check", start_check)
    app.router.add_get("/v1/jobs/{job}", get_job)
    app.router.add_get("/v1/events", events)
    app.router.add_post("/v1/switchover", switchover)
    app.router.add_post("/v1/failover", failover)
    app.router.add_post("/v1/maintenance", maintenance)
    app.router.add_get("/v1/quarantine", quarantine)
    reclone.add_routes(app, _agent)
    schedule_api.add_routes(app, lambda: agent.scheduler)
    app.router.add_get("/v1/drift", drift)
    return app


def _prepare_socket_path(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)


async def serve_unix(agent: Agent, path: Path) -> web.AppRunner:
    _prepare_socket_path(path)
    runner = web.AppRunner(build_app(agent), access_log=None)
    await runner.setup()
    old_umask = os.umask(0o177)
    try:
        site = web.UnixSite(runner, str(path))
        await site.start()
    finally:
        os.umask(old_umask)
    await asyncio.sleep(0)
    return runner
