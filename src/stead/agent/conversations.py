"""Votes and the public probe: the two conversations the decision cycle has with others.

A mixin of :class:`stead.agent.daemon.Agent`, beside ``roles.py``. Duties: a vote is
persisted before it is answered, and a node never grants two candidates the same epoch;
a campaign asks every peer at once and stops waiting at a majority. The public probe runs
while the active is unheard, so that a fresh answer exists by the failover timeout.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from stead.agent import decide as d
from stead.agent import vote as v
from stead.agent.base import AgentBase
from stead.agent.probes import agent_answers
from stead.errors import UsageError

VOTED_EPOCH_KEY = "voted_epoch"
VOTED_FOR_KEY = "voted_for"


class Conversations(AgentBase):
    # ---- votes -------------------------------------------------------------------------

    async def _campaign(self, epoch: int) -> None:
        await asyncio.to_thread(
            self.store.set_many, {VOTED_EPOCH_KEY: epoch, VOTED_FOR_KEY: self.me}
        )
        self.voted_epoch, self.voted_for = epoch, self.me
        since = time.monotonic()
        self.campaign = d.Campaign(epoch=epoch, granted=frozenset({self.me}), since=since)
        granted = {self.me}
        body = {
            "epoch": epoch,
            "applied": self.position(),
            "in_sync": self.in_sync(),
        }
        timeout = self.cluster.failover.timeout / 2
        needed = len(self.cluster.nodes) // 2 + 1

        async def ask(name: str) -> str | None:
            async with asyncio.timeout(timeout):
                answer = await self.membership.request(name, "vote", body, timeout)
            return name if answer.get("granted") is True else None

        pending = {asyncio.ensure_future(ask(name)) for name in self.membership.peers}
        try:
            while pending and len(granted) < needed:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and task.exception() is None and task.result():
                        granted.add(str(task.result()))
                self.campaign = d.Campaign(epoch=epoch, granted=frozenset(granted), since=since)
        finally:
            for task in pending:
                task.cancel()
        self.store.event("vote", f"campaign for epoch {epoch}: votes of {sorted(granted)}")
        self._wake_cycle.set()

    async def _answer_vote(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        epoch, applied = body.get("epoch"), body.get("applied")
        if not isinstance(epoch, int) or not isinstance(applied, int):
            raise UsageError("a vote request needs epoch and applied")
        request = v.VoteRequest(
            candidate=peer, epoch=epoch, applied=applied, in_sync=bool(body.get("in_sync"))
        )
        now = time.monotonic()
        vote = v.grant_vote(self.observe(now), request, self.cluster, now)
        if vote.granted:
            await asyncio.to_thread(
                self.store.set_many, {VOTED_EPOCH_KEY: epoch, VOTED_FOR_KEY: peer}
            )
            self.voted_epoch, self.voted_for = epoch, peer
        self.store.event("vote", f"vote for {peer} in epoch {epoch}: {vote.reason}")
        return {"granted": vote.granted, "reason": vote.reason}

    # ---- public probe ------------------------------------------------------------------

    async def _public_probe_loop(self) -> None:
        """While a passive has not heard the active for half the failover timeout, probe the
        public address for a live agent, so that a fresh answer is there by the timeout."""
        config = self.cluster
        addresses = [a.address.split("/")[0] for a in config.public.addresses]
        timeout = max(0.2, config.failover.timeout / 4)
        while True:
            now = time.monotonic()
            silent_for = now - self._last_active_heard()
            if (
                addresses
                and config.failover.public_check
                and self.role == "passive"
                and silent_for >= config.failover.timeout / 2
            ):
                expect = (self.receiver.active_name if self.receiver else "") or self.me
                results = [
                    await agent_answers(a, config.channel.port, self.client_ssl, expect, timeout)
                    for a in addresses
                ]
                self._probe = (now, any(results))
            await asyncio.sleep(min(config.channel.heartbeat, config.failover.timeout / 4))

    def _last_active_heard(self) -> float:
        heard = [
            live.last_heard
            for live in self.membership.peers.values()
            if live.last is not None and live.last.role == "active" and live.last_heard
        ]
        return max([self.started_monotonic, *heard])

    def _public_visible(self) -> bool | None:
        """The latest probe taken since the active went silent; unknown counts as visible."""
        config = self.cluster
        if self.role != "passive" or not config.failover.public_check:
            return None
        if not config.public.addresses:
            return None
        taken, visible = self._probe
        if taken < self._last_active_heard():
            return True  # no probe since the silence began: do not assume the active is gone
        return visible
