"""The plan of a rolling patch: which node is patched when, and by which exact argv.

Pure: no agent is asked and nothing runs here, so that ``--dry-run`` prints exactly what a
run would do and the order can be tested on its own.

The order, and why:

1. The passives, least preferred first (highest ``priority`` number, then name): the first
   node patched is the canary, and a patch that breaks it breaks the standby the cluster
   needs least. Each passive gets ``pre-check`` (it is connected and in sync, the active
   holds the public identity and its services are healthy), ``patch`` (the command through
   ``patch.connect``) and ``resync`` (connected and in sync again, services still healthy).
2. ``switchover`` to the most preferred patched passive (if no passive is selected, to the
   most preferred passive): the active is never patched while it serves.
3. The former active as a passive: ``pre-check``, ``patch``, ``resync``.
4. With ``switch_back``, ``switch back`` to it.

With ``--nodes`` that leave out the active, there is no switchover; ``--no-switchover`` with
the active selected is refused.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from typing import Any, Literal

from stead.config.schema import ClusterConfig, NodeSection
from stead.errors import UsageError

StepName = Literal["pre-check", "patch", "resync", "switchover", "switch back"]


@dataclass(frozen=True)
class PatchOptions:
    """What the operator asked for."""

    command: str
    nodes: tuple[str, ...] = ()  # empty: every node
    switchover: bool = True
    switch_back: bool = False


@dataclass(frozen=True)
class Step:
    """One step: ``node`` is the node patched or checked, or the one taking over.

    ``active`` is the node that must be active while the step runs (for a role change: the
    one that hands over); a gate that finds another active stops the run.
    """

    node: str
    name: StepName
    active: str
    argv: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.name == "patch":
            return f"run on {self.node}: {shlex.join(self.argv)}"
        if self.name == "pre-check":
            return (
                f"{self.node} connected and in sync; {self.active} active, holding the "
                "public identity, services healthy"
            )
        if self.name == "resync":
            return f"wait until {self.node} is connected and in sync again, services healthy"
        return f"{self.active} hands the active role to {self.node}; wait until it serves"

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "step": self.name, "active": self.active, "argv": self.argv}


@dataclass(frozen=True)
class Plan:
    active: str
    command: str
    steps: tuple[Step, ...]
    untouched: tuple[str, ...] = field(default=())  # nodes left out by --nodes

    @property
    def serves_at_end(self) -> str:
        """The node that is active once every step has run."""
        changes = [s.node for s in self.steps if s.name in ("switchover", "switch back")]
        return changes[-1] if changes else self.active

    def render(self) -> list[str]:
        lines = [f"rolling patch: {self.active} is active; command: {self.command}"]
        for number, step in enumerate(self.steps, 1):
            lines.append(f"{number:3}. {step.node:<12} {step.name:<12} {step.describe()}")
        if self.untouched:
            lines.append(f"not patched (not selected): {', '.join(self.untouched)}")
        lines.append(f"{self.serves_at_end} serves at the end")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "command": self.command,
            "steps": [step.to_json() for step in self.steps],
            "untouched": list(self.untouched),
            "serves_at_end": self.serves_at_end,
        }


def host_of(node: NodeSection) -> str:
    """The name to reach a node by: management FQDN, else host name, else address, else
    (no management identity) its first channel address."""
    management = node.management
    if management is not None:
        if management.fqdn:
            return management.fqdn
        if management.hostname:
            return management.hostname
        if management.address:
            return management.address.split("/")[0]
    return _channel_host(node.addresses[0])


def _channel_host(address: str) -> str:
    if address.startswith("["):  # [v6]:port
        return address[1:].split("]")[0]
    if address.count(":") == 1:  # v4:port
        return address.split(":")[0]
    return address


def connect_argv(template: list[str], node: NodeSection, command: str) -> tuple[str, ...]:
    """``patch.connect`` with the node's names filled in, and the command as one argument
    (shell text, as ssh takes it). A placeholder the node has no value for is refused."""
    management = node.management
    values = {
        "{host}": host_of(node),
        "{node}": node.name,
        "{fqdn}": management.fqdn if management else "",
        "{hostname}": management.hostname if management else "",
        "{address}": (
            management.address.split("/")[0]
            if management and management.address
            else _channel_host(node.addresses[0])
        ),
    }
    argv = []
    for item in template:
        for placeholder, value in values.items():
            if placeholder in item:
                if not value:
                    raise UsageError(
                        f"patch.connect uses {placeholder}, but node {node.name} has no "
                        f"management {placeholder.strip('{}')}"
                    )
                item = item.replace(placeholder, value)
        argv.append(item)
    return (*argv, command)


def build_plan(
    cluster: ClusterConfig, active: str, options: PatchOptions, connect: list[str] | None = None
) -> Plan:
    """The ordered steps, or a UsageError that says why no run could be right."""
    command = options.command.strip()
    if not command:
        raise UsageError("no patch command: give --command or set patch.command")
    names = [node.name for node in cluster.nodes]
    if active not in names:
        raise UsageError(f"the active {active!r} is not a node of cluster {cluster.cluster.name}")
    unknown = [name for name in options.nodes if name not in names]
    if unknown:
        raise UsageError(f"not a node of this cluster: {', '.join(unknown)}")
    selected = set(options.nodes) or set(names)
    template = connect if connect is not None else cluster.patch.connect
    nodes = {node.name: node for node in cluster.nodes}

    def rank(node: NodeSection) -> tuple[int, str]:
        return (node.priority, node.name)

    passives = sorted(
        (n for n in cluster.nodes if n.name != active and n.name in selected), key=rank
    )
    steps: list[Step] = []
    for node in reversed(passives):  # least preferred first; the best successor last
        steps += _patch_steps(node, active, connect_argv(template, node, command))
    if active in selected:
        if not options.switchover:
            raise UsageError(
                f"{active} is active and selected, but --no-switchover forbids patching it: "
                "leave it out with --nodes, or allow the switchover"
            )
        candidates = passives or sorted((n for n in cluster.nodes if n.name != active), key=rank)
        if not candidates:
            raise UsageError(f"{active} is the only node: nothing can serve while it is patched")
        target = candidates[0].name
        steps.append(Step(target, "switchover", active))
        steps += _patch_steps(nodes[active], target, connect_argv(template, nodes[active], command))
        if options.switch_back:
            steps.append(Step(active, "switch back", target))
    untouched = tuple(name for name in names if name not in selected)
    return Plan(active=active, command=command, steps=tuple(steps), untouched=untouched)


def _patch_steps(node: NodeSection, active: str, argv: tuple[str, ...]) -> list[Step]:
    return [
        Step(node.name, "pre-check", active),
        Step(node.name, "patch", active, argv),
        Step(node.name, "resync", active),
    ]
