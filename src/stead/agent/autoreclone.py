"""Automatic reclone, the agent's part: observe, ask :func:`stead.reclone.policy.decide`, act.

A mixin of :class:`stead.agent.daemon.Agent`. Every ``reclone.auto.interval`` seconds the
active notes which passives are out of sync and since when, lists its installed packages
(a change of their digest means a patch was applied), runs a drift check of the system
trees when that policy is on, and starts the reclones the policy returns, each with its
reason as the trigger in the history.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import blake3

from stead.agent.base import AgentBase
from stead.config.reclone import AutoSection
from stead.errors import SteadError
from stead.reclone.policy import Observed, decide
from stead.system.packages import list_packages

log = logging.getLogger(__name__)

PACKAGES_KEY = "auto_reclone.packages"


class AutoReclones(AgentBase):
    def init_auto_reclone(self) -> None:
        self._auto_attempts: dict[str, float] = {}
        self._out_of_sync_since: dict[str, float] = {}

    async def auto_reclone_loop(self) -> None:
        auto = self.cluster.reclone.auto
        if not auto.enabled:
            return
        while True:
            await asyncio.sleep(auto.interval)  # a policy looked at on a period: no event
            if self.role != "active":
                self._out_of_sync_since.clear()
                continue
            try:
                await self._auto_once(auto)
            except (SteadError, OSError) as exc:
                log.error("automatic reclone: %s", exc)
                self.store.event("reclone", f"automatic reclone: {exc}", level="error")

    async def _auto_once(self, auto: AutoSection) -> None:
        now = time.monotonic()
        for name, sender in self.senders.items():
            state = sender.state
            if state.connected and (state.needs_check or state.checking):
                self._out_of_sync_since.setdefault(name, now)
            else:
                self._out_of_sync_since.pop(name, None)
        connected = [n for n, s in self.senders.items() if s.state.connected]
        packages = await self._packages_digest() if auto.on_packages else None
        before = self.store.get(PACKAGES_KEY)
        if packages is not None and before is None:
            self.store.set(PACKAGES_KEY, packages)  # the first look: the reference
        drifted: frozenset[str] = frozenset()
        if auto.on_drift and connected:
            result = await self.drift(node=None, trees=True, packages=False)
            drifted = frozenset(
                name for name, node in result["nodes"].items() if node["state"] == "drifted"
            )
        peers = sorted(self.cluster.peers(self.me), key=lambda n: (-n.priority, n.name))
        observed = Observed(
            now=now,
            passives=tuple(n.name for n in peers if n.name in connected),
            out_of_sync_since=dict(self._out_of_sync_since),
            drifted=drifted,
            packages_changed=packages is not None and before is not None and packages != before,
            last_attempt=dict(self._auto_attempts),
            running=any(job.kind == "reclone" for job in self.jobs.running()),
        )
        for trigger in decide(observed, auto):
            for node in trigger.nodes:
                self._auto_attempts[node] = now
            if "packages" in trigger.reason and packages is not None:
                self.store.set(PACKAGES_KEY, packages)  # dealt with, whatever the outcome
            self.store.event(
                "reclone", f"automatic reclone of {', '.join(trigger.nodes)}: {trigger.reason}"
            )
            job = self.start_reclone(
                list(trigger.nodes),
                delete_original=auto.delete_original,
                trigger=f"auto: {trigger.reason}",
            )
            if job.task is not None:
                await job.task

    async def _packages_digest(self) -> str:
        _manager, packages = await asyncio.to_thread(list_packages, self.cluster.system.packages)
        text = json.dumps(sorted(packages.items())).encode()
        return blake3.blake3(text).hexdigest()
