"""Operator requests the active answers: wait for sync, and system checks.

A mixin of :class:`stead.agent.daemon.Agent`, kept apart so that the daemon module holds
the lifecycle and the role changes only.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from stead.agent.base import AgentBase
from stead.agent.jobs import Job
from stead.errors import SteadError, TimeoutExpired, UsageError
from stead.replication import check
from stead.system import hashcache
from stead.system.drift import run_drift
from stead.system.manifest import Scope
from stead.system.snapshot import SNAPSHOT_REQUEST, Ask, Snapshot, take_snapshot

CHECK_APPLY_TIMEOUT = 3600.0  # seconds a passive may take to apply a check's repairs


class OperatorRequests(AgentBase):
    async def wait_sync(self, timeout: float, *, require_all: bool = False) -> dict[str, Any]:
        """Wait until every connected passive has applied the head as of now, with no check
        due; with ``require_all``, every passive must be connected too."""
        if self.role != "active" or self.journal is None or self.capture is None:
            raise UsageError(f"{self.me} is passive; ask the active node")
        deadline = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self.capture.drain()
                await self.flush_emitted()
                async with self._emit_lock:
                    head = self.journal.head
        except TimeoutError:
            raise TimeoutExpired(f"capture did not drain within {timeout} s") from None
        if self.journal_error:
            raise TimeoutExpired(f"the journal refuses writes: {self.journal_error}")
        result: dict[str, Any] = {"head": head, "nodes": {}}
        for name, sender in self.senders.items():
            state = sender.state
            if not state.connected and not require_all:
                result["nodes"][name] = "disconnected"
                continue
            remaining = max(0.0, deadline - time.monotonic())
            if not await sender.wait_applied(head, remaining, settled=True):
                why = (
                    "is disconnected"
                    if not state.connected
                    else (
                        f"has a {state.needs_check or 'running'} check"
                        if state.needs_check or state.checking
                        else f"applied {state.applied}"
                    )
                )
                raise TimeoutExpired(f"{name} {why}; journal head {head}, waited {timeout} s")
            result["nodes"][name] = state.applied
        return result

    async def drift(self, *, node: str | None, trees: bool, packages: bool) -> dict[str, Any]:
        """Compare this active's system trees and packages with each passive's (stead drift)."""
        if self.role != "active":
            raise UsageError(f"{self.me} is passive; ask the active node")
        passives = [peer.name for peer in self.cluster.peers(self.me)]
        if node is not None and node not in passives:
            known = ", ".join(passives)
            raise UsageError(f"{node!r} is not a passive of this cluster (passives: {known})")
        system = self.cluster.system

        async def local(trees: bool, packages: bool) -> Snapshot:
            scope = Scope.from_config(self.cluster)
            return await asyncio.to_thread(
                take_snapshot,
                self.me,
                scope,
                system.packages,
                trees=trees,
                packages=packages,
                cache=self.state_dir / hashcache.FILE_NAME,
            )

        def ask(name: str) -> Ask:
            return lambda body, timeout: self.membership.request(
                name, SNAPSHOT_REQUEST, body, timeout
            )

        def connected(name: str) -> bool:
            return "up" in self.membership.peers[name].links.values()

        return await run_drift(
            active=self.me,
            passives=[node] if node else passives,
            local=local,
            ask=ask,
            connected=connected,
            trees=trees,
            packages=packages,
        )

    def start_check(self, *, node: str | None, fast: bool) -> Job:
        if self.role != "active":
            raise UsageError(f"{self.me} is passive; run the check on the active node")
        if node is not None and node not in self.senders:
            raise UsageError(f"{node!r} is not a passive of this cluster")
        candidates = [node] if node else list(self.senders)
        targets = [n for n in candidates if self.senders[n].state.connected]
        if not targets:
            raise UsageError(f"{' and '.join(candidates)}: not connected, nothing to check")
        for name in targets:
            if self.senders[name].state.checking:
                raise UsageError(f"a check of {name} is already running")
        for name in targets:
            self.senders[name].state.checking = True  # claimed now: no overlapping checks
        skipped = [n for n in candidates if n not in targets]
        job = self.jobs.create("check", {"nodes": targets, "fast": fast, "skipped": skipped})
        job.task = asyncio.get_running_loop().create_task(self._run_check(job, targets, fast))
        return job

    async def _run_check(self, job: Job, targets: list[str], fast: bool) -> None:
        assert self.journal is not None
        assert self.capture is not None
        pending = list(targets)
        try:
            while pending:
                name = pending.pop(0)
                state = self.senders[name].state
                generation = state.needs_generation
                try:
                    report = await self._check_one(job, name, fast)
                finally:
                    state.checking = False
                covered = not fast or state.needs_check == "fast"
                if covered and state.needs_generation == generation:
                    state.needs_check = None
                await asyncio.to_thread(self.store.set, f"needs_check:{name}", state.needs_check)
                job.result[name] = report
                self.store.event(
                    "check",
                    f"{'fast' if fast else 'full'} check of {name}: "
                    f"{len(report['differences'])} differences repaired",
                )
            job.finish()
        except (SteadError, OSError) as exc:
            job.fail(str(exc))
            self.store.event("check", f"check failed: {exc}", level="error")
        finally:
            for name in pending:
                self.senders[name].state.checking = False
        if job.state != "done":
            return  # a failed check runs again when the passive reconnects
        for name in targets:  # anything raised meanwhile (a reset, a skipped entry) runs now
            state = self.senders[name].state
            if state.needs_check and state.connected and not state.checking:
                self.start_check(node=name, fast=state.needs_check == "fast")

    async def _check_one(self, job: Job, name: str, fast: bool) -> dict[str, Any]:
        assert self.capture is not None
        sender = self.senders[name]
        await sender.request("check-started", {})
        report = await check.run_check(
            sender=sender,
            roots=self.roots,
            filters=self.filters,
            capture=self.capture,
            block_size=self.cluster.replication.block_size,
            fast=fast,
            emit=self.emit,
            head=lambda: self.journal.head if self.journal else 0,
            progress=job.progress,
        )
        # A full check covered everything: once its repairs are applied, the passive is in
        # sync again (and stops keeping replaced files in a quarantine).
        await self.flush_emitted()  # the repairs are in the journal: its head covers them
        if (
            not fast
            and self.journal is not None
            and await sender.wait_applied(self.journal.head, CHECK_APPLY_TIMEOUT)
        ):
            await sender.request("check-finished", {})
        return report
