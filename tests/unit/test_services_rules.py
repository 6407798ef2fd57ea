"""The rules of a health check, as tables of (result, time) -> (outcome, action)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from stead.services.config import HealthCheck
from stead.services.rules import Policy, Rule, RuleState, decide

F, OK = False, True


def run(policy: Policy, results: list[tuple[bool, float]]) -> list[tuple[str, str | None]]:
    rule = Rule(policy)
    steps = [rule.observe(ok, now) for ok, now in results]
    return [(step.outcome, step.action) for step in steps]


def test_default_sequence_restart_restart_switchover_then_nothing() -> None:
    policy = Policy.of(HealthCheck(kind="tcp", port=1))
    assert policy == Policy(3, ("restart", "restart", "switchover"), 300.0)
    results = [(F, float(t)) for t in range(12)]
    assert run(policy, results) == [
        ("failing", None),
        ("failing", None),
        ("act", "restart"),
        ("failing", None),
        ("failing", None),
        ("act", "restart"),
        ("failing", None),
        ("failing", None),
        ("act", "switchover"),
        ("failing", None),
        ("failing", None),
        ("exhausted", None),
    ]


def test_a_good_result_breaks_the_run_of_failures() -> None:
    policy = Policy(failures=2)
    assert run(policy, [(F, 0), (OK, 1), (F, 2), (OK, 3), (F, 4), (F, 5)]) == [
        ("failing", None),
        ("recovered", None),
        ("failing", None),
        ("recovered", None),
        ("failing", None),
        ("act", "restart"),
    ]


def test_actions_start_over_after_reset_after_seconds_of_health() -> None:
    policy = Policy(failures=1, reset_after=10)
    rule = Rule(policy)
    table = [
        (F, 0, "act", "restart"),
        (OK, 1, "recovered", None),
        (OK, 5, "healthy", None),
        (F, 6, "act", "restart"),  # health broken before 10 s: the second action
        (OK, 7, "recovered", None),
        (OK, 16, "healthy", None),  # 9 s of health: not yet
        (OK, 17, "reset", None),  # 10 s since the first good result of this run
        (OK, 18, "healthy", None),
        (F, 19, "act", "restart"),  # from the first action again
    ]
    for ok, now, outcome, action in table:
        step = rule.observe(ok, now)
        assert (step.outcome, step.action) == (outcome, action), (ok, now)
    assert rule.state.actions_used == 1
    assert rule.state.last_action == "restart"


def test_no_reset_is_reported_when_nothing_was_used() -> None:
    assert run(Policy(reset_after=1), [(OK, 0), (OK, 5)]) == [
        ("healthy", None),
        ("healthy", None),
    ]


def test_alert_only_reports_and_takes_its_place_in_the_sequence() -> None:
    policy = Policy(failures=1, actions=("alert", "switchover"))
    assert run(policy, [(F, 0), (F, 1), (F, 2)]) == [
        ("act", "alert"),
        ("act", "switchover"),
        ("exhausted", None),
    ]


def test_no_actions_reports_only() -> None:
    rule = Rule(Policy(failures=2, actions=()))
    steps = [rule.observe(False, t) for t in range(4)]
    assert [s.outcome for s in steps] == ["failing", "exhausted", "failing", "exhausted"]
    assert steps[1].reason == "2 consecutive failures; no actions configured, nothing more to do"


def test_reasons_are_sentences() -> None:
    rule = Rule(Policy(failures=3))
    steps = [rule.observe(False, t) for t in range(3)]
    assert steps[0].reason == "failure 1 of 3"
    assert steps[2].reason == "3 consecutive failures; action 1 of 3: restart"


def test_clear_failures_keeps_actions_and_reset_forgets_all() -> None:
    rule = Rule(Policy(failures=2))
    rule.observe(False, 0)
    rule.observe(False, 1)
    rule.observe(False, 2)
    assert (rule.state.failures, rule.state.actions_used) == (1, 1)
    rule.clear_failures()
    assert (rule.state.failures, rule.state.actions_used) == (0, 1)
    rule.reset()
    assert rule.state == RuleState()


@given(
    failures=st.integers(1, 4),
    actions=st.lists(st.sampled_from(["restart", "switchover", "alert"]), max_size=3),
    results=st.lists(st.booleans(), max_size=60),
)
def test_actions_never_exceed_the_list_without_a_reset(
    failures: int, actions: list[str], results: list[bool]
) -> None:
    policy = Policy(failures, tuple(actions), reset_after=3)  # type: ignore[arg-type]
    state = RuleState()
    taken: list[str] = []
    run_of_failures = 0
    for now, ok in enumerate(results):
        state, step = decide(policy, state, ok, float(now))
        run_of_failures = 0 if ok else run_of_failures + 1
        if step.outcome == "reset":
            taken = []
        if step.action is not None:
            assert run_of_failures % failures == 0, "an action needs a full run of failures"
            taken.append(step.action)
            assert taken == actions[: len(taken)], "actions are taken in configured order"
        assert step.action is None or not ok
