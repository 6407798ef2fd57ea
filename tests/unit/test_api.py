"""The local API: every malformed request gets a clear error; nothing reaches the agent."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from stead.agent.jobs import JobTable
from stead.api.server import serve_unix
from stead.cli.client import AgentClient
from stead.errors import AgentUnavailable, TimeoutExpired, UsageError


class StubAgent:
    """Stands in for the agent behind the API: records what reached it."""

    def __init__(self) -> None:
        self.jobs = JobTable()
        self.calls: list[tuple[str, Any]] = []

    def status(self) -> dict[str, Any]:
        return {"node": "primary", "role": "active"}

    async def wait_sync(self, timeout: float, *, require_all: bool = False) -> dict[str, Any]:
        self.calls.append(("wait_sync", timeout))
        if timeout < 0.5:
            raise TimeoutExpired("secondary applied 1 of 2")
        return {"head": 2, "nodes": {"secondary": 2}}

    def start_check(self, *, node: str | None, fast: bool) -> Any:
        self.calls.append(("check", (node, fast)))
        if node == "ghost":
            raise UsageError("'ghost' is not a passive of this cluster")
        return self.jobs.create("check", {"nodes": [node], "fast": fast})


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[StubAgent, Path]]:
    agent = StubAgent()
    path = tmp_path / "run" / "agent.sock"
    runner = await serve_unix(agent, path)  # type: ignore[arg-type]
    try:
        yield agent, path
    finally:
        await runner.cleanup()


async def _call(path: Path, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as session,
        session.request(method, f"http://agent{url}", **kwargs) as response,
    ):
        return response.status, await response.json()


async def test_status_and_socket_mode(api: tuple[StubAgent, Path]) -> None:
    _, path = api
    assert os.stat(path).st_mode & 0o777 == 0o600
    status, body = await _call(path, "GET", "/v1/status")
    assert status == 200
    assert body["node"] == "primary"


@pytest.mark.parametrize(
    ("url", "kwargs", "code", "text"),
    [
        ("/v1/wait-sync", {"data": b"{not json"}, 400, "not JSON"),
        ("/v1/wait-sync", {"json": [1, 2]}, 400, "JSON object"),
        ("/v1/wait-sync", {"json": {"timeout": -1}}, 400, "positive"),
        ("/v1/wait-sync", {"json": {"timeout": "soon"}}, 400, "positive"),
        ("/v1/wait-sync", {"json": {"timeout": True}}, 400, "positive"),
        ("/v1/wait-sync", {"data": b'{"timeout": NaN}'}, 400, "positive"),
        ("/v1/wait-sync", {"data": b'{"timeout": Infinity}'}, 400, "positive"),
        ("/v1/wait-sync", {"json": {"all": "yes"}}, 400, "true or false"),
        ("/v1/wait-sync", {"json": {"timeout": 0.1}}, 504, "applied 1 of 2"),
        ("/v1/check", {"json": {"node": 7}}, 400, "node name"),
        ("/v1/check", {"json": {"fast": "yes"}}, 400, "true or false"),
        ("/v1/check", {"json": {"node": "ghost"}}, 400, "ghost"),
    ],
)
async def test_bad_requests_get_clear_errors(
    api: tuple[StubAgent, Path], url: str, kwargs: dict[str, Any], code: int, text: str
) -> None:
    agent, path = api
    status, body = await _call(path, "POST", url, **kwargs)
    assert status == code
    assert text in body["error"]
    if code == 400 and "ghost" not in text:
        assert agent.calls == []


async def test_events_limit_is_checked(api: tuple[StubAgent, Path]) -> None:
    _, path = api
    for bad in ("abc", "-1", "0", "100000"):
        status, body = await _call(path, "GET", f"/v1/events?limit={bad}")
        assert status == 400, bad
        assert "limit" in body["error"]


async def test_jobs(api: tuple[StubAgent, Path]) -> None:
    _, path = api
    status, job = await _call(path, "POST", "/v1/check", json={"node": "secondary"})
    assert status == 202
    status, again = await _call(path, "GET", f"/v1/jobs/{job['id']}")
    assert (status, again["state"]) == (200, "running")
    status, _ = await _call(path, "GET", "/v1/jobs/999")
    assert status == 404
    status, _ = await _call(path, "GET", "/v1/jobs/abc")
    assert status == 400


async def test_a_job_question_waits_for_its_end(api: tuple[StubAgent, Path]) -> None:
    """``?wait=S`` answers at once when the job ends, else after S seconds (no polling)."""
    agent, path = api
    _, job = await _call(path, "POST", "/v1/check", json={"node": "secondary"})
    url = f"/v1/jobs/{job['id']}"
    loop = asyncio.get_running_loop()
    started = loop.time()
    status, still = await _call(path, "GET", f"{url}?wait=0.2")
    assert (status, still["state"]) == (200, "running")
    assert loop.time() - started >= 0.2
    the_job = agent.jobs.get(job["id"])
    assert the_job is not None
    loop.call_later(0.3, the_job.finish)  # ends while the next question waits
    started = loop.time()
    status, done = await _call(path, "GET", f"{url}?wait=30")
    assert (status, done["state"]) == (200, "done")
    assert 0.3 <= loop.time() - started < 5
    status, again = await _call(path, "GET", f"{url}?wait=30")  # ended: no waiting
    assert (status, again["state"]) == (200, "done")
    for bad in ("soon", "-1", "31", "nan", "inf"):
        status, body = await _call(path, "GET", f"{url}?wait={bad}")
        assert status == 400, bad
        assert "wait" in body["error"]


async def test_other_users_are_refused() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    # A socket reachable by everyone, mode loosened on purpose: the uid check still refuses.
    directory = Path(tempfile.mkdtemp(prefix="stead-api-"))
    try:
        directory.chmod(0o755)
        path = directory / "agent.sock"
        runner = await serve_unix(StubAgent(), path)  # type: ignore[arg-type]
        try:
            path.chmod(0o666)
            probe = (
                "import os, socket, sys\n"
                "os.setgid(65534); os.setuid(65534)\n"
                "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
                "s.sendall(b'GET /v1/status HTTP/1.0\\r\\n\\r\\n')\n"
                "print(s.recv(200).split(b'\\r\\n')[0].decode())\n"
            )
            result = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-c", probe, str(path)],
                capture_output=True,
                text=True,
                check=False,
            )
            assert "403" in result.stdout, result.stdout + result.stderr
        finally:
            await runner.cleanup()
    finally:
        shutil.rmtree(directory)


def test_cli_client_errors(tmp_path: Path) -> None:
    with pytest.raises(AgentUnavailable, match="is `stead agent` running"):
        AgentClient(tmp_path / "nothing.sock").call("GET", "/v1/status")
