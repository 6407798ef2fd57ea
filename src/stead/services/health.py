"""Health probes: one attempt of one check, answered as ``(healthy, one-line detail)``.

A probe never raises for the service's sake (a refused connection, a timeout, a missing
program are all answers) and never takes longer than the check's ``timeout``.
"""

from __future__ import annotations

import asyncio
import shlex
import time
from collections.abc import Mapping

import aiohttp

from stead.services.config import HealthCheck
from stead.services.control import run_argv


def describe_check(check: HealthCheck) -> str:
    """What the check looks at, for status lines: ``tcp 127.0.0.1:5432``."""
    if check.kind == "tcp":
        return f"tcp {_address(check.host, check.port)}"
    if check.kind == "http":
        return f"http GET {check.url} (expect {check.expect_status})"
    if check.kind == "command":
        return f"command `{shlex.join(check.argv)}`"
    return f"systemd {check.unit or '(no unit)'}"


async def probe(
    check: HealthCheck, *, systemctl: str = "systemctl", env: Mapping[str, str] | None = None
) -> tuple[bool, str]:
    """Probe once. ``env`` is the environment of command checks (default: the agent's)."""
    started = time.monotonic()
    if check.kind == "tcp":
        ok, detail = await _tcp(check)
    elif check.kind == "http":
        ok, detail = await _http(check)
    elif check.kind == "command":
        ok, detail = await _command(check, env)
    else:
        ok, detail = await _systemd(check, systemctl)
    if ok:
        detail = f"{detail} in {(time.monotonic() - started) * 1000:.0f} ms"
    return ok, " ".join(detail.split())


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _tcp(check: HealthCheck) -> tuple[bool, str]:
    where = _address(check.host, check.port)
    try:
        async with asyncio.timeout(check.timeout):
            _, writer = await asyncio.open_connection(check.host, check.port)
            writer.close()
            await writer.wait_closed()
    except TimeoutError:
        return False, f"no connection to {where} within {check.timeout:g} s"
    except OSError as error:
        return False, f"cannot connect to {where}: {error.strerror or error}"
    return True, f"connected to {where}"


async def _http(check: HealthCheck) -> tuple[bool, str]:
    # A fresh connection each time: a kept-alive one would not show that new ones are refused.
    # Redirects are not followed: the expected status is that of this URL.
    try:
        async with (
            asyncio.timeout(check.timeout),
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session,
            session.get(check.url, allow_redirects=False) as response,
        ):
            status = response.status
    except TimeoutError:
        return False, f"no answer from GET {check.url} within {check.timeout:g} s"
    except aiohttp.ClientError as error:
        return False, f"GET {check.url} failed: {error}"
    if status != check.expect_status:
        return False, f"GET {check.url} answered {status}, expected {check.expect_status}"
    return True, f"GET {check.url} answered {status}"


async def _command(check: HealthCheck, env: Mapping[str, str] | None) -> tuple[bool, str]:
    done = await run_argv(check.argv, check.timeout, env)
    what = f"`{shlex.join(check.argv)}`"
    if done.ok:
        return True, f"{what} exited with status 0"
    return False, f"{what} {done.summary()}"


async def _systemd(check: HealthCheck, systemctl: str) -> tuple[bool, str]:
    if not check.unit:
        return False, "no unit to ask systemd about"
    done = await run_argv([systemctl, "is-active", "--quiet", check.unit], check.timeout)
    if done.ok:
        return True, f"unit {check.unit} is active"
    if done.returncode is None:
        return False, f"`systemctl is-active {check.unit}` {done.summary()}"
    return False, f"unit {check.unit} is not active (is-active exited with {done.returncode})"
