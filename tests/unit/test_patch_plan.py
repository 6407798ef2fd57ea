"""``stead patch``: the plan (order, argv, refusals) and its run against fake agents.

The agents and the command runner are fakes with the seams' contracts; time is a fake clock
that jumps when the orchestrator waits. The real runner is tested on real processes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import pytest

from stead.config.schema import ClusterConfig
from stead.errors import PatchError, SteadError, UsageError
from stead.patching import PatchOptions, build_plan, connect_argv, execute
from stead.patching.agents import RemoteAgent, SubprocessRunner
from stead.patching.run import Clock, CommandResult, verdict

NAMES = ("alpha", "beta", "gamma")


def cluster(connect: list[str] | None = None, management: bool = True) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {
            "cluster": {"name": "prod", "id": "0123456789", "active": "alpha"},
            "protected": [{"path": "/srv"}],
            "patch": {"connect": connect or ["run-on", "{node}"], "timeout": 60},
            "nodes": [
                {
                    "name": name,
                    "addresses": [f"198.18.0.{i + 1}"],
                    "priority": 100 + 10 * i,
                    **(
                        {"management": {"hostname": f"{name}-m", "fqdn": f"{name}-m.example.com"}}
                        if management
                        else {}
                    ),
                }
                for i, name in enumerate(NAMES)
            ],
        }
    )


def steps(plan: Any) -> list[tuple[str, str]]:
    return [(step.node, step.name) for step in plan.steps]


# ---- the plan ----------------------------------------------------------------------------


def test_passives_least_preferred_first_then_switchover_to_the_best_then_the_active() -> None:
    plan = build_plan(cluster(), "alpha", PatchOptions("apt-get -y upgrade"))
    assert steps(plan) == [
        ("gamma", "pre-check"),
        ("gamma", "patch"),
        ("gamma", "resync"),
        ("beta", "pre-check"),
        ("beta", "patch"),
        ("beta", "resync"),
        ("beta", "switchover"),
        ("alpha", "pre-check"),
        ("alpha", "patch"),
        ("alpha", "resync"),
    ]
    # The active is patched only after the switchover, under the new active's gates.
    assert [s.active for s in plan.steps if s.node == "alpha"] == ["beta"] * 3
    assert plan.serves_at_end == "beta"
    text = "\n".join(plan.render())
    assert "run on gamma: run-on gamma 'apt-get -y upgrade'" in text
    assert "beta serves at the end" in text


def test_switch_back_ends_with_the_former_active() -> None:
    plan = build_plan(cluster(), "beta", PatchOptions("true", switch_back=True))
    assert steps(plan)[:3] == [("gamma", "pre-check"), ("gamma", "patch"), ("gamma", "resync")]
    assert steps(plan)[-5:] == [
        ("alpha", "switchover"),
        ("beta", "pre-check"),
        ("beta", "patch"),
        ("beta", "resync"),
        ("beta", "switch back"),
    ]
    assert plan.steps[-1].active == "alpha"
    assert plan.serves_at_end == "beta"


def test_connect_template_gets_the_management_names_and_the_command_as_one_argument() -> None:
    config = cluster(["ssh", "-l", "root", "{host}", "--", "x{node}y"])
    argv = connect_argv(config.patch.connect, config.node("beta"), "apt-get -y upgrade && reboot")
    assert argv == (
        "ssh",
        "-l",
        "root",
        "beta-m.example.com",
        "--",
        "xbetay",
        "apt-get -y upgrade && reboot",
    )
    bare = cluster(["ssh", "{host}"], management=False)
    assert connect_argv(bare.patch.connect, bare.node("gamma"), "true") == (
        "ssh",
        "198.18.0.3",
        "true",
    )
    fqdn = cluster(["ssh", "{fqdn}"], management=False)
    with pytest.raises(UsageError, match="gamma has no management fqdn"):
        build_plan(fqdn, "alpha", PatchOptions("true"))


def test_selected_passives_only_need_no_switchover() -> None:
    plan = build_plan(cluster(), "alpha", PatchOptions("true", nodes=("beta",)))
    assert steps(plan) == [("beta", "pre-check"), ("beta", "patch"), ("beta", "resync")]
    assert plan.untouched == ("alpha", "gamma")
    assert plan.serves_at_end == "alpha"


def test_the_active_alone_switches_over_to_the_best_passive() -> None:
    plan = build_plan(cluster(), "alpha", PatchOptions("true", nodes=("alpha",)))
    assert steps(plan) == [
        ("beta", "switchover"),
        ("alpha", "pre-check"),
        ("alpha", "patch"),
        ("alpha", "resync"),
    ]


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (PatchOptions("  "), "no patch command"),
        (PatchOptions("true", nodes=("delta",)), "not a node of this cluster: delta"),
        (PatchOptions("true", switchover=False), "--no-switchover forbids patching it"),
    ],
)
def test_plans_that_cannot_be_right_are_refused(options: PatchOptions, reason: str) -> None:
    with pytest.raises(UsageError, match=reason):
        build_plan(cluster(), "alpha", options)


def test_no_switchover_is_fine_when_the_active_is_left_out() -> None:
    options = PatchOptions("true", nodes=("beta", "gamma"), switchover=False)
    plan = build_plan(cluster(), "alpha", options)
    assert {node for node, _ in steps(plan)} == {"beta", "gamma"}


# ---- fakes -------------------------------------------------------------------------------


class FakeClock(Clock):
    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(monotonic=lambda: self.now, wall=lambda: 1e9 + self.now, sleep=self.jump)

    def jump(self, seconds: float) -> None:
        self.now += seconds


class FakeAgents:
    """The active's view: node states, one service, switchovers that move the role."""

    def __init__(self, active: str = "alpha") -> None:
        self.active = active
        self.states = {name: "in sync" for name in NAMES if name != active}
        self.away: dict[str, int] = {}  # node -> status calls for which it is disconnected
        self.service_ok = True
        self.switchovers: list[str] = []
        self.switchover_error = ""
        self.status_calls = 0

    def status(self) -> dict[str, Any]:
        self.status_calls += 1
        for name, left in list(self.away.items()):
            self.states[name] = "disconnected" if left > 0 else "in sync"
            self.away[name] = left - 1
        return {
            "node": self.active,
            "role": "active",
            "roles": {
                "public_held": True,
                "procedure": "",
                "services": [
                    {
                        "name": "web",
                        "running": True,
                        "checks": [{"check": "http", "ok": self.service_ok, "detail": "503"}],
                    }
                ],
            },
            "nodes": [{"name": self.active, "role": "active", "state": "active"}]
            + [{"name": n, "role": "passive", "state": s} for n, s in self.states.items()],
        }

    def wait_sync(self, timeout: float) -> dict[str, Any]:
        return {"head": 7, "nodes": {n: 7 for n, s in self.states.items() if s == "in sync"}}

    def switchover(self, to: str, timeout: float) -> dict[str, Any]:
        self.switchovers.append(to)
        if self.switchover_error:
            raise SteadError(self.switchover_error)
        old, self.active = self.active, to
        del self.states[to]
        self.states[old] = "in sync"
        return {"state": "done", "result": {"steps": [{"step": "hand over", "seconds": 0.25}]}}


class FakeRunner:
    """``run-on NODE COMMAND``: exit codes by node; a patched node drops out for a while."""

    def __init__(self, agents: FakeAgents, codes: dict[str, int] | None = None) -> None:
        self.agents = agents
        self.codes = codes or {}
        self.ran: list[str] = []
        self.away_after_patch = 2
        self.timed_out: set[str] = set()

    def run(self, argv: Sequence[str], timeout: float) -> CommandResult:
        node = argv[1]
        assert node != self.agents.active, "the active was patched while serving"
        self.ran.append(node)
        if node in self.timed_out:
            return CommandResult(None, "still going", timed_out=True)
        code = self.codes.get(node, 0)
        if code == 0:
            self.agents.away[node] = self.away_after_patch  # e.g. the agent restarted
        output = "".join(f"line {i}\n" for i in range(100)) + f"E: failed on {node}\n"
        return CommandResult(code, output, seconds=1.0)


def run(
    agents: FakeAgents, runner: FakeRunner, options: PatchOptions | None = None, **kwargs: Any
) -> Any:
    plan = build_plan(cluster(), agents.active, options or PatchOptions("upgrade"))
    return execute(
        plan, agents, runner, patch_timeout=60, gate_timeout=5, clock=FakeClock(), **kwargs
    )


# ---- the run -----------------------------------------------------------------------------


def test_a_full_run_patches_every_node_and_ends_on_the_new_active() -> None:
    agents = FakeAgents()
    runner = FakeRunner(agents)
    report = run(agents, runner)
    assert report.ok, report.stopped
    assert runner.ran == ["gamma", "beta", "alpha"]
    assert agents.switchovers == ["beta"]
    assert [r.result for r in report.results] == ["ok"] * 10
    assert report.serving == "beta" and report.serving_note == ""
    data = report.to_json()
    assert data["stopped"] is None and data["steps"][1]["returncode"] == 0
    assert data["steps"][6]["detail"] == "alpha -> beta: hand over 0.25 s"
    json.dumps(data)  # the --json report is plain data


def test_a_failing_passive_stops_the_run_where_it_failed() -> None:
    agents = FakeAgents()
    runner = FakeRunner(agents, codes={"gamma": 100})
    seen: list[str] = []
    report = run(agents, runner, on_step=lambda r: seen.append(f"{r.node} {r.step} {r.result}"))
    assert runner.ran == ["gamma"], "nodes after the failure must not be touched"
    assert agents.switchovers == []
    assert seen == ["gamma pre-check ok", "gamma patch failed"]
    stopped = report.stopped
    assert (stopped.node, stopped.step, stopped.returncode) == ("gamma", "patch", 100)
    assert stopped.detail == "the command exited with 100"
    assert stopped.output.splitlines()[-1] == "E: failed on gamma"
    assert len(stopped.output.splitlines()) == 20  # the tail, not everything
    assert [r.result for r in report.results[2:]] == ["not run"] * 8
    assert report.serving == "alpha"
    assert report.to_json()["stopped"] == {
        "node": "gamma",
        "step": "patch",
        "reason": "the command exited with 100",
    }
    error = PatchError(stopped.detail, node=stopped.node, step=stopped.step)
    assert str(error) == "Patch stopped at gamma: patch: the command exited with 100"
    assert error.exit_code == 90


def test_a_node_that_does_not_come_back_stops_at_its_resync() -> None:
    agents = FakeAgents()
    runner = FakeRunner(agents)
    runner.away_after_patch = 10**6
    report = run(agents, runner)
    assert (report.stopped.node, report.stopped.step) == ("gamma", "resync")
    assert report.stopped.detail == "gamma is disconnected (waited 5 s)"
    assert runner.ran == ["gamma"]


def test_a_timed_out_command_and_a_failed_switchover_stop_the_run() -> None:
    agents = FakeAgents()
    runner = FakeRunner(agents)
    runner.timed_out.add("beta")
    report = run(agents, runner)
    assert (report.stopped.node, report.stopped.step) == ("beta", "patch")
    assert "longer than 60 s" in report.stopped.detail

    agents = FakeAgents()
    agents.switchover_error = "hand over: beta did not answer"
    report = run(agents, FakeRunner(agents))
    assert (report.stopped.node, report.stopped.step) == ("beta", "switchover")
    assert report.stopped.detail == "hand over: beta did not answer"
    assert report.serving == "alpha"


def test_an_unhealthy_active_stops_before_anything_is_patched() -> None:
    agents = FakeAgents()
    agents.service_ok = False
    runner = FakeRunner(agents)
    report = run(agents, runner)
    assert (report.stopped.node, report.stopped.step) == ("gamma", "pre-check")
    assert report.stopped.detail == "service web: check http fails: 503 (waited 5 s)"
    assert runner.ran == []
    assert report.serving_note == "service web: check http fails: 503"


def test_another_active_than_planned_stops_at_once() -> None:
    agents = FakeAgents()
    runner = FakeRunner(agents)
    plan = build_plan(cluster(), "alpha", PatchOptions("upgrade"))
    agents.active = "beta"  # a failover happened since the plan was made
    agents.states = {"alpha": "disconnected", "gamma": "in sync"}
    clock = FakeClock()
    report = execute(plan, agents, runner, patch_timeout=60, gate_timeout=600, clock=clock)
    assert report.stopped.detail == "beta is active, not alpha as planned"
    assert clock.now == 0, "waiting cannot help: no wait"
    assert runner.ran == []


def test_an_interrupt_stops_between_steps() -> None:
    agents = FakeAgents()
    runner = FakeRunner(agents)
    seen: list[str] = []
    report = run(
        agents,
        runner,
        interrupted=lambda: "gamma patch" in seen,
        on_step=lambda r: seen.append(f"{r.node} {r.step}"),
    )
    assert runner.ran == ["gamma"]
    assert (report.stopped.node, report.stopped.step, report.stopped.result) == (
        "gamma",
        "resync",
        "not run",
    )
    assert "interrupted" in report.stopped.detail


def test_verdict_names_what_is_missing() -> None:
    status = FakeAgents().status()
    assert verdict(status, "beta", "alpha") == ("", False)
    assert verdict(status, "delta", "alpha") == ("delta is not a passive of alpha", True)
    status["roles"]["public_held"] = False
    assert verdict(status, "beta", "alpha") == ("alpha does not hold the public identity", False)
    passive = {"node": "beta", "role": "passive"}
    assert verdict(passive, None, "alpha") == ("beta answers as passive, not as the active", False)


# ---- the real seams ----------------------------------------------------------------------


def test_the_subprocess_runner_keeps_output_and_exit_code_and_kills_on_timeout() -> None:
    runner = SubprocessRunner()
    done = runner.run(["sh", "-c", "echo out; echo err >&2; exit 3"], 30)
    assert (done.returncode, done.output, done.timed_out) == (3, "out\nerr\n", False)
    slow = runner.run(
        [sys.executable, "-c", "print('started', flush=True); import time; time.sleep(60)"], 0.5
    )
    assert slow.timed_out and slow.returncode is None and slow.output == "started\n"
    assert slow.seconds < 10
    missing = runner.run(["/nonexistent/stead-patch-test"], 5)
    assert missing.returncode is None and "No such file" in missing.error


def test_a_remote_agent_is_the_stead_cli_through_patch_connect() -> None:
    calls: list[str] = []
    status = {"node": "beta", "role": "active", "nodes": []}
    job = {"state": "done", "result": {"steps": []}}

    def remote(node: str, text: str, timeout: float) -> CommandResult:
        calls.append(f"{node}: {text}")
        if text.startswith("stead status"):
            return CommandResult(0, json.dumps(status))
        if text.startswith("stead switchover"):
            return CommandResult(0, "switchover to alpha\n" + json.dumps(job))
        return CommandResult(1, "stead: Timed out: gamma is disconnected")

    agent = RemoteAgent("beta", remote)
    assert agent.status() == status
    assert agent.switchover("alpha", 600) == job
    with pytest.raises(SteadError, match="gamma is disconnected"):
        agent.wait_sync(5)
    assert calls == [
        "beta: stead status --json",
        "beta: stead switchover --to alpha --json --timeout 600",
        "beta: stead wait-sync --timeout 5",
    ]
