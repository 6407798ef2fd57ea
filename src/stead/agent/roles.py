"""Role changes: the decision cycle, its executor, and the steps of each role change.

A mixin of :class:`stead.agent.daemon.Agent`. Each cycle observes (membership heartbeats,
witnesses, the public probe, operator requests), calls the pure
:func:`stead.agent.decide.decide`, and carries its action out. Every decision whose reason
changes is an event, and ``stead status`` shows the last one.

Ordering duties: the epoch (and the vote) is persisted before anything that depends on it;
promotion applies everything received first, then starts the journal at that position,
takes the public identity and starts the services; demotion stops the services and
releases the identity before the node says it is passive. One role change at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from stead.agent import decide as d
from stead.agent.base import AgentBase
from stead.agent.conversations import VOTED_EPOCH_KEY, VOTED_FOR_KEY
from stead.agent.membership import Membership
from stead.agent.probes import WitnessMonitor
from stead.aio import cancel_and_wait
from stead.channel import messages as m
from stead.channel.transport import ChannelServer
from stead.errors import ServiceError, SteadError, UsageError
from stead.identity import make_identity, make_management
from stead.identity.hooks import Hooks
from stead.replication.receiver import (
    APPLIED_KEY,
    CHECK_DUE_KEY,
    LINEAGE_KEY,
    OUT_OF_SYNC_KEY,
    QUARANTINE_KEY,
    RESET_KEY,
    WROTE_KEY,
)
from stead.services.manager import ServiceManager
from stead.system import hashcache
from stead.system.manifest import Scope
from stead.system.snapshot import SNAPSHOT_REQUEST, SnapshotPages

log = logging.getLogger(__name__)

JOURNAL_RESTART_KEY = "journal_restart_at"
LINEAGE_BASE_KEY = "lineage_base"
LINEAGE_FROM_KEY = "lineage_from"
MAINTENANCE_KEY = "maintenance"


class RoleChanges(AgentBase):
    def init_roles(self) -> None:
        self.voted_epoch = int(self.store.get(VOTED_EPOCH_KEY, 0))
        self.voted_for = str(self.store.get(VOTED_FOR_KEY, ""))
        self.maintenance = bool(self.store.get(MAINTENANCE_KEY, False))
        self.campaign: d.Campaign | None = None
        self.handover: int | None = None
        self.failover_to: int | None = None
        self.decision = ""
        self.decided_at = 0.0
        self.public_held = False
        self._probe: tuple[float, bool] = (0.0, False)  # (monotonic time taken, answered)
        # Last time an active of our epoch or newer was heard, or we were active ourselves.
        self.active_heard_at: float | None = None
        self._sees_active = True
        self._acted = False  # this process took the public identity at least once
        self._public_servers: list[ChannelServer] = []
        self._transition = asyncio.Lock()
        self._procedure = ""  # a switchover in progress: the cycle observes, never acts
        self._wake_cycle = asyncio.Event()
        self.env = {"STEAD_NODE": self.me, "STEAD_ROLE": self.role, "STEAD_EPOCH": ""}
        self.identity = make_identity(self.cluster, self.state_dir, self.me)
        self.management = make_management(self.cluster, self.me, self.state_dir)
        self.hooks = Hooks(self.cluster.hooks, self.env)
        self.services = ServiceManager(
            self.cluster.services, self.env, on_event=self._service_event
        )
        self.services.maintenance = self.maintenance
        self.witnesses = WitnessMonitor(
            self.cluster.failover.witnesses, self.cluster.channel.heartbeat
        )
        self._monitor: asyncio.Task[None] | None = None
        self.system_pages = SnapshotPages(
            self.me,
            Scope.from_config(self.cluster),
            self.cluster.system.packages,
            cache=self.state_dir / hashcache.FILE_NAME,
        )

    # ---- positions ---------------------------------------------------------------------

    def lineage_start(self) -> tuple[int, int]:
        """(seq, epoch) where this node's journal began: the history it shares."""
        return (
            int(self.store.get(LINEAGE_BASE_KEY, 0)),
            int(self.store.get(LINEAGE_FROM_KEY, -1)),
        )

    def position(self) -> int:
        if self.journal is not None:
            return self.journal.head
        if self.receiver is not None:
            return self.receiver.applied
        return 0

    def in_sync(self) -> bool:
        if self.role == "active" or self.receiver is None:
            return True
        return self.receiver.in_sync

    def follow_epoch(self, epoch: int) -> None:
        """A passive learns of a newer epoch (from the active it follows)."""
        if epoch > self.epoch and self.role == "passive":
            self.store.set("epoch", epoch)
            self.epoch = epoch
            self.env["STEAD_EPOCH"] = str(epoch)

    # ---- start and stop ----------------------------------------------------------------

    async def recover_identity(self) -> None:
        """After a crash the identity may still be held: give it back; an active takes it
        again only once the cycle has confirmed it is still the active."""
        try:
            await self.identity.release()
        except SteadError as exc:
            log.error("releasing the public identity at start failed: %s", exc)
            self.store.event("identity", f"release at start failed: {exc}", level="error")
        try:  # the node's own identity, kept in both roles (the public one goes over it)
            await self.management.take()
            await self._register_management_name()
        except SteadError as exc:
            log.error("taking the management identity failed: %s", exc)
            self.store.event("identity", f"management identity: {exc}", level="error")
        try:  # services are kept stopped until this node holds the role (units, commands)
            await self.services.stop_all()
        except SteadError as exc:
            self.store.event("service", f"stopping services at start failed: {exc}", level="error")

    async def _register_management_name(self) -> None:
        """With DNS configured, this node's management name points at its own address."""
        dns = self.cluster.public.dns
        management = self.cluster.node(self.me).management
        if dns is None or management is None or not management.fqdn or not management.address:
            return
        from stead.identity.dns import register_management

        if await register_management(dns, management.fqdn, management.address):
            self.store.event("identity", f"DNS: {management.fqdn} -> {management.address}")

    def start_cycle(self, tasks: asyncio.TaskGroup) -> None:
        self.membership = Membership(
            me=self.me,
            cluster=self.cluster,
            ssl_context=self.client_ssl,
            hello=self._hello,
            heartbeat=self._heartbeat,
            handle_request=self._peer_request,
            on_heartbeat=self._on_heartbeat,
        )
        tasks.create_task(self.membership.run())
        tasks.create_task(self.witnesses.run())
        tasks.create_task(self._public_probe_loop())
        tasks.create_task(self._cycle_loop())

    async def stop_roles(self) -> None:
        """A stopping active gives its identity back: a passive may take over."""
        if self.public_held:
            with contextlib.suppress(SteadError):
                await self.release_public("the agent is stopping")

    # ---- membership --------------------------------------------------------------------

    def _hello(self) -> m.Hello:
        return m.Hello(
            protocol=m.PROTOCOL_VERSION,
            cluster_id=self.cluster.cluster.id,
            node=self.me,
            epoch=self.epoch,
            role=self.role,
            applied_seq=self.position(),
            persisted_seq=self.position(),
            journal_head=self.position(),
            purpose="heartbeat",
        )

    def _heartbeat(self) -> m.Heartbeat:
        now = time.monotonic()
        active = self._heard_active(now)
        return m.Heartbeat(
            epoch=self.epoch,
            role=self.role,
            sent_at=time.time(),
            journal_head=self.position(),
            applied_seq=self.position(),
            in_sync=self.in_sync(),
            sees_active=self.role == "active" or active is not None,
            witnesses_ok=self.witnesses.ok,
            maintenance=self.maintenance,
            lineage=self.receiver.lineage if self.receiver is not None else self.epoch,
            active=self.me if self.role == "active" else (active or ""),
        )

    def _heard_active(self, now: float) -> str | None:
        timeout = self.cluster.failover.timeout
        for name, live in self.membership.peers.items():
            beat = live.last
            if (
                beat is not None
                and beat.role == "active"
                and live.last_heard is not None
                and now - live.last_heard < timeout
            ):
                return name
        return None

    def _on_heartbeat(self, name: str, beat: m.Heartbeat, previous: m.Heartbeat | None) -> None:
        if beat.role == "active" and beat.epoch >= self.epoch:
            self.active_heard_at = time.monotonic()
        if previous is None or (previous.sees_active, previous.role) != (
            beat.sees_active,
            beat.role,
        ):
            self._wake_cycle.set()  # a peer's view changed: decide now
        if beat.role == "active" and beat.epoch > self.epoch and self.role == "passive":
            self.follow_epoch(beat.epoch)
        if beat.epoch > self.epoch and self.role == "active":
            self._wake_cycle.set()  # a newer epoch exists: decide now

    async def _peer_request(self, peer: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        if kind == "vote":
            return await self._answer_vote(peer, body)
        if kind == "handover":
            return await self._accept_handover(peer, body)
        if kind.startswith("reclone-"):
            return await self.answer_reclone(peer, kind, body)
        if kind == SNAPSHOT_REQUEST:  # stead drift: this node's packages and system trees
            return await self.system_pages.answer(body)
        raise UsageError(f"unknown request {kind!r}")

    # ---- observation and decision --------------------------------------------------------

    def observe(self, now: float) -> d.Observed:
        peers = []
        for node in self.cluster.peers(self.me):
            live = self.membership.peers[node.name]
            beat = live.last
            peers.append(
                d.PeerView(
                    name=node.name,
                    priority=node.priority,
                    automatic_failover=node.automatic_failover,
                    last_heard=live.last_heard,
                    role=beat.role if beat else "passive",  # type: ignore[arg-type]
                    epoch=beat.epoch if beat else 0,
                    applied=beat.applied_seq if beat else 0,
                    in_sync=beat.in_sync if beat else False,
                    sees_active=beat.sees_active if beat else True,
                    witnesses_ok=beat.witnesses_ok if beat else None,
                    maintenance=beat.maintenance if beat else False,
                )
            )
        me = self.cluster.node(self.me)
        return d.Observed(
            me=self.me,
            role=self.role,  # type: ignore[arg-type]
            epoch=self.epoch,
            voted_epoch=self.voted_epoch,
            voted_for=self.voted_for,
            applied=self.position(),
            in_sync=self.in_sync(),
            priority=me.priority,
            automatic_failover=me.automatic_failover,
            started=self.started_monotonic,
            peers=tuple(peers),
            witnesses_ok=self.witnesses.ok,
            witnesses_lost_since=self.witnesses.lost_since,
            public_visible=self._public_visible(),
            maintenance=self.maintenance,
            campaign=self.campaign,
            handover=self.handover,
            failover_to=self.failover_to,
            active_heard=now if self.role == "active" else self.active_heard_at,
        )

    async def _cycle_loop(self) -> None:
        # Several cycles per heartbeat: a failover waits for the timeout, not for a cycle.
        interval = min(self.cluster.channel.heartbeat / 2, self.cluster.failover.timeout / 8)
        while True:
            self._wake_cycle.clear()  # before the cycle: what it wakes runs the next one now
            try:
                await self.cycle_once()
            except SteadError as exc:
                log.error("decision cycle: %s", exc)
                self.store.event("decision", f"action failed: {exc}", level="error")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake_cycle.wait()

    async def cycle_once(self) -> None:
        now = time.monotonic()
        sees_active = self.role == "active" or self._heard_active(now) is not None
        if sees_active != self._sees_active:
            # Peers count who still hears the active: tell them at once, not a beat later.
            self._sees_active = sees_active
            self.membership.beat_now()
        action = d.decide(self.observe(now), self.cluster, now)
        if action.reason != self.decision:
            self.decision, self.decided_at = action.reason, time.time()
            level = "info" if isinstance(action, d.Stay) else "warning"
            log.log(logging.INFO if level == "info" else logging.WARNING, "%s", action.reason)
            self.store.event("decision", action.reason, level=level, action=type(action).__name__)
        if self._procedure:
            return  # a switchover drives the roles itself
        await self.execute(action, now)

    async def execute(self, action: d.Action, now: float) -> None:
        if isinstance(action, d.Promote):
            await self.promote(action.epoch, action.reason)
        elif isinstance(action, d.Demote):
            await self.demote(action.epoch, action.reason)
        elif isinstance(action, d.SelfFence):
            await self.demote(self.epoch, action.reason)
        elif isinstance(action, d.StartCampaign):
            await self._campaign(action.epoch)
        elif isinstance(action, d.RequestSwitchover):
            if not self._procedure:
                self.start_switchover(action.to, reason=action.reason)
        elif self.role == "active" and not self.public_held and self._settled(now):
            await self.take_public("the active holds the public identity")

    def _settled(self, now: float) -> bool:
        """An active that just started waits to hear its peers (or the failover timeout)
        before it takes the public identity: a newer active may exist."""
        if now - self.started_monotonic >= self.cluster.failover.timeout:
            return True
        return all(live.last_heard is not None for live in self.membership.peers.values())

    # ---- role changes ------------------------------------------------------------------

    async def promote(self, epoch: int, reason: str) -> None:
        async with self._transition:
            if self.role == "active":
                return
            started = time.monotonic()
            base, lineage = await self._settle_receiver()
            await asyncio.to_thread(
                self.store.set_many,
                {
                    "epoch": epoch,
                    "role": "active",
                    JOURNAL_RESTART_KEY: base,
                    LINEAGE_BASE_KEY: base,
                    LINEAGE_FROM_KEY: lineage,
                    WROTE_KEY: epoch,
                    QUARANTINE_KEY: None,
                },
            )
            self.epoch, self.role = epoch, "active"
            self.campaign = self.handover = self.failover_to = None
            self.store.event("promote", f"{self.me} takes over in epoch {epoch}: {reason}")
            log.warning("%s becomes active in epoch %d at %d: %s", self.me, epoch, base, reason)
            self.membership.beat_now()
            await self.switch_runtime()
            await self.take_public(reason)
            self.store.event(
                "promote", f"active in {time.monotonic() - started:.2f} s (epoch {epoch})"
            )

    async def _settle_receiver(self) -> tuple[int, int]:
        """Apply what the receive queue holds, then give (position, its epoch)."""
        receiver = self.receiver
        if receiver is None:
            return self.position(), self.epoch
        await receiver.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.cluster.failover.timeout * 4):
                await receiver.wait_applied_all()
        return receiver.applied, receiver.lineage

    async def demote(self, epoch: int, reason: str) -> None:
        async with self._transition:
            if self.role != "active":
                self.follow_epoch(epoch)
                return
            await self.release_public(reason)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(STOP_FLUSH_SECONDS):
                    if self.capture is not None:
                        await self.capture.drain()  # what the kernel queued, too
                    await self.flush_emitted()
            head = self.position()
            old = self.epoch
            new_epoch = max(epoch, self.epoch)
            # An active that crashed and comes back demoted may hold writes its journal
            # never saw (made just before the crash): it asks for a full check, and keeps
            # what the check replaces in a quarantine.
            dirty = not self.clean_start and not self._acted
            await asyncio.to_thread(
                self.store.set_many,
                {
                    "epoch": new_epoch,
                    "role": "passive",
                    RESET_KEY: head,  # the receiver starts its queue at our journal head
                    LINEAGE_KEY: old,
                    APPLIED_KEY: head,
                    CHECK_DUE_KEY: False,
                    OUT_OF_SYNC_KEY: dirty,
                    QUARANTINE_KEY: f"epoch-{new_epoch}-{int(time.time())}" if dirty else None,
                },
            )
            self.epoch, self.role = new_epoch, "passive"
            self.active_heard_at = time.monotonic()
            self.env["STEAD_ROLE"] = "passive"
            self.store.event("demote", f"{self.me} is passive (epoch {new_epoch}): {reason}")
            log.warning("%s becomes passive, epoch %d: %s", self.me, new_epoch, reason)
            self.membership.beat_now()
            await self.switch_runtime()

    async def take_public(self, reason: str) -> None:
        """Hooks, identity, the public channel listener, then the services in order."""
        self.env.update(STEAD_ROLE="active", STEAD_EPOCH=str(self.epoch))
        self.hooks = Hooks(self.cluster.hooks, dict(self.env))
        self.services.set_env(self.env)
        started = time.monotonic()
        await self.hooks.run("before_active")
        await self.identity.take()
        self.public_held = self._acted = True
        for address in self.cluster.public.addresses:
            host = address.address.split("/")[0]
            try:
                self._public_servers.append(await self.listen_on(host))
            except (OSError, SteadError) as exc:
                log.warning("cannot listen on public address %s: %s", host, exc)
        try:
            await self.services.start_all()
        except ServiceError as exc:
            # A service that cannot start here may start on a passive: hand the role over
            # (the rules' last resort), and keep the identity until then.
            self.store.event("service", f"services failed to start: {exc}", level="error")
            await self._service_switchover(f"services failed to start on {self.me}: {exc}")
            return
        self._monitor = self.tasks.create_task(self.services.monitor(self._service_switchover))
        await self.hooks.run("after_active")
        self.store.event(
            "identity",
            f"public identity taken, services started in {time.monotonic() - started:.2f} s",
        )

    async def release_public(self, reason: str) -> None:
        """Services in reverse order, the public listener, the identity, with the hooks."""
        if self._monitor is not None:
            await cancel_and_wait(self._monitor)
            self._monitor = None
        errors = []
        try:
            await self.hooks.run("before_passive")
        except SteadError as exc:
            errors.append(str(exc))
        try:
            await self.services.stop_all()
        except SteadError as exc:
            errors.append(str(exc))
        for server in self._public_servers:
            server.close()
        self._public_servers.clear()
        await self.identity.release()
        self.public_held = False
        try:
            await self.hooks.run("after_passive")
        except SteadError as exc:
            errors.append(str(exc))
        self.store.event("identity", f"public identity released: {reason}")
        for error in errors:
            self.store.event("identity", error, level="error")

    # ---- services ----------------------------------------------------------------------

    def _service_event(self, kind: str, message: str) -> None:
        self.store.event(kind, message)

    async def _service_switchover(self, reason: str) -> None:
        best = self._best_passive()
        if best is None:
            self.store.event("service", f"{reason}: no passive can take over", level="error")
            return
        try:
            self.start_switchover(best, reason=reason)
        except UsageError as exc:
            self.store.event("service", f"{reason}: no switchover: {exc}", level="error")

    def _best_passive(self) -> str | None:
        now = time.monotonic()
        ranked = sorted(
            (
                (-(live.last.applied_seq), self.cluster.node(name).priority, name)
                for name, live in self.membership.peers.items()
                if live.last is not None
                and live.last.in_sync
                and live.last_heard is not None
                and now - live.last_heard < self.cluster.failover.timeout
            ),
        )
        return ranked[0][2] if ranked else None

    # ---- operator ----------------------------------------------------------------------

    async def set_maintenance(self, on: bool) -> None:
        await asyncio.to_thread(self.store.set, MAINTENANCE_KEY, on)
        self.maintenance = on
        self.services.maintenance = on
        self.store.event("maintenance", f"maintenance {'on' if on else 'off'}")
        self.membership.beat_now()

    def roles_status(self) -> dict[str, Any]:
        now = time.monotonic()
        holder = self.me if self.public_held else None
        if holder is None:
            holder = self._heard_active(now)
        return {
            "decision": self.decision,
            "decided_at": self.decided_at,
            "maintenance": self.maintenance,
            "public_holder": holder,
            "public_held": self.public_held,
            "witnesses": {"ok": self.witnesses.ok, "results": self.witnesses.results},
            "membership": self.membership.status(now),
            "services": self.services.status(),
            "procedure": self._procedure,
            "voted": {"epoch": self.voted_epoch, "for": self.voted_for},
        }


STOP_FLUSH_SECONDS = 10.0
