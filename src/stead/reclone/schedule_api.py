"""The agent API's routes for reclone schedules, added to an aiohttp app by ``add_routes``.

- ``GET /v1/schedules?count=N``: every schedule with its next N runs (default 3, at most 50)
- ``POST /v1/schedules``: add one; the body is a schedule without ``created`` (201)
- ``DELETE /v1/schedules/{name}``: remove one
- ``POST /v1/schedules/{name}/enable`` and ``.../disable``

Bad input is a UsageError (400 through the server's middleware); an unknown schedule is 404;
a node without a scheduler answers 503.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from stead.api.body import json_object
from stead.errors import NotFound as UnknownSchedule
from stead.errors import UsageError
from stead.reclone.scheduler import Scheduler

SchedulerGetter = Callable[[], Scheduler | None]
MAX_COUNT = 50


def add_routes(app: web.Application, scheduler_getter: SchedulerGetter) -> None:
    """Add the schedule routes; ``scheduler_getter()`` is None where no scheduler runs."""

    def scheduler() -> Scheduler:
        found = scheduler_getter()
        if found is None:
            raise web.HTTPServiceUnavailable(
                text='{"error": "no reclone scheduler runs on this node"}',
                content_type="application/json",
            )
        return found

    async def list_schedules(request: web.Request) -> web.Response:
        text = request.query.get("count", "3")
        if not text.isdigit() or not 0 <= int(text) <= MAX_COUNT:
            raise UsageError(f"count must be a whole number from 0 to {MAX_COUNT}")
        found = scheduler()
        listed = await found.listing(int(text))
        return web.json_response({"now": found.now().isoformat(), "schedules": listed})

    async def add_schedule(request: web.Request) -> web.Response:
        body = await json_object(request)
        found = scheduler()
        added = await found.add(found.build(body))
        return web.json_response(added.model_dump(mode="json"), status=201)

    async def remove_schedule(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            await scheduler().remove(name)
        except UnknownSchedule as exc:
            return web.json_response({"error": str(exc)}, status=404)
        return web.json_response({"removed": name})

    def toggle(enabled: bool) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            try:
                changed = await scheduler().set_enabled(request.match_info["name"], enabled)
            except UnknownSchedule as exc:
                return web.json_response({"error": str(exc)}, status=404)
            return web.json_response(changed.model_dump(mode="json"))

        return handler

    app.router.add_get("/v1/schedules", list_schedules)
    app.router.add_post("/v1/schedules", add_schedule)
    app.router.add_delete("/v1/schedules/{name}", remove_schedule)
    app.router.add_post("/v1/schedules/{name}/enable", toggle(True))
    app.router.add_post("/v1/schedules/{name}/disable", toggle(False))
