"""Request bodies of the local API: one JSON object, or a clear usage error."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from stead.errors import UsageError


async def json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; an empty body is an empty object."""
    if not request.can_read_body:
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise UsageError("request body is not JSON") from None
    if not isinstance(body, dict):
        raise UsageError("request body must be a JSON object")
    return body
