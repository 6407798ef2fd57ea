"""Automatic reclone: which passives to rebuild, and why, from what the active observed.

A pure function (:func:`decide`), called by the active agent every
``reclone.auto.interval`` seconds with what it saw; the agent then starts the reclones it
returns, one run at a time. Three policies, each optional:

- ``out_of_sync_after``: a connected passive that has been out of sync (a check due or
  running, or it skipped an entry) for longer than this is rebuilt;
- ``on_drift``: a passive whose system trees differ from the active's (``stead drift``,
  trees only: packages follow from the trees and the package policy) is rebuilt;
- ``on_packages``: when the active's installed packages change (a patch was applied), every
  passive is rebuilt.

Never twice in a row for nothing: a node is not retried within ``cooldown`` of its last
automatic attempt, whatever its outcome, and nothing starts while a reclone runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from stead.config.reclone import AutoSection


@dataclass(frozen=True)
class Observed:
    now: float
    passives: tuple[str, ...]  # connected passives, in reclone order
    out_of_sync_since: Mapping[str, float] = field(default_factory=dict)
    drifted: frozenset[str] = frozenset()  # passives whose trees differ
    packages_changed: bool = False
    last_attempt: Mapping[str, float] = field(default_factory=dict)
    running: bool = False


@dataclass(frozen=True)
class Trigger:
    nodes: tuple[str, ...]
    reason: str


def decide(observed: Observed, auto: AutoSection) -> list[Trigger]:
    """The reclones to start now, each with the reason that goes into the history."""
    if not auto.enabled or observed.running:
        return []

    def ready(node: str) -> bool:
        last = observed.last_attempt.get(node)
        return last is None or observed.now - last >= auto.cooldown

    triggers: list[Trigger] = []
    taken: set[str] = set()
    if auto.on_packages and observed.packages_changed:
        nodes = tuple(n for n in observed.passives if ready(n))
        if nodes:
            triggers.append(Trigger(nodes, "the active's installed packages changed"))
            taken.update(nodes)
    if auto.out_of_sync_after is not None:
        for node in observed.passives:
            since = observed.out_of_sync_since.get(node)
            if node in taken or since is None or not ready(node):
                continue
            waited = observed.now - since
            if waited >= auto.out_of_sync_after:
                triggers.append(Trigger((node,), f"out of sync for {waited:.0f} s"))
                taken.add(node)
    if auto.on_drift:
        for node in observed.passives:
            if node in observed.drifted and node not in taken and ready(node):
                triggers.append(Trigger((node,), "its system trees drifted from the active's"))
                taken.add(node)
    return triggers
