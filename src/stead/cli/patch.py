"""``stead patch``: a rolling patch of the cluster through the nodes' management identities.

The plan and the run live in ``stead.patching``; this module gathers the options, finds the
configuration and the agents (every node's on a lab host, the local one on a node), prints
each step as it ends, and turns a stop into ``PatchError`` (exit code 90).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer

from stead.cli.options import ConfigDirOption, JsonOption, SocketOption
from stead.config.load import load
from stead.config.paths import NODE_FILE, config_dir
from stead.config.schema import ClusterConfig
from stead.errors import PatchError, SteadError
from stead.patching import PatchOptions, Plan, Report, StepResult, build_plan, connect_argv
from stead.patching.agents import ClusterAgents, SubprocessRunner
from stead.patching.run import CommandResult, execute


def patch(
    command: Annotated[
        str | None,
        typer.Option("--command", help="Shell text run on each node (default: patch.command)."),
    ] = None,
    nodes: Annotated[
        list[str] | None,
        typer.Option(
            "--nodes",
            help="Only these nodes (repeat, or separate with commas); the active only if named.",
        ),
    ] = None,
    switchover: Annotated[
        bool,
        typer.Option(
            "--switchover/--no-switchover", help="Switch over to patch the active (default: yes)."
        ),
    ] = True,
    switch_back: Annotated[
        bool | None,
        typer.Option(
            "--switch-back/--no-switch-back",
            help="Hand the role back to the former active at the end (default: patch.switch_back).",
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan with each node's argv; change nothing."),
    ] = False,
    as_json: JsonOption = False,
    config: ConfigDirOption = None,
    socket: SocketOption = None,
) -> None:
    """Patch every passive, switch over, patch the former active; stop at the first failure."""
    cluster, sockets = _cluster_and_sockets(config, socket)
    runner = SubprocessRunner()

    def remote(node: str, text: str, timeout: float) -> CommandResult:
        return runner.run(connect_argv(cluster.patch.connect, cluster.node(node), text), timeout)

    agents = ClusterAgents(sockets, remote)
    selected = tuple(name.strip() for item in nodes or [] for name in item.split(",") if name)
    options = PatchOptions(
        command=command if command is not None else cluster.patch.command,
        nodes=selected,
        switchover=switchover,
        switch_back=cluster.patch.switch_back if switch_back is None else switch_back,
    )
    try:
        active = str(agents.status()["node"])
        assumed = ""
    except SteadError as exc:
        if not dry_run:
            raise
        active, assumed = cluster.cluster.active, f"no active answers ({exc}); assuming"
    plan = build_plan(cluster, active, options)
    if dry_run:
        if as_json:
            print(json.dumps(plan.to_json(), indent=2))
            return
        if assumed:
            print(f"{assumed} {active} is active (cluster.active)")
        print("\n".join(plan.render()))
        return
    report = _run(plan, agents, runner, cluster, as_json)
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        _summary(report)
    if report.stopped is not None:
        raise PatchError(report.stopped.detail, node=report.stopped.node, step=report.stopped.step)


def _cluster_and_sockets(
    directory: Path | None, socket: Path | None
) -> tuple[ClusterConfig, dict[str, Path]]:
    """A node's own configuration and socket; on a lab host, every lab node's sockets."""
    from stead.lab.state import find_lab

    lab = None
    if directory is None and not (config_dir() / NODE_FILE).is_file():
        lab = find_lab()
    if lab is None:
        loaded = load(config_dir(directory))
        return loaded.cluster, {loaded.name: socket or loaded.api_socket}
    cluster = load(lab.paths(lab.nodes[0]).etc).cluster
    return cluster, {name: lab.socket_path(name) for name in lab.nodes}


def _run(
    plan: Plan, agents: ClusterAgents, runner: SubprocessRunner, cluster: ClusterConfig, quiet: bool
) -> Report:
    if not quiet:
        print(f"rolling patch of {cluster.cluster.name}: {plan.active} is active", flush=True)
        print(f"command: {plan.command}", flush=True)
    interrupts = 0

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            raise KeyboardInterrupt
        print("stead: stopping after this step (Ctrl-C again to stop now)", file=sys.stderr)

    def on_step(result: StepResult) -> None:
        if not quiet:
            _print_step(result)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        return execute(
            plan,
            agents,
            runner,
            patch_timeout=cluster.patch.timeout,
            gate_timeout=cluster.patch.gate_timeout,
            interrupted=lambda: interrupts > 0,
            on_step=on_step,
        )
    finally:
        signal.signal(signal.SIGINT, previous)


def _print_step(result: StepResult) -> None:
    started = time.strftime("%H:%M:%S", time.localtime(result.started)) if result.started else "-"
    print(
        f"  {started}  {result.node:<12} {result.step:<12} {result.result:<7}"
        f" {result.seconds:8.2f} s  {result.detail}",
        flush=True,
    )
    if result.result == "failed" and result.output:
        for line in result.output.splitlines():
            print(f"      | {line}")


def _summary(report: Report) -> None:
    not_run = [f"{r.node} {r.step}" for r in report.results if r.result == "not run"]
    if report.stopped is not None:
        stopped = report.stopped
        print(f"stopped at {stopped.node}: {stopped.step}: {stopped.detail}")
        if not_run:
            print(f"not done: {', '.join(not_run)}")
    else:
        patched = [r.node for r in report.results if r.step == "patch" and r.result == "ok"]
        print(f"patched: {', '.join(patched)}")
    print(_serving_line(report, still=report.stopped is not None))


def _serving_line(report: Report, *, still: bool) -> str:
    if report.serving is None:
        return f"warning: {report.serving_note}"
    line = f"the cluster {'still ' if still else ''}serves with {report.serving}"
    return line + (f", but: {report.serving_note}" if report.serving_note else "")
