"""The service manager with real backends: order, rollback, monitoring, actions, maintenance."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from test_services_fakes import exists, until, write_fake_systemctl

from stead.errors import ServiceError
from stead.services.config import HealthCheck, ServiceSpec
from stead.services.control import SupervisedProcess
from stead.services.manager import ServiceManager

ENV = {"STEAD_NODE": "alpha", "STEAD_ROLE": "active", "STEAD_EPOCH": "7"}


class Events:
    """Records ``on_event`` calls and lets a test await a kind of event."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self._changed = asyncio.Event()

    def __call__(self, kind: str, message: str) -> None:
        self.seen.append((kind, message))
        self._changed.set()

    def kinds(self, *wanted: str) -> list[str]:
        return [kind for kind, _ in self.seen if not wanted or kind in wanted]

    def count(self, kind: str) -> int:
        return len(self.kinds(kind))

    async def wait(self, kind: str, count: int = 1, timeout: float = 5.0) -> str:
        """The message of the ``count``-th event of ``kind``, once it came."""
        async with asyncio.timeout(timeout):
            while self.count(kind) < count:
                self._changed.clear()
                await self._changed.wait()
        return [message for k, message in self.seen if k == kind][count - 1]


def commands(tmp: Path, name: str, *, fail: str = "", **extra: Any) -> ServiceSpec:
    """A service of start/stop/status commands; starts and stops go to ``tmp/log``."""
    on, log = tmp / f"{name}.on", tmp / "log"
    failing = f"echo '{name} cannot {fail}' >&2; exit 1"
    start = f'echo "start {name} $STEAD_ROLE" >> {log}; touch {on}'
    stop = f'echo "stop {name}" >> {log}; rm -f {on}'
    return ServiceSpec(
        name=name,
        start=["sh", "-c", failing if fail == "start" else start],
        stop=["sh", "-c", failing if fail == "stop" else stop],
        status=["test", "-e", str(on)],
        start_timeout=5,
        stop_timeout=5,
        **extra,
    )


def log(tmp: Path) -> list[str]:
    path = tmp / "log"
    return path.read_text().splitlines() if path.exists() else []


class Switchovers:
    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.called = asyncio.Event()

    async def __call__(self, reason: str) -> None:
        self.reasons.append(reason)
        self.called.set()


@pytest.fixture
async def running() -> AsyncIterator[Callable[..., Awaitable[ServiceManager]]]:
    """Makes managers whose monitor runs in the background; stops all at the end."""
    managers: list[ServiceManager] = []
    tasks: list[asyncio.Task[None]] = []

    async def make(
        specs: list[ServiceSpec], on_switchover: Switchovers | None = None, **kwargs: Any
    ) -> ServiceManager:
        manager = ServiceManager(specs, ENV, **kwargs)
        managers.append(manager)
        tasks.append(asyncio.create_task(manager.monitor(on_switchover or Switchovers())))
        return manager

    yield make
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    for manager in managers:
        await manager.stop_all()


# ---- start and stop -------------------------------------------------------------------------


async def test_start_in_order_and_stop_in_reverse(tmp_path: Path) -> None:
    events = Events()
    manager = ServiceManager([commands(tmp_path, n) for n in "abc"], ENV, on_event=events)
    await manager.start_all()
    assert manager.active
    assert log(tmp_path) == ["start a active", "start b active", "start c active"]
    assert [s["running"] for s in manager.status()] == [True, True, True]
    await manager.stop_all()
    assert not manager.active
    assert log(tmp_path)[3:] == ["stop c", "stop b", "stop a"]
    assert events.kinds() == ["started"] * 3 + ["stopped"] * 3


async def test_a_failed_start_stops_what_was_started_in_reverse(tmp_path: Path) -> None:
    events = Events()
    specs = [
        commands(tmp_path, "a"),
        commands(tmp_path, "b"),
        commands(tmp_path, "c", fail="start"),
    ]
    manager = ServiceManager([*specs, commands(tmp_path, "d")], ENV, on_event=events)
    with pytest.raises(ServiceError) as caught:
        await manager.start_all()
    assert caught.value.service == "c"
    assert "c cannot start" in str(caught.value)
    assert log(tmp_path) == ["start a active", "start b active", "stop b", "stop a"]
    assert not manager.active
    assert events.kinds() == ["started", "started", "start_failed", "stopped", "stopped"]


async def test_stop_all_goes_on_past_failures_and_reports_them(tmp_path: Path) -> None:
    events = Events()
    specs = [commands(tmp_path, "a"), commands(tmp_path, "b", fail="stop"), commands(tmp_path, "c")]
    manager = ServiceManager(specs, ENV, on_event=events)
    await manager.start_all()
    with pytest.raises(ServiceError, match="Service b: could not be stopped"):
        await manager.stop_all()
    assert log(tmp_path)[3:] == ["stop c", "stop a"]
    assert events.kinds("stopped", "stop_failed") == ["stopped", "stop_failed", "stopped"]
    assert "b cannot stop" in dict((k, m) for k, m in events.seen)["stop_failed"]
    assert [s["running"] for s in manager.status()] == [False, None, False]


async def test_the_environment_of_the_next_start_can_change(tmp_path: Path) -> None:
    manager = ServiceManager([commands(tmp_path, "a")], ENV)
    await manager.start_all()
    await manager.stop_all()
    manager.set_env({**ENV, "STEAD_ROLE": "promoting"})
    await manager.start_all()
    await manager.stop_all()
    assert log(tmp_path) == ["start a active", "stop a", "start a promoting", "stop a"]


# ---- monitoring -----------------------------------------------------------------------------


def sleeper(name: str = "web", **extra: Any) -> ServiceSpec:
    return ServiceSpec(name=name, exec=["sleep", "1000"], stop_timeout=5, **extra)


def pid_of(manager: ServiceManager, name: str = "web") -> int:
    control = manager.control(name)
    assert isinstance(control, SupervisedProcess)
    assert control.pid is not None
    return control.pid


async def test_monitor_restarts_a_killed_supervised_process(
    running: Callable[..., Awaitable[ServiceManager]],
) -> None:
    events = Events()
    manager = await running([sleeper()], on_event=events)
    await manager.start_all()
    first = pid_of(manager)
    os.kill(first, signal.SIGKILL)
    assert "killed by SIGKILL" in await events.wait("exited")
    await events.wait("restarted")
    assert pid_of(manager) != first
    await until(lambda: not exists(first))
    running_check = manager.status()[0]["checks"][0]
    assert running_check["check"] == "running"
    assert running_check["actions_used"] == 1
    assert running_check["last_action"] == "restart"
    assert events.kinds("exited", "restart", "restarted") == ["exited", "restart", "restarted"]


async def test_failing_check_restarts_twice_then_asks_for_a_switchover_once(
    tmp_path: Path, running: Callable[..., Awaitable[ServiceManager]]
) -> None:
    events = Events()
    switchovers = Switchovers()
    check = HealthCheck(
        kind="command",
        argv=["sh", "-c", "echo 'no quorum' >&2; exit 1"],
        interval=0.05,
        timeout=0.05,
        failures=2,
    )
    manager = await running(
        [commands(tmp_path, "db", checks=[check])], switchovers, on_event=events
    )
    await manager.start_all()
    async with asyncio.timeout(10):
        await switchovers.called.wait()
    assert len(switchovers.reasons) == 1
    assert "db: command `sh -c" in switchovers.reasons[0]
    assert "no quorum" in switchovers.reasons[0]
    assert "action 3 of 3: switchover" in switchovers.reasons[0]
    await events.wait("exhausted")  # still failing: reported, nothing more done
    assert events.kinds("restart", "restarted", "switchover") == [
        "restart",
        "restarted",
        "restart",
        "restarted",
        "switchover",
    ]
    assert log(tmp_path) == ["start db active"] + ["stop db", "start db active"] * 2
    assert len(switchovers.reasons) == 1
    db = manager.status()[0]
    assert db["running"] is True
    assert db["checks"][1]["ok"] is False
    assert db["checks"][1]["actions_used"] == 3
    assert db["checks"][1]["last_action"] == "switchover"


async def test_alert_only_reports(
    tmp_path: Path, running: Callable[..., Awaitable[ServiceManager]]
) -> None:
    events = Events()
    check = HealthCheck(
        kind="command", argv=["false"], interval=0.05, timeout=0.05, failures=1, actions=["alert"]
    )
    manager = await running([commands(tmp_path, "db", checks=[check])], on_event=events)
    await manager.start_all()
    assert "action 1 of 1: alert" in await events.wait("alert")
    await events.wait("exhausted")
    assert log(tmp_path) == ["start db active"]


async def test_maintenance_stops_checks_and_actions(
    running: Callable[..., Awaitable[ServiceManager]],
) -> None:
    events = Events()
    manager = await running([sleeper()], on_event=events)
    await manager.start_all()
    await until(lambda: manager.status()[0]["checks"][0]["ok"] is True)
    manager.maintenance = True
    first = pid_of(manager)
    os.kill(first, signal.SIGKILL)
    await events.wait("exited")  # reported, but nothing done about it
    with pytest.raises(TimeoutError):
        await events.wait("restart", timeout=0.5)
    assert not await manager.control("web").running()
    manager.maintenance = False
    await events.wait("restarted")
    assert pid_of(manager) != first
    assert events.kinds("maintenance") == ["maintenance", "maintenance"]


async def test_no_checks_or_actions_until_started_nor_after_stop(
    tmp_path: Path, running: Callable[..., Awaitable[ServiceManager]]
) -> None:
    events = Events()
    probed = tmp_path / "probed"
    check = HealthCheck(kind="command", argv=["touch", str(probed)], interval=0.05, timeout=0.05)
    manager = await running([sleeper(checks=[check])], on_event=events)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await until(probed.exists, timeout=10)
    await manager.start_all()
    await until(probed.exists)
    await manager.stop_all()
    assert events.kinds() == ["started", "stopped"]  # the stop was not taken for an exit
    assert manager.status()[0]["running"] is False


async def test_a_systemd_check_asks_about_the_service_unit(
    tmp_path: Path, running: Callable[..., Awaitable[ServiceManager]]
) -> None:
    systemctl = write_fake_systemctl(tmp_path / "bin")
    spec = ServiceSpec(
        name="db",
        unit="postgresql.service",
        checks=[HealthCheck(kind="systemd", interval=0.05, timeout=0.05)],
    )
    manager = await running([spec], systemctl=str(systemctl))
    await manager.start_all()
    await until(lambda: manager.status()[0]["checks"][1]["ok"] is True)
    status = manager.status()[0]
    assert status["control"] == "db: systemd unit postgresql.service"
    assert status["checks"][1]["check"] == "systemd postgresql.service"
    assert status["checks"][1]["detail"].startswith("unit postgresql.service is active")


def test_a_systemd_check_needs_a_unit() -> None:
    with pytest.raises(ValueError, match="a systemd check needs unit"):
        ServiceSpec(name="x", exec=["true"], checks=[HealthCheck(kind="systemd")])
