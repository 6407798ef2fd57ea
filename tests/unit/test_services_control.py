"""The ServiceControl seam: one conformance suite every backend passes, then each backend's own
duties (process groups and signals, command timeouts, systemctl on PATH)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_services_fakes import alive, exists, read_pid, until, write_fake_systemctl

from stead.errors import ServiceError
from stead.services.config import ServiceSpec
from stead.services.control import (
    Commands,
    ServiceControl,
    SupervisedProcess,
    Systemd,
    control_for,
    run_argv,
)

ENV = {"STEAD_NODE": "alpha", "STEAD_ROLE": "active", "STEAD_EPOCH": "7"}
KINDS = ["exec", "commands", "systemd"]


@dataclass
class Harness:
    """Makes a working and a broken service of one backend; each start appends to ``log``."""

    kind: str
    tmp: Path
    made: list[ServiceControl] = field(default_factory=list)

    @property
    def systemctl(self) -> Path:
        return self.tmp / "bin" / "systemctl"

    @property
    def log(self) -> Path:
        return (
            self.systemctl.parent / "state" / "log" if self.kind == "systemd" else self.tmp / "log"
        )

    def spec(self, name: str = "svc", **extra: Any) -> ServiceSpec:
        extra.setdefault("start_timeout", 5)
        extra.setdefault("stop_timeout", 5)
        if self.kind == "exec":
            script = f'echo "start {name}" >> {self.log}; exec sleep 1000'
            return ServiceSpec(name=name, exec=["sh", "-c", script], **extra)
        if self.kind == "commands":
            on = self.tmp / f"{name}.on"
            return ServiceSpec(
                name=name,
                start=["sh", "-c", f'echo "start {name}" >> {self.log}; touch {on}'],
                stop=["rm", "-f", str(on)],
                status=["test", "-e", str(on)],
                **extra,
            )
        return ServiceSpec(name=name, unit=f"{name}.service", **extra)

    def broken(self) -> tuple[ServiceSpec, list[str]]:
        """A service whose start fails, and what the error must say."""
        if self.kind == "exec":
            missing = str(self.tmp / "no-such-program")
            return ServiceSpec(name="svc", exec=[missing, "--serve"]), [missing, "No such file"]
        if self.kind == "commands":
            fail = "echo 'bind: address already in use' >&2; exit 3"
            spec = self.spec().model_copy(update={"start": ["sh", "-c", fail]})
            return spec, ["start command", "status 3", "bind: address already in use"]
        (self.systemctl.parent / "state" / "svc.service.fail-start").touch()
        return self.spec(), ["start svc.service", "status 1", "Job for svc.service failed"]

    def make(self, spec: ServiceSpec) -> ServiceControl:
        control = control_for(spec, ENV, systemctl=str(self.systemctl))
        self.made.append(control)
        return control

    async def starts(self, at_least: int) -> int:
        """How many times the service was started (a supervised process logs it a bit later)."""

        def count() -> int:
            text = self.log.read_text() if self.log.exists() else ""
            return sum(line.startswith("start") for line in text.splitlines())

        await until(lambda: count() >= at_least)
        return count()


@pytest.fixture(params=KINDS)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    write_fake_systemctl(tmp_path / "bin")
    found = Harness(str(request.param), tmp_path)
    yield found
    for control in found.made:
        await control.stop()


# ---- conformance: every backend -------------------------------------------------------------


def test_the_configuration_picks_the_backend(harness: Harness) -> None:
    expected = {"exec": SupervisedProcess, "commands": Commands, "systemd": Systemd}
    assert type(harness.make(harness.spec())) is expected[harness.kind]


async def test_start_runs_and_stop_ends_the_service(harness: Harness) -> None:
    control = harness.make(harness.spec())
    assert not await control.running()
    await control.start()
    assert await control.running()
    assert await harness.starts(1) == 1
    await control.stop()
    assert not await control.running()


async def test_start_of_a_running_service_changes_nothing(harness: Harness) -> None:
    control = harness.make(harness.spec())
    await control.start()
    await control.start()
    assert await control.running()
    assert await harness.starts(1) == 1


async def test_stop_of_a_stopped_service_succeeds(harness: Harness) -> None:
    control = harness.make(harness.spec())
    await control.stop()  # never started
    assert not await control.running()
    await control.start()
    await control.stop()
    await control.stop()
    assert not await control.running()


async def test_a_stopped_service_starts_again(harness: Harness) -> None:
    control = harness.make(harness.spec())
    for count in (1, 2):
        await control.start()
        assert await control.running()
        assert await harness.starts(count) == count  # a process logs it once it runs
        await control.stop()


def test_describe_names_the_service_and_how_it_is_controlled(harness: Harness) -> None:
    text = harness.make(harness.spec(name="web")).describe()
    assert text.startswith("web: ")
    assert {"exec": "supervised", "commands": "commands", "systemd": "web.service"}[
        harness.kind
    ] in text


async def test_a_failed_start_is_a_clear_service_error(harness: Harness) -> None:
    spec, fragments = harness.broken()
    control = harness.make(spec)
    with pytest.raises(ServiceError) as caught:
        await control.start()
    text = str(caught.value)
    assert text.startswith("Service svc: ")
    for fragment in fragments:
        assert fragment in text
    assert caught.value.service == "svc"
    assert caught.value.command
    assert not await control.running()


# ---- commands and systemd: timeouts and failing commands ------------------------------------


@pytest.fixture(params=["commands", "systemd"])
def argv_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    write_fake_systemctl(tmp_path / "bin")
    return Harness(str(request.param), tmp_path)


def _hanging(harness: Harness, command: str, **extra: Any) -> tuple[ServiceSpec, Path]:
    """A spec whose ``command`` (start, stop or status) hangs; the hanging pid goes to a file."""
    spec = harness.spec(**extra)
    if harness.kind == "systemd":
        state = harness.systemctl.parent / "state"
        real = {"status": "is-active"}.get(command, command)
        (state / f"svc.service.hang-{real}").touch()
        return spec, state / "svc.service.pid"
    pidfile = harness.tmp / "hang.pid"
    hang = ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"]
    return spec.model_copy(update={command: hang}), pidfile


async def test_a_hanging_start_times_out_and_is_killed(argv_harness: Harness) -> None:
    spec, pidfile = _hanging(argv_harness, "start", start_timeout=0.3)
    control = argv_harness.make(spec)
    began = time.monotonic()
    with pytest.raises(ServiceError, match=r"start command .* timed out after 0.3 s"):
        await control.start()
    assert time.monotonic() - began < 3
    pid = await read_pid(pidfile)
    assert not exists(pid), "the timed-out command was killed and reaped"


async def test_a_hanging_status_command_times_out(argv_harness: Harness) -> None:
    spec, _ = _hanging(argv_harness, "status")
    control = (
        Systemd(spec, ENV, systemctl=str(argv_harness.systemctl), status_timeout=0.3)
        if argv_harness.kind == "systemd"
        else Commands(spec, ENV, status_timeout=0.3)
    )
    with pytest.raises(ServiceError, match=r"status command .* timed out after 0.3 s"):
        await control.running()


async def test_a_failing_stop_names_command_status_and_stderr(argv_harness: Harness) -> None:
    spec = argv_harness.spec()
    if argv_harness.kind == "systemd":
        (argv_harness.systemctl.parent / "state" / "svc.service.fail-stop").touch()
        expected = ["stop svc.service", "status 1", "Job for svc.service failed"]
    else:
        spec = spec.model_copy(update={"stop": ["sh", "-c", "echo 'pid file busy' >&2; exit 2"]})
        expected = ["stop command", "status 2", "pid file busy"]
    control = argv_harness.make(spec)
    await control.start()
    with pytest.raises(ServiceError) as caught:
        await control.stop()
    for fragment in ["Service svc:", *expected]:
        assert fragment in str(caught.value)
    assert caught.value.returncode in (1, 2)
    assert await control.running()


async def test_commands_wait_until_status_agrees_then_give_up(tmp_path: Path) -> None:
    spec = ServiceSpec(
        name="svc", start=["true"], stop=["true"], status=["false"], start_timeout=0.3
    )
    with pytest.raises(ServiceError, match="succeeded, but the status command says not running"):
        await Commands(spec, ENV).start()


async def test_commands_get_the_agent_environment(tmp_path: Path) -> None:
    seen = tmp_path / "env"
    spec = ServiceSpec(
        name="svc",
        start=["sh", "-c", f'echo "$STEAD_SERVICE $STEAD_NODE $STEAD_ROLE $STEAD_EPOCH" > {seen}'],
        stop=["rm", "-f", str(seen)],
        status=["test", "-e", str(seen)],
    )
    await Commands(spec, ENV).start()
    assert seen.read_text().split() == ["svc", "alpha", "active", "7"]


async def test_a_start_script_that_leaves_a_daemon_does_not_hang(tmp_path: Path) -> None:
    # The daemon inherits the script's stdout and stderr; with pipes, waiting would never end.
    pidfile = tmp_path / "daemon.pid"
    spec = ServiceSpec(
        name="svc",
        start=["sh", "-c", f"sleep 1000 & echo $! > {pidfile}"],
        stop=["sh", "-c", f'kill "$(cat {pidfile})"; rm -f {pidfile}'],
        status=["test", "-e", str(pidfile)],
        start_timeout=5,
    )
    control = Commands(spec, ENV)
    pid = 0
    try:
        async with asyncio.timeout(5):
            await control.start()
        pid = int(pidfile.read_text())
        assert alive(pid)
    finally:
        await control.stop()
    await until(lambda: not alive(pid))


async def test_systemctl_is_found_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    systemctl = write_fake_systemctl(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{systemctl.parent}{os.pathsep}{os.environ['PATH']}")
    control = Systemd(ServiceSpec(name="web", unit="nginx.service"), ENV)
    await control.start()
    assert await control.running()
    assert (systemctl.parent / "state" / "nginx.service.active").exists()
    await control.stop()
    assert (systemctl.parent / "state" / "log").read_text().split("\n")[:2] == [
        "start nginx.service",
        "stop nginx.service",
    ]


async def test_run_argv_reports_a_missing_program() -> None:
    done = await run_argv(["/nonexistent/program"], 1.0)
    assert done.returncode is None
    assert not done.ok
    assert "could not run it" in done.summary()


# ---- supervised processes -------------------------------------------------------------------


def _exec(argv: list[str], **extra: Any) -> ServiceSpec:
    return ServiceSpec(name="svc", exec=argv, **extra)


@pytest.fixture
async def supervised() -> AsyncIterator[Callable[..., SupervisedProcess]]:
    made: list[SupervisedProcess] = []

    def make(spec: ServiceSpec, **kwargs: Any) -> SupervisedProcess:
        made.append(SupervisedProcess(spec, ENV, **kwargs))
        return made[-1]

    yield make
    for control in made:
        await control.stop()


class Exits:
    """Collects exit reports and lets a test await the next one."""

    def __init__(self) -> None:
        self.reports: list[tuple[int, str]] = []
        self.event = asyncio.Event()

    def __call__(self, returncode: int, sentence: str) -> None:
        self.reports.append((returncode, sentence))
        self.event.set()

    async def next(self) -> tuple[int, str]:
        async with asyncio.timeout(5):
            await self.event.wait()
        self.event.clear()
        return self.reports[-1]


async def test_a_supervised_process_has_its_own_group_and_the_environment(
    supervised: Callable[..., SupervisedProcess], tmp_path: Path
) -> None:
    seen = tmp_path / "env"
    script = f'echo "$STEAD_SERVICE $STEAD_NODE $STEAD_ROLE $STEAD_EPOCH" > {seen}.tmp; '
    control = supervised(_exec(["sh", "-c", f"{script} mv {seen}.tmp {seen}; exec sleep 1000"]))
    await control.start()
    pid = control.pid
    assert pid is not None
    assert os.getpgid(pid) == pid
    assert os.getsid(pid) == pid
    assert f"pid {pid}" in control.describe()
    await until(seen.exists)
    assert seen.read_text().split() == ["svc", "alpha", "active", "7"]


async def test_stop_ends_the_whole_group_and_reaps(
    supervised: Callable[..., SupervisedProcess], tmp_path: Path
) -> None:
    child = tmp_path / "child.pid"
    exits = Exits()
    control = supervised(_exec(["sh", "-c", f"sleep 1000 & echo $! > {child}; wait"]))
    control.set_exit_callback(exits)
    await control.start()
    leader = control.pid
    assert leader is not None
    grandchild = await read_pid(child)
    await control.stop()
    assert not exists(leader), "the leader is reaped, no zombie"
    await until(lambda: not alive(grandchild))
    assert exits.reports == [], "a stop is not reported as an exit"


async def test_stop_escalates_to_sigkill_after_stop_timeout(
    supervised: Callable[..., SupervisedProcess], tmp_path: Path
) -> None:
    ready = tmp_path / "ready"
    script = f"trap '' TERM; touch {ready}; exec sleep 1000"
    control = supervised(_exec(["sh", "-c", script], stop_timeout=0.3))
    await control.start()
    pid = control.pid
    assert pid is not None
    await until(ready.exists)
    began = time.monotonic()
    await control.stop()
    assert 0.3 <= time.monotonic() - began < 3
    assert not exists(pid)
    assert not await control.running()


async def test_an_exit_is_reported_with_status_and_last_output(
    supervised: Callable[..., SupervisedProcess], tmp_path: Path
) -> None:
    child = tmp_path / "child.pid"
    exits = Exits()
    script = f"sleep 1000 & echo $! > {child}; echo 'fatal: cannot bind :8080' >&2; exit 3"
    control = supervised(_exec(["sh", "-c", script]), on_exit=exits)
    await control.start()
    returncode, sentence = await exits.next()
    assert returncode == 3
    assert "exited with status 3" in sentence
    assert "fatal: cannot bind :8080" in sentence
    assert not await control.running()
    grandchild = await read_pid(child)
    await until(lambda: not alive(grandchild))  # what it left in its group went with it


async def test_a_killed_process_is_reported_reaped_and_restartable(
    supervised: Callable[..., SupervisedProcess],
) -> None:
    exits = Exits()
    control = supervised(_exec(["sleep", "1000"]), on_exit=exits)
    await control.start()
    pid = control.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    returncode, sentence = await exits.next()
    assert returncode == -signal.SIGKILL
    assert "killed by SIGKILL" in sentence
    await until(lambda: not exists(pid))
    await control.start()
    assert control.pid not in (None, pid)
    assert await control.running()
