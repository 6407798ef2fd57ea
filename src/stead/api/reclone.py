"""The reclone routes of the local API: start a reclone job, roll back, the history."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

from stead.api.body import json_object
from stead.errors import UsageError

if TYPE_CHECKING:
    from stead.agent.daemon import Agent

AgentOf = Any  # a callable from the request to the agent (stead.api.server._agent)


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise UsageError(f"{key} must be true or false")
    return value


def add_routes(app: web.Application, agent_of: AgentOf) -> None:
    async def start(request: web.Request) -> web.Response:
        body = await json_object(request)
        nodes = body.get("nodes", [])
        if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
            raise UsageError("nodes must be a list of node names")
        agent: Agent = agent_of(request)
        job = agent.start_reclone(
            nodes,
            all_nodes=_flag(body, "all"),
            delete_original=_flag(body, "delete_original"),
            force=_flag(body, "force"),
            dry_run=_flag(body, "dry_run"),
        )
        return web.json_response(job.describe(), status=202)

    async def rollback(request: web.Request) -> web.Response:
        body = await json_object(request)
        node = body.get("node")
        if not isinstance(node, str):
            raise UsageError("node must be a node name")
        agent: Agent = agent_of(request)
        return web.json_response(await agent.rollback_reclone(node))

    async def history(request: web.Request) -> web.Response:
        agent: Agent = agent_of(request)
        return web.json_response(agent.reclone_history())

    app.router.add_post("/v1/reclone", start)
    app.router.add_post("/v1/reclone/rollback", rollback)
    app.router.add_get("/v1/reclone/history", history)
