"""Planned and forced role changes an operator asks for.

``stead switchover [--to NODE]`` runs on the active: stop the services (reverse order), drain
capture and the journal until the target has applied everything, release the public
identity, become passive, then hand the next epoch to the target, which takes the identity
and starts the services. Each step is timed and reported in the job. If the hand-over
fails, this node takes the role back (a new epoch), so the cluster keeps an active.

``stead failover --to NODE`` runs on the target, when no active is heard: it takes the next
epoch at once, losing whatever the old active journaled that it had not applied.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from stead.agent.base import AgentBase
from stead.agent.decide import next_epoch
from stead.agent.jobs import Job
from stead.errors import SteadError, TimeoutExpired, UsageError

DRAIN_TIMEOUT = 120.0  # seconds the target may take to apply the journal's tail
TAKEOVER_TIMEOUT = 120.0  # seconds the target may take to become active


class Procedures(AgentBase):
    def start_switchover(self, to: str | None, *, reason: str = "operator request") -> Job:
        if self.role != "active":
            raise UsageError(f"{self.me} is passive; run switchover on the active node")
        if self._procedure:
            raise UsageError(f"{self._procedure} is already running")
        target = to or self._best_passive()
        if target is None:
            raise UsageError("no passive is connected and in sync to take over")
        if target not in self.senders:
            raise UsageError(f"{target!r} is not a passive of this cluster")
        state = self.senders[target].state
        if not state.connected:
            raise UsageError(f"{target} is not connected")
        if state.needs_check or state.checking:
            raise UsageError(f"{target} is out of sync (a check is due); wait for it first")
        self._procedure = f"switchover to {target}"
        job = self.jobs.create("switchover", {"to": target, "reason": reason, "steps": []})
        job.task = asyncio.get_running_loop().create_task(self._switchover(job, target, reason))
        return job

    async def _switchover(self, job: Job, target: str, reason: str) -> None:
        steps: list[dict[str, Any]] = job.result.setdefault("steps", [])
        epoch = self.epoch
        self.store.event("switchover", f"switchover to {target} begins: {reason}")

        async def step(name: str, work: Any) -> Any:
            started = time.monotonic()
            entry: dict[str, Any] = {"step": name, "state": "running"}
            steps.append(entry)
            job.progress.update(done=len(steps), total=5, detail=name)
            try:
                result = await work
            except BaseException:
                entry.update(state="failed", seconds=round(time.monotonic() - started, 3))
                raise
            entry.update(state="done", seconds=round(time.monotonic() - started, 3))
            return result

        handed = False
        new_epoch = next_epoch(self.cluster, target, epoch)
        try:
            async with self._transition:
                await step("stop services", self._stop_services())
            head = await step("drain journal", self._drain_to(target))
            await step("release identity", self.release_public(f"switchover to {target}"))
            await step("become passive", self.demote(epoch, f"switchover to {target}"))
            handed = True
            reply = await step(
                "hand over",
                self.membership.request(
                    target,
                    "handover",
                    {"epoch": new_epoch, "base": head, "lineage": epoch},
                    TAKEOVER_TIMEOUT,
                ),
            )
            job.result["target_seconds"] = reply.get("seconds")
            job.result["epoch"] = new_epoch
            self.store.event("switchover", f"{target} is active in epoch {new_epoch}")
            job.finish()
        except (SteadError, OSError, TimeoutError) as exc:
            job.fail(f"{steps[-1]['step'] if steps else 'start'}: {exc}")
            self.store.event("switchover", f"switchover to {target} failed: {exc}", level="error")
            if not handed:
                await self.take_public("switchover failed before the hand-over: stay active")
            else:
                # We are passive and the target did not confirm: take the role back unless
                # the target did become active meanwhile.
                self.failover_to = next_epoch(
                    self.cluster, self.me, max(self.epoch, self.voted_epoch, new_epoch)
                )
                self._wake_cycle.set()
        finally:
            self._procedure = ""

    async def _stop_services(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            self._monitor = None
        await self.services.stop_all()

    async def _drain_to(self, target: str) -> int:
        result = await self.wait_sync(DRAIN_TIMEOUT)
        head = int(result["head"])
        if not await self.senders[target].wait_applied(head, DRAIN_TIMEOUT, settled=True):
            raise TimeoutExpired(f"{target} did not apply {head} within {DRAIN_TIMEOUT} s")
        return head

    async def _accept_handover(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        epoch, base, lineage = body.get("epoch"), body.get("base"), body.get("lineage")
        if not all(isinstance(v, int) for v in (epoch, base, lineage)):
            raise UsageError("a hand-over needs epoch, base and lineage")
        assert isinstance(epoch, int) and isinstance(base, int) and isinstance(lineage, int)
        if epoch <= self.epoch and self.role == "active":
            raise UsageError(f"{self.me} is active already")
        receiver = self.receiver
        if receiver is None:
            raise UsageError(f"{self.me} is not a passive")
        started = time.monotonic()
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                await receiver.wait_applied_all()
        except TimeoutError:
            raise TimeoutExpired(f"{self.me} did not apply up to {base}") from None
        if receiver.applied != base or receiver.lineage != lineage or not receiver.in_sync:
            raise UsageError(
                f"{self.me} stands at {receiver.applied} of epoch {receiver.lineage}"
                f"{'' if receiver.in_sync else ', out of sync'}; {peer} handed {base} of {lineage}"
            )
        self.handover = epoch
        try:
            await self._until_active()
        finally:
            self.handover = None
        return {"seconds": round(time.monotonic() - started, 3), "epoch": self.epoch}

    async def _until_active(self) -> None:
        """Run decision cycles until this node is active with the public identity."""
        try:
            async with asyncio.timeout(TAKEOVER_TIMEOUT):
                while not (self.role == "active" and self.public_held):
                    self._wake_cycle.set()
                    await asyncio.sleep(0.05)  # the cycle runs in its own task: let it
        except TimeoutError:
            raise TimeoutExpired(f"{self.me} did not become active: {self.decision}") from None

    async def request_failover(self) -> dict[str, Any]:
        """Operator: make this passive the active now, though the active is unheard."""
        if self.role == "active":
            raise UsageError(f"{self.me} is active already")
        now = time.monotonic()
        active = self._heard_active(now)
        if active is not None:
            raise UsageError(f"{active} is active and answering; use `stead switchover --to`")
        known = [self.epoch, self.voted_epoch]
        known += [live.last.epoch for live in self.membership.peers.values() if live.last]
        last_head = max(
            (live.last.journal_head for live in self.membership.peers.values() if live.last),
            default=self.position(),
        )
        self.failover_to = next_epoch(self.cluster, self.me, max(known))
        applied = self.position()
        try:
            await self._until_active()
        finally:
            self.failover_to = None
        return {
            "epoch": self.epoch,
            "applied": applied,
            "last_known_head": last_head,
            "possibly_lost_records": max(0, last_head - applied),
        }
