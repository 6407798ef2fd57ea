"""The protected services of one node: started in order on the active, stopped in reverse on a
passive, and watched while active.

The agent calls :meth:`ServiceManager.start_all` when it becomes active and
:meth:`ServiceManager.stop_all` when it becomes passive (and at start-up as a passive), and
runs :meth:`ServiceManager.monitor` for as long as it lives. The monitor does nothing unless
the services were started and maintenance is off.

Besides its configured checks, every service has one implicit check, ``running``: the
backend's own answer (a supervised process that ended is reported at once, the others are
asked at the pace of the fastest check). One failure of it is enough for an action, with the
default actions (restart, restart, switchover).

Events, passed to ``on_event(kind, message)`` and logged: started, stopped, start_failed,
stop_failed, exited, check_failed, check_recovered, actions_reset, restart, restarted,
restart_failed, alert, switchover, switchover_failed, exhausted, maintenance.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from stead.aio import TaskGroup
from stead.errors import ServiceError
from stead.services.config import HealthCheck, ServiceSpec
from stead.services.control import ServiceControl, control_for
from stead.services.health import describe_check, probe
from stead.services.rules import Policy, Rule, Step

logger = logging.getLogger(__name__)

EventCallback = Callable[[str, str], None]
SwitchoverCallback = Callable[[str], Awaitable[None]]

LIVENESS = Policy(failures=1)
_WARNINGS = {"start_failed", "stop_failed", "exited", "check_failed", "restart", "alert"}
_ERRORS = {"restart_failed", "switchover", "switchover_failed", "exhausted"}


@dataclass
class _Check:
    name: str
    check: HealthCheck | None  # None: the implicit ``running`` check
    rule: Rule
    interval: float
    ok: bool | None = None
    detail: str = ""
    at: float | None = None


@dataclass
class _Service:
    spec: ServiceSpec
    control: ServiceControl
    checks: list[_Check]
    running: bool | None = None
    epoch: int = 0  # bumped before and after every start, stop and restart
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def name(self) -> str:
        return self.spec.name


@contextlib.contextmanager
def _operating(service: _Service) -> Iterator[None]:
    """Mark a start, stop or restart: results of probes begun before or during it are stale."""
    service.epoch += 1
    try:
        yield
    finally:
        service.epoch += 1


class ServiceManager:
    """Starts, stops and watches the configured services of this node.

    ``env`` (STEAD_NODE, STEAD_ROLE, STEAD_EPOCH) is given to supervised processes and
    commands at each start; :meth:`set_env` changes it for the next starts. Start, stop and
    restart never overlap; a probe whose service was started, stopped or restarted meanwhile
    is ignored.
    """

    def __init__(
        self,
        specs: Sequence[ServiceSpec],
        env: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
        *,
        on_event: EventCallback | None = None,
        systemctl: str = "systemctl",
        controls: Mapping[str, ServiceControl] | None = None,
    ) -> None:
        self._env: dict[str, str] = dict(env)
        self._clock = clock
        self._on_event = on_event
        self._systemctl = systemctl
        self._services: list[_Service] = []
        for spec in specs:
            control = (controls or {}).get(spec.name) or control_for(
                spec, self._env, systemctl=systemctl
            )
            checks = spec.resolved_checks()
            pace = min((check.interval for check in checks), default=2.0)
            implicit = _Check("running", None, Rule(LIVENESS), pace)
            configured = [
                _Check(describe_check(check), check, Rule(Policy.of(check)), check.interval)
                for check in checks
            ]
            service = _Service(spec, control, [implicit, *configured])
            control.set_exit_callback(self._exit_reporter(service))
            self._services.append(service)
        self._lock = asyncio.Lock()
        self._active = False
        self._maintenance = False
        self._monitoring = asyncio.Event()  # set while active and not in maintenance
        self._switchover_requested = False

    # ---- state ------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """True from a successful ``start_all()`` until ``stop_all()``."""
        return self._active

    @property
    def maintenance(self) -> bool:
        """While True: no checks, no actions, services left as they are."""
        return self._maintenance

    @maintenance.setter
    def maintenance(self, value: bool) -> None:
        if value == self._maintenance:
            return
        self._maintenance = value
        for service in self._services:
            service.epoch += 1
            if not value:  # what happened during maintenance is the operator's doing
                for check in service.checks:
                    check.rule.reset()
        self._gate()
        self._event(
            "maintenance",
            "on: no checks and no actions; services left as they are"
            if value
            else "off: checks and actions resume",
        )

    def set_env(self, env: Mapping[str, str]) -> None:
        """The environment of the next starts (a new role or epoch)."""
        self._env.clear()
        self._env.update(env)

    def control(self, name: str) -> ServiceControl:
        for service in self._services:
            if service.name == name:
                return service.control
        raise KeyError(name)

    def status(self) -> list[dict[str, Any]]:
        """Per service: name, control, last known running state, and per check its last
        result, consecutive failures, actions used and last action."""
        return [
            {
                "name": service.name,
                "control": service.control.describe(),
                "running": service.running,
                "checks": [
                    {
                        "check": check.name,
                        "ok": check.ok,
                        "detail": check.detail,
                        "at": check.at,
                        "failures": check.rule.state.failures,
                        "actions_used": check.rule.state.actions_used,
                        "last_action": check.rule.state.last_action,
                    }
                    for check in service.checks
                ],
            }
            for service in self._services
        ]

    # ---- start and stop ---------------------------------------------------------------------

    async def start_all(self) -> None:
        """Start every service in configured order. If one fails, stop those started, in
        reverse order, and raise its ServiceError."""
        async with self._lock:
            self._active = False
            self._gate()
            started: list[_Service] = []
            for service in self._services:
                try:
                    with _operating(service):
                        await service.control.start()
                except ServiceError as error:
                    service.running = None
                    self._event("start_failed", str(error))
                    for done in reversed(started):
                        await self._stop_one(done)
                    raise
                service.running = True
                started.append(service)
                self._event("started", service.control.describe())
            for service in self._services:
                for check in service.checks:
                    check.rule.reset()
            self._switchover_requested = False
            self._active = True
            self._gate()

    async def stop_all(self) -> None:
        """Stop every service in reverse order, going on past failures; then raise a
        ServiceError naming those that could not be stopped, if any."""
        self._active = False
        self._gate()  # before waiting for the lock: a pending restart then gives up
        async with self._lock:
            failed = [s for s in reversed(self._services) if not await self._stop_one(s)]
        if failed:
            raise ServiceError(
                "could not be stopped; see the stop_failed events",
                service=", ".join(service.name for service in failed),
            )

    async def _stop_one(self, service: _Service) -> bool:
        try:
            with _operating(service):
                await service.control.stop()
        except ServiceError as error:
            service.running = None
            self._event("stop_failed", str(error))
            return False
        service.running = False
        self._event("stopped", service.name)
        return True

    # ---- monitoring -------------------------------------------------------------------------

    async def monitor(self, on_switchover: SwitchoverCallback) -> None:
        """Run every check at its interval while active and not in maintenance, and act on
        the results. Runs until cancelled. ``on_switchover(reason)`` is called at most once
        per activation."""
        async with TaskGroup() as group:
            for service in self._services:
                for check in service.checks:
                    group.create_task(
                        self._watch(service, check, on_switchover),
                        name=f"check {service.name}: {check.name}",
                    )
            await asyncio.get_running_loop().create_future()  # until cancelled

    async def _watch(
        self, service: _Service, check: _Check, on_switchover: SwitchoverCallback
    ) -> None:
        while True:
            await self._monitoring.wait()
            epoch = service.epoch
            if check.check is None:
                service.wake.clear()
                ok, detail = await self._liveness(service)
            else:
                ok, detail = await probe(check.check, systemctl=self._systemctl, env=self._env)
            if self._current(service, epoch):
                if check.check is None:
                    service.running = ok
                await self._observe(service, check, epoch, ok, detail, on_switchover)
            if check.check is None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(check.interval):
                        await service.wake.wait()
            else:
                await asyncio.sleep(check.interval)

    async def _liveness(self, service: _Service) -> tuple[bool, str]:
        try:
            alive = await service.control.running()
        except ServiceError as error:
            return False, str(error)
        return alive, "running" if alive else "not running"

    def _current(self, service: _Service, epoch: int) -> bool:
        return self._monitoring.is_set() and service.epoch == epoch

    async def _observe(
        self,
        service: _Service,
        check: _Check,
        epoch: int,
        ok: bool,
        detail: str,
        on_switchover: SwitchoverCallback,
    ) -> None:
        now = self._clock()
        check.ok, check.detail, check.at = ok, detail, now
        step = check.rule.observe(ok, now)
        about = f"{service.name}: {check.name}: {detail}"
        if step.outcome == "recovered":
            self._event("check_recovered", about)
        elif step.outcome == "reset":
            self._event("actions_reset", f"{service.name}: {check.name}: {step.reason}")
        elif step.outcome == "failing" and check.rule.state.failures == 1:
            self._event("check_failed", f"{about} ({step.reason})")
        elif step.outcome == "exhausted":
            self._event("exhausted", f"{about}; {step.reason}")
        elif step.outcome == "act":
            await self._act(service, epoch, step, f"{about}; {step.reason}", on_switchover)

    async def _act(
        self,
        service: _Service,
        epoch: int,
        step: Step,
        reason: str,
        on_switchover: SwitchoverCallback,
    ) -> None:
        if step.action == "alert":
            self._event("alert", reason)
        elif step.action == "restart":
            async with self._lock:
                if not self._current(service, epoch):
                    return  # stopped, restarted or put in maintenance meanwhile
                self._event("restart", reason)
                try:
                    with _operating(service):
                        await service.control.stop()
                        await service.control.start()
                except ServiceError as error:
                    service.running = None
                    self._event("restart_failed", str(error))
                else:
                    service.running = True
                    self._event("restarted", service.control.describe())
                for check in service.checks:
                    check.rule.clear_failures()
        elif step.action == "switchover":
            if self._switchover_requested:
                self._event("exhausted", f"{reason}; a switchover was already requested")
                return
            self._switchover_requested = True
            self._event("switchover", reason)
            try:
                await on_switchover(reason)
            except Exception as error:
                logger.exception("switchover request failed")
                self._event("switchover_failed", f"{reason}: {error}")

    # ---- helpers ----------------------------------------------------------------------------

    def _gate(self) -> None:
        if self._active and not self._maintenance:
            self._monitoring.set()
        else:
            self._monitoring.clear()

    def _exit_reporter(self, service: _Service) -> Callable[[int, str], None]:
        def exited(returncode: int, sentence: str) -> None:
            service.running = False
            self._event("exited", f"{service.name}: {sentence}")
            service.wake.set()

        return exited

    def _event(self, kind: str, message: str) -> None:
        level = (
            logging.ERROR
            if kind in _ERRORS
            else logging.WARNING
            if kind in _WARNINGS
            else logging.INFO
        )
        logger.log(level, "%s: %s", kind, message)
        if self._on_event is not None:
            try:
                self._on_event(kind, message)
            except Exception:
                logger.exception("event callback failed")
