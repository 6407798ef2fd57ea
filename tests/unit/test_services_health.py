"""Health probes against real local servers: aiohttp, a TCP listener, commands, fake systemctl."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from test_services_fakes import write_fake_systemctl

from stead.services.config import HealthCheck
from stead.services.health import describe_check, probe


@pytest.fixture
async def site() -> AsyncIterator[str]:
    """An HTTP server on 127.0.0.1: /ok answers 200, /down 503, /moved 302, /slow never."""
    release = asyncio.Event()

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def down(request: web.Request) -> web.Response:
        return web.Response(status=503)

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound("/ok")

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/down", down)
    app.router.add_get("/moved", moved)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    yield f"http://127.0.0.1:{port}"
    release.set()
    await runner.cleanup()


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http(url: str, **extra: Any) -> HealthCheck:
    return HealthCheck(kind="http", url=url, interval=5, timeout=2, **extra)


async def test_http_healthy_on_the_expected_status(site: str) -> None:
    ok, detail = await probe(http(f"{site}/ok"))
    assert ok
    assert f"GET {site}/ok answered 200" in detail


async def test_http_unhealthy_on_another_status(site: str) -> None:
    ok, detail = await probe(http(f"{site}/down"))
    assert not ok
    assert detail == f"GET {site}/down answered 503, expected 200"
    assert (await probe(http(f"{site}/down", expect_status=503)))[0]


async def test_http_does_not_follow_redirects(site: str) -> None:
    assert not (await probe(http(f"{site}/moved")))[0]
    assert (await probe(http(f"{site}/moved", expect_status=302)))[0]


async def test_http_times_out(site: str) -> None:
    check = HealthCheck(kind="http", url=f"{site}/slow", interval=1, timeout=0.2)
    began = time.monotonic()
    ok, detail = await probe(check)
    assert not ok
    assert time.monotonic() - began < 1.5
    assert detail == f"no answer from GET {site}/slow within 0.2 s"


async def test_http_refused() -> None:
    ok, detail = await probe(http(f"http://127.0.0.1:{free_port()}/"))
    assert not ok
    assert "failed" in detail
    assert "\n" not in detail


async def test_tcp_healthy_while_listening_then_refused() -> None:
    accepted = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    check = HealthCheck(kind="tcp", port=port, interval=5, timeout=2)
    async with server:
        ok, detail = await probe(check)
        assert ok
        assert detail.startswith(f"connected to 127.0.0.1:{port} in ")
        async with asyncio.timeout(5):
            await accepted.wait()
    ok, detail = await probe(check)
    assert not ok
    assert detail.startswith(f"cannot connect to 127.0.0.1:{port}: ")


async def test_command_exit_status_decides(tmp_path: Path) -> None:
    def command(script: str, **extra: Any) -> HealthCheck:
        return HealthCheck(kind="command", argv=["sh", "-c", script], interval=5, **extra)

    ok, detail = await probe(command("exit 0"))
    assert ok
    assert detail.startswith("`sh -c 'exit 0'` exited with status 0 in ")
    ok, detail = await probe(command("echo 'replica lag 40 s' >&2; exit 2"))
    assert not ok
    assert detail.endswith("` exited with status 2: replica lag 40 s")
    ok, detail = await probe(command("exec sleep 60", timeout=0.2))
    assert not ok
    assert detail.endswith("timed out after 0.2 s")
    ok, detail = await probe(HealthCheck(kind="command", argv=[str(tmp_path / "missing")]))
    assert not ok
    assert "could not run it: No such file or directory" in detail


async def test_command_checks_get_the_given_environment(tmp_path: Path) -> None:
    check = HealthCheck(kind="command", argv=["sh", "-c", 'test "$STEAD_ROLE" = active'])
    assert (await probe(check, env={"STEAD_ROLE": "active", "PATH": "/usr/bin:/bin"}))[0]
    assert not (await probe(check, env={"STEAD_ROLE": "passive", "PATH": "/usr/bin:/bin"}))[0]


async def test_systemd_asks_is_active(tmp_path: Path) -> None:
    systemctl = write_fake_systemctl(tmp_path / "bin")
    check = HealthCheck(kind="systemd", unit="db.service")
    ok, detail = await probe(check, systemctl=str(systemctl))
    assert not ok
    assert detail == "unit db.service is not active (is-active exited with 3)"
    (systemctl.parent / "state" / "db.service.active").touch()
    ok, detail = await probe(check, systemctl=str(systemctl))
    assert ok
    assert detail.startswith("unit db.service is active in ")


def test_describe_check() -> None:
    assert describe_check(HealthCheck(kind="tcp", port=5432)) == "tcp 127.0.0.1:5432"
    assert describe_check(HealthCheck(kind="tcp", host="::1", port=80)) == "tcp [::1]:80"
    assert describe_check(http("http://x/")) == "http GET http://x/ (expect 200)"
    assert describe_check(HealthCheck(kind="command", argv=["pg_isready"])) == (
        "command `pg_isready`"
    )
    assert describe_check(HealthCheck(kind="systemd", unit="a.service")) == "systemd a.service"
