"""Carry a rolling patch's plan out, one step at a time, and stop at the first failure.

Two seams, both small enough to fake in a test:

- ``Agents``: the cluster's agents as the orchestrator needs them. ``status()`` is the
  current active's ``GET /v1/status``; ``wait_sync(timeout)`` blocks (at most ``timeout``)
  until every connected passive has applied the active's head as of the call;
  ``switchover(to, timeout)`` runs a switchover on the active and returns the finished job,
  or raises with the job's error. Each may raise ``SteadError`` when no agent answers.
- ``Runner``: runs an argv with a timeout and returns its exit code and output. It must not
  leave the command running when it returns or raises (a timeout kills it).

Every step is gated: before and after a node is patched, it must be connected and in sync
and the active must hold the public identity with healthy services. A gate that finds
another active than the plan expects stops at once (someone else changed the roles); the
other conditions are waited for, up to ``gate_timeout``. On failure nothing more is done:
no switchover, no later node; the report says which node and step, and who serves.

Ctrl-C: the caller's ``interrupted()`` is asked before each step, so that a first Ctrl-C
stops cleanly between steps; a ``KeyboardInterrupt`` raised inside a step (a second Ctrl-C)
stops there.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from stead.errors import SteadError
from stead.patching.plan import Plan, Step

POLL_SECONDS = 0.5
TAIL_LINES = 20
TAIL_CHARS = 4000


class Agents(Protocol):
    def status(self) -> dict[str, Any]: ...

    def wait_sync(self, timeout: float) -> dict[str, Any]: ...

    def switchover(self, to: str, timeout: float) -> dict[str, Any]: ...


@dataclass(frozen=True)
class CommandResult:
    returncode: int | None  # None: did not start, or timed out
    output: str  # stdout and stderr, interleaved
    seconds: float = 0.0
    timed_out: bool = False
    error: str = ""  # why it did not start


class Runner(Protocol):
    def run(self, argv: Sequence[str], timeout: float) -> CommandResult: ...


@dataclass
class Clock:
    monotonic: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep


Result = Literal["ok", "failed", "not run"]


@dataclass
class StepResult:
    node: str
    step: str
    result: Result
    started: float | None = None  # wall clock, seconds since the epoch
    seconds: float = 0.0
    detail: str = ""
    output: str = ""  # the command's output tail (patch steps)
    returncode: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "step": self.step,
            "result": self.result,
            "started": self.started,
            "seconds": round(self.seconds, 3),
            "detail": self.detail,
            "output": self.output,
            "returncode": self.returncode,
        }


@dataclass
class Report:
    plan: Plan
    results: list[StepResult] = field(default_factory=list)
    stopped: StepResult | None = None
    serving: str | None = None  # the active at the end, None if none answered
    serving_note: str = ""  # what is wrong with it, or why nobody answered

    @property
    def ok(self) -> bool:
        return self.stopped is None

    def to_json(self) -> dict[str, Any]:
        stopped = self.stopped
        return {
            "ok": self.ok,
            "plan": self.plan.to_json(),
            "steps": [result.to_json() for result in self.results],
            "stopped": (
                {"node": stopped.node, "step": stopped.step, "reason": stopped.detail}
                if stopped
                else None
            ),
            "serving": self.serving,
            "serving_note": self.serving_note,
        }


class StepFailed(Exception):
    def __init__(self, reason: str, *, output: str = "", returncode: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.output = output
        self.returncode = returncode


def tail(text: str, lines: int = TAIL_LINES, chars: int = TAIL_CHARS) -> str:
    kept = "\n".join(text.rstrip().splitlines()[-lines:])
    return kept[-chars:]


def _reason(exc: SteadError) -> str:
    """The error's text without the generic "Error: " of the root class."""
    return str(exc.kwargs.get("message") or exc) if type(exc) is SteadError else str(exc)


def verdict(status: dict[str, Any], node: str | None, active: str) -> tuple[str, bool]:
    """Why the cluster is not ready for the next step (``""`` when it is), and whether
    waiting cannot help (another active than ``active``)."""
    if status.get("role") != "active":
        return f"{status.get('node')} answers as {status.get('role')}, not as the active", False
    if status.get("node") != active:
        return f"{status.get('node')} is active, not {active} as planned", True
    roles = status.get("roles") or {}
    if not roles.get("public_held"):
        return f"{active} does not hold the public identity", False
    if roles.get("procedure"):
        return f"{active} is busy: {roles['procedure']}", False
    for service in roles.get("services") or []:
        name = service.get("name")
        if not service.get("running"):
            return f"service {name} is not running on {active}", False
        for check in service.get("checks") or []:
            if check.get("ok") is False:
                detail = f": {check['detail']}" if check.get("detail") else ""
                return f"service {name}: check {check.get('check')} fails{detail}", False
    if node is None:
        return "", False
    entry = next((n for n in status.get("nodes", []) if n.get("name") == node), None)
    if entry is None or entry.get("role") != "passive":
        return f"{node} is not a passive of {active}", True
    state = entry.get("state")
    if state not in ("in sync", "syncing"):
        error = f" ({entry['error']})" if entry.get("error") else ""
        return f"{node} is {state}{error}", False
    return "", False


class _Orchestrator:
    def __init__(
        self,
        agents: Agents,
        runner: Runner,
        *,
        patch_timeout: float,
        gate_timeout: float,
        clock: Clock,
    ) -> None:
        self.agents = agents
        self.runner = runner
        self.patch_timeout = patch_timeout
        self.gate_timeout = gate_timeout
        self.clock = clock

    def gate(self, node: str | None, active: str, *, settling: bool = False) -> str:
        """Wait until ``verdict`` is satisfied and, with a node, a wait-sync passes."""
        deadline = self.clock.monotonic() + self.gate_timeout
        reason = "not asked yet"
        for _ in range(int(self.gate_timeout / POLL_SECONDS) + 2):
            try:
                reason, fatal = verdict(self.agents.status(), node, active)
                if reason == "" and node is not None:
                    remaining = max(0.1, deadline - self.clock.monotonic())
                    result = self.agents.wait_sync(remaining)
                    # The node may have dropped out during the wait: it must still be there.
                    reason, fatal = verdict(self.agents.status(), node, active)
                    if not reason:
                        head = result.get("head")
                        applied = (result.get("nodes") or {}).get(node)
                        return f"{node} in sync" + (
                            f" (applied {applied} of {head})" if applied is not None else ""
                        )
                elif reason == "":
                    return f"{active} serves, services healthy"
            except SteadError as exc:
                reason, fatal = _reason(exc), False
            if fatal and not settling:
                raise StepFailed(reason)
            if self.clock.monotonic() >= deadline:
                break
            self.clock.sleep(POLL_SECONDS)
        raise StepFailed(f"{reason} (waited {self.gate_timeout:g} s)")

    def patch(self, step: Step) -> tuple[str, CommandResult]:
        result = self.runner.run(step.argv, self.patch_timeout)
        output = tail(result.output)
        if result.error:
            raise StepFailed(f"the command did not start: {result.error}", output=output)
        if result.timed_out:
            raise StepFailed(
                f"the command ran longer than {self.patch_timeout:g} s and was killed",
                output=output,
            )
        if result.returncode != 0:
            raise StepFailed(
                f"the command exited with {result.returncode}",
                output=output,
                returncode=result.returncode,
            )
        return "the command exited with 0", result

    def switchover(self, step: Step) -> str:
        self.gate(step.node, step.active)
        job = self.agents.switchover(step.node, self.gate_timeout)
        steps = (job.get("result") or {}).get("steps") or []
        done = ", ".join(f"{s['step']} {s.get('seconds', 0):.2f} s" for s in steps)
        self.gate(None, step.node, settling=True)
        return f"{step.active} -> {step.node}" + (f": {done}" if done else "")

    def run_step(self, step: Step) -> StepResult:
        result = StepResult(step.node, step.name, "ok", started=self.clock.wall())
        started = self.clock.monotonic()
        try:
            if step.name == "patch":
                result.detail, command = self.patch(step)
                result.output, result.returncode = tail(command.output), command.returncode
            elif step.name in ("switchover", "switch back"):
                result.detail = self.switchover(step)
            else:
                result.detail = self.gate(step.node, step.active)
        except StepFailed as exc:
            result.result, result.detail = "failed", exc.reason
            result.output, result.returncode = exc.output, exc.returncode
        except SteadError as exc:
            result.result, result.detail = "failed", _reason(exc)
        except KeyboardInterrupt:
            result.result, result.detail = "failed", "interrupted by the operator during this step"
        result.seconds = self.clock.monotonic() - started
        return result

    def serving(self) -> tuple[str | None, str]:
        try:
            status = self.agents.status()
        except SteadError as exc:
            return None, f"no active answers: {exc}"
        except KeyboardInterrupt:
            return None, "not asked (interrupted)"
        if status.get("role") != "active":
            return None, f"{status.get('node')} answers as {status.get('role')}"
        active = str(status.get("node"))
        reason, _ = verdict(status, None, active)
        return active, reason


def execute(
    plan: Plan,
    agents: Agents,
    runner: Runner,
    *,
    patch_timeout: float,
    gate_timeout: float,
    clock: Clock | None = None,
    interrupted: Callable[[], bool] = lambda: False,
    on_step: Callable[[StepResult], None] = lambda result: None,
) -> Report:
    """Run the plan's steps in order; stop at the first that fails or at an interruption."""
    work = _Orchestrator(
        agents,
        runner,
        patch_timeout=patch_timeout,
        gate_timeout=gate_timeout,
        clock=clock or Clock(),
    )
    report = Report(plan)
    steps = list(plan.steps)
    for index, step in enumerate(steps):
        if interrupted():
            result = StepResult(
                step.node, step.name, "not run", detail="interrupted by the operator (Ctrl-C)"
            )
        else:
            result = work.run_step(step)
        report.results.append(result)
        on_step(result)
        if result.result != "ok":
            report.stopped = result
            for later in steps[index + 1 :]:
                report.results.append(StepResult(later.node, later.name, "not run"))
            break
    report.serving, report.serving_note = work.serving()
    return report
