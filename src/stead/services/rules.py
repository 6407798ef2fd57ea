"""What to do about a health check's results: a small state machine per check.

``decide()`` is pure: from the policy, the state and one result at time ``now`` it returns the
next state and a :class:`Step` (what happened, the action to take if any, and why). The
manager acts on the step; tests read tables of steps.

The rules, in the operator's terms: after ``failures`` consecutive failed results, take the
next action of ``actions`` (by default restart, restart, switchover) and start counting
failures again. After the last action, keep reporting each further run of failures but do
nothing more. After ``reset_after`` seconds of uninterrupted health, the actions start over.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from stead.services.config import HealthCheck, ServiceAction

Outcome = Literal["healthy", "recovered", "reset", "failing", "act", "exhausted"]
"""healthy: another good result. recovered: the first good result after failures.
reset: healthy for ``reset_after`` seconds, the actions start over. failing: a failure, not
yet enough for an action. act: take ``Step.action``. exhausted: enough failures for an action,
but none is left."""


@dataclass(frozen=True)
class Policy:
    failures: int = 3
    actions: tuple[ServiceAction, ...] = ("restart", "restart", "switchover")
    reset_after: float = 300.0

    @classmethod
    def of(cls, check: HealthCheck) -> Policy:
        return cls(check.failures, tuple(check.actions), check.reset_after)


@dataclass(frozen=True)
class RuleState:
    failures: int = 0  # consecutive failures since the last good result or the last action
    actions_used: int = 0
    last_action: ServiceAction | None = None
    healthy_since: float | None = None  # time of the first good result of the current run
    last_ok: bool | None = None


@dataclass(frozen=True)
class Step:
    outcome: Outcome
    action: ServiceAction | None
    reason: str


def decide(policy: Policy, state: RuleState, ok: bool, now: float) -> tuple[RuleState, Step]:
    """The next state and step after one result (``ok``) at time ``now`` (seconds)."""
    if ok:
        since = state.healthy_since if state.healthy_since is not None else now
        new = replace(state, failures=0, healthy_since=since, last_ok=True)
        if state.actions_used and now - since >= policy.reset_after:
            new = replace(new, actions_used=0)
            return new, Step("reset", None, f"healthy for {now - since:g} s; actions start over")
        if state.last_ok is False:
            return new, Step("recovered", None, "healthy again")
        return new, Step("healthy", None, "healthy")
    failures = state.failures + 1
    new = replace(state, failures=failures, healthy_since=None, last_ok=False)
    if failures < policy.failures:
        return new, Step("failing", None, f"failure {failures} of {policy.failures}")
    new = replace(new, failures=0)
    runs = f"{failures} consecutive failures" if failures > 1 else "a failure"
    total = len(policy.actions)
    if state.actions_used >= total:
        why = "no actions configured" if not total else f"all {total} actions used"
        return new, Step("exhausted", None, f"{runs}; {why}, nothing more to do")
    action = policy.actions[state.actions_used]
    new = replace(new, actions_used=state.actions_used + 1, last_action=action)
    return new, Step("act", action, f"{runs}; action {state.actions_used + 1} of {total}: {action}")


class Rule:
    """The state of one check's rules, updated in place (a convenience around ``decide``)."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.state = RuleState()

    def observe(self, ok: bool, now: float) -> Step:
        self.state, step = decide(self.policy, self.state, ok, now)
        return step

    def clear_failures(self) -> None:
        """Forget the current run of failures (the service was just restarted), not actions."""
        self.state = replace(self.state, failures=0)

    def reset(self) -> None:
        """Start from scratch: a new activation, or the end of maintenance."""
        self.state = RuleState()
