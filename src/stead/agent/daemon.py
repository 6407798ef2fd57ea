"""``stead agent``: one daemon per node, every long-lived task owned by one TaskGroup.

The active captures changes into the journal and runs one sender per passive; a passive
runs the receiver and the applier. Blocking work (fsync, hashing, SQLite) runs in threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
from pathlib import Path
from typing import Any

from stead.agent.autoreclone import AutoReclones
from stead.agent.conversations import Conversations
from stead.agent.jobs import JobTable
from stead.agent.progress import AppendLog
from stead.agent.reclones import Reclones
from stead.agent.requests import OperatorRequests
from stead.agent.roles import JOURNAL_RESTART_KEY, RoleChanges
from stead.agent.switchover import Procedures
from stead.aio import TaskGroup
from stead.api.server import serve_unix
from stead.channel import messages as m
from stead.channel import transport
from stead.channel.transport import Connection
from stead.config.load import Loaded
from stead.errors import (
    AuthenticationError,
    JournalError,
    ProtocolError,
    UsageError,
)
from stead.replication import check
from stead.replication.applier import Applier
from stead.replication.capture import make_capture
from stead.replication.capture.core import QUEUE_SYSCTLS, EventCapture, raise_queue_limit
from stead.replication.capture.scan import initial_scan
from stead.replication.entries import Entry
from stead.replication.filters import Filter
from stead.replication.journal import Journal, ReceiveQueue
from stead.replication.manifest import Manifest
from stead.replication.receiver import WROTE_KEY, Receiver
from stead.replication.sender import PeerState, Sender
from stead.store.db import StateStore

log = logging.getLogger(__name__)


class Agent(OperatorRequests, RoleChanges, Conversations, Procedures, Reclones, AutoReclones):
    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded
        self.cluster = loaded.cluster
        self.me = loaded.name
        self.state_dir = loaded.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = StateStore(self.state_dir / "state.db")
        self.role: str = self.store.get("role") or (
            "active" if self.cluster.cluster.active == self.me else "passive"
        )
        self.epoch: int = int(self.store.get("epoch", 1 if self.role == "active" else 0))
        self.store.set_many({"role": self.role, "epoch": self.epoch})
        if self.role == "active" and self.store.get(WROTE_KEY) is None:
            self.store.set(WROTE_KEY, self.epoch)
        self.clean_start = bool(self.store.get("clean_shutdown", True))
        self.store.set("clean_shutdown", False)
        self.quarantine_dir = self.state_dir / "quarantine"
        self.roots = {p.path: Path(p.path) for p in self.cluster.protected}
        self.filters = {p.path: Filter(p.include, p.exclude) for p in self.cluster.protected}
        self.jobs = JobTable()
        self.started = time.time()
        self.started_monotonic = time.monotonic()
        self.journal: Journal | None = None
        self.manifest: Manifest | None = None
        self.capture: EventCapture[Any] | None = None
        self.senders: dict[str, Sender] = {}
        self.receiver: Receiver | None = None
        self.appends = AppendLog()
        self._emit_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._journal_dirty = asyncio.Event()
        self._acked = asyncio.Event()  # set on every acknowledgement from any passive
        self._emitted: asyncio.Queue[list[Entry]] = asyncio.Queue(maxsize=EMIT_QUEUE_BATCHES)
        self.capture_phase = ""
        self.scan_entries = 0
        self._clean = False
        self._unflushed = False
        self.journal_error = ""
        self._role_change = asyncio.Event()
        self._runtime_ready = asyncio.Event()
        self._switch_waiters: list[asyncio.Future[None]] = []
        self.init_roles()
        self.init_reclones()
        self.init_auto_reclone()

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        tls = self.loaded
        revoked = set(self.cluster.channel.revoked_serials)
        ca, cert, key = tls.path(tls.node.ca), tls.path(tls.node.cert), tls.path(tls.node.key)
        self.server_ssl = transport.server_context(ca, cert, key, revoked)
        self.client_ssl = transport.client_context(ca, cert, key, revoked)
        self.store.event("start", f"agent started as {self.role} (epoch {self.epoch})")
        self.recover_reclone()
        log.info("%s starting as %s, epoch %d", self.me, self.role, self.epoch)
        try:
            async with TaskGroup() as tasks:
                self.tasks = tasks
                await self.recover_identity()
                tasks.create_task(self._roles())
                await self._runtime_ready.wait()
                servers = await self._listen()
                api = await serve_unix(self, self.loaded.api_socket)
                self.start_cycle(tasks)
                self.start_scheduler(tasks)
                tasks.create_task(self.auto_reclone_loop())
                try:
                    await self._stop.wait()
                finally:
                    log.info("%s stopping", self.me)
                    await self.stop_roles()
                    if self.journal is not None:
                        # What capture handed over reaches the journal before a clean stop.
                        try:
                            async with asyncio.timeout(STOP_FLUSH_TIMEOUT):
                                await self.flush_emitted()
                        except TimeoutError:
                            self._unflushed = True  # the next start runs a full check
                    await api.cleanup()
                    for server in servers:
                        server.close()
                    for server in servers:
                        await server.wait_closed()
                    raise _Stopping
        except* _Stopping:
            self._clean = not self._unflushed
        finally:
            self._close_runtime()
            self._close()

    def _close(self) -> None:
        if self._clean:
            self.store.set("clean_shutdown", True)
            self.store.event("stop", "agent stopped cleanly")
        self.store.close()

    def _close_runtime(self) -> None:
        """Close what the current role opened (its tasks are gone already)."""
        if self.journal is not None:
            try:
                self.journal.close()  # writes what only memory held, then syncs
            except (JournalError, OSError) as exc:
                log.error("journal not written out at stop, a full check will follow: %s", exc)
                self._clean = False
            self.journal = None
        if self.manifest is not None:
            self.manifest.close()
            self.manifest = None
        if self.receiver is not None:
            self.receiver.queue.sync()
            self.receiver.queue.close()
            self.receiver.applier.close()
            self.receiver = None
        self.capture = None
        self.senders = {}
        self.capture_phase = ""

    async def _roles(self) -> None:
        """Run the current role's tasks; rebuild them whenever the role changes."""
        while True:
            role = self.role
            self._role_change.clear()
            try:
                async with TaskGroup() as tasks:
                    if role == "active":
                        await self._start_active(tasks)
                    else:
                        await self._start_passive(tasks)
                    self._runtime_ready.set()
                    waiters, self._switch_waiters = self._switch_waiters, []
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_result(None)
                    await self._role_change.wait()
                    if self.receiver is not None:
                        await self.receiver.close()
                    for sender in self.senders.values():
                        sender.abort()
                    raise _RoleSwitch
            except* _RoleSwitch:
                pass
            finally:
                self._runtime_ready.clear()
                self._close_runtime()
            log.info("%s: %s runtime stopped, starting %s", self.me, role, self.role)

    async def switch_runtime(self) -> None:
        """Tear the current role's tasks down and start the other role's (self.role)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._switch_waiters.append(done)
        self._role_change.set()
        await done

    async def _listen(self) -> list[transport.ChannelServer]:
        addresses = self.loaded.node.listen or self.cluster.node(self.me).addresses
        return [await self.listen_on(address) for address in addresses]

    async def listen_on(self, address: str) -> transport.ChannelServer:
        return await transport.serve(
            address,
            self.cluster.channel.port,
            self.server_ssl,
            self._on_connection,
            max_frame=self.cluster.channel.max_frame,
            compression=self.cluster.channel.compression,
        )

    async def _on_connection(self, conn: Connection) -> None:
        if conn.peer_name not in [n.name for n in self.cluster.nodes]:
            raise AuthenticationError(f"{conn.peer_name!r} is not a node of this cluster")
        hello = await conn.recv(timeout=self.cluster.channel.peer_timeout)
        if not isinstance(hello, m.Hello):
            raise ProtocolError(f"expected hello, got {type(hello).__name__}")
        if hello.purpose == "heartbeat":
            await self.membership.serve(conn, hello)
            return
        if hello.purpose == "reclone":
            await self.serve_reclone(conn, hello)
            return
        receiver = self.receiver
        if receiver is None or self.role != "passive":
            await conn.send(m.Error(code="role", message=f"{self.me} is active"))
            return
        await receiver.serve_connection(conn, hello)

    # ---- active ------------------------------------------------------------------------

    async def _start_active(self, tasks: asyncio.TaskGroup) -> None:
        replication = self.cluster.replication
        self.journal = Journal(
            self.state_dir / "journal",
            max_bytes=replication.journal_max,
            fsync=replication.fsync,
            segment_bytes=segment_bytes(replication.journal_max),
            write_behind=replication.fsync == "batch",
        )
        restart_at = self.store.get(JOURNAL_RESTART_KEY)
        promoted = restart_at is not None
        if restart_at is not None:
            # This node just took over: its journal continues from its applied position,
            # and block hashes from an earlier time as active no longer describe its files.
            self.journal.restart_at(int(restart_at))
            (self.state_dir / "manifest.db").unlink(missing_ok=True)
            self.store.set_many({JOURNAL_RESTART_KEY: None, "initial_scan_done": True})
        self.manifest = Manifest(self.state_dir / "manifest.db", replication.block_size)
        for source in QUEUE_SYSCTLS:
            raise_queue_limit(source)
        self.capture = make_capture(
            self.roots, self.filters, self.manifest, backend=replication.capture
        )
        self.store.event("capture", f"capture backend: {type(self.capture).__name__}")
        self.capture.on_overflow = self._on_overflow
        first_start = not self.store.get("initial_scan_done", False)
        for peer in self.cluster.peers(self.me):
            sender = Sender(
                me=self.me,
                peer=peer,
                cluster=self.cluster,
                journal=self.journal,
                ssl_context=self.client_ssl,
                epoch=lambda: self.epoch,
                on_connected=self._peer_connected,
                on_ack=self._acked.set,
                lineage=self.lineage_start,
            )
            if not first_start and not promoted:
                # Changes made while this agent was down are found by a check.
                stored = self.store.get(f"needs_check:{peer.name}")
                sender.state.require_check(
                    "full" if stored == "full" or not self.clean_start else "fast"
                )
            self.senders[peer.name] = sender
        # Capture and the first scan run beside the API and the channel, so that a large
        # protected set does not keep `stead status` waiting.
        tasks.create_task(self._journal_writer())
        tasks.create_task(self._capture(first_start))
        for sender in self.senders.values():
            tasks.create_task(sender.run())
        tasks.create_task(self._trim_journal())
        tasks.create_task(self._sync_journal())

    async def _capture(self, first_start: bool) -> None:
        assert self.capture is not None
        # Watch first, then scan: a change made during the scan is seen by the watches.
        self.capture_phase = "watching"
        await self.capture.start()
        if first_start:
            self.capture_phase = "initial scan"
            await self._initial_scan()
        self.capture_phase = "running"
        await self.capture.run(self.emit)

    async def _initial_scan(self) -> None:
        """Journal the whole protected state once, batch by batch (bounded memory)."""
        assert self.capture is not None
        batches = initial_scan(self.roots, self.filters, self.manifest, reader=self.capture.reader)
        count = 0
        while True:
            # The scan commits manifest records for a batch only when asked for the next
            # one, that is after the journal holds the batch.
            batch = await asyncio.to_thread(next, batches, None)
            if batch is None:
                break
            await self.emit(batch)
            count += len(batch)
            self.scan_entries = count
        await self.flush_emitted()
        self.store.set("initial_scan_done", True)
        self.store.event("initial-scan", f"initial scan journaled {count} entries")

    async def emit(self, entries: list[Entry]) -> None:
        """Hand captured or repair entries to the journal writer: the one way bytes leave.

        Returns once the batch is queued (a few batches at most), so capture reads the next
        files while the journal writes these; ``flush_emitted`` waits for the journal.
        """
        if entries:
            await self._emitted.put(entries)

    async def flush_emitted(self) -> None:
        await self._emitted.join()

    async def _journal_writer(self) -> None:
        while True:
            entries = await self._emitted.get()
            try:
                await self._append_entries(entries)
            finally:
                self._emitted.task_done()

    async def _append_entries(self, entries: list[Entry]) -> None:
        journal = self.journal
        assert journal is not None
        async with self._emit_lock:
            nbytes = sum(e.payload_bytes() for e in entries) + 64 * len(entries)
            await self._make_room(journal, nbytes)
            await self._wait_for_passives(journal, nbytes)
            try:
                _first, last = await asyncio.to_thread(self._append, journal, entries)
            except (JournalError, OSError) as exc:
                # A full or failing state disk: the changes stay on this node's files and a
                # full check sends them once the journal accepts writes again.
                if str(exc) != self.journal_error:
                    log.error("journal append failed, a full check will follow: %s", exc)
                self.journal_error = str(exc)
                for sender in self.senders.values():
                    sender.state.require_check("full")
                return
            if self.journal_error:
                self.journal_error = ""
                for sender in self.senders.values():
                    if sender.state.connected:
                        await self._peer_connected(sender.state)
            self.appends.record(last, nbytes, time.monotonic())
            self._journal_dirty.set()

    async def _make_room(self, journal: Journal, incoming: int) -> None:
        """Keep the bound from dropping records a connected passive is still taking.

        The bound exists for passives that are gone or stuck; one that is connected and
        acknowledging is waited for instead (capture slows to its pace), with what it has
        persisted trimmed as it goes. After ``peer_timeout`` without room, the bound decides.
        """
        bound = self.cluster.replication.journal_max
        if journal.total_bytes + incoming <= bound:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.cluster.channel.peer_timeout):
                while journal.total_bytes + incoming > bound:
                    connected = [s.state for s in self.senders.values() if s.state.connected]
                    taking = [state for state in connected if state.persisted < journal.head]
                    if not taking:
                        return
                    floor = min(state.persisted for state in connected)
                    if floor >= journal.first:
                        await asyncio.to_thread(journal.discard_through, floor)
                        self.appends.forget_through(floor)
                        if journal.total_bytes + incoming <= bound:
                            return
                    self._acked.clear()
                    await self._acked.wait()

    async def _wait_for_passives(self, journal: Journal, incoming: int) -> None:
        """Write-behind backpressure: while the journal's memory is full, wait for the
        passives to persist (capture slows to their pace) rather than write records to this
        disk that they are about to take anyway.

        Only while every passive is connected and taking records, and for at most
        ``WRITE_BEHIND_WAIT`` per batch: a passive that cannot make room by then (a slow
        link) gets the oldest records from disk, and capture never stalls long enough for
        the kernel's event queue to fill.
        """
        if not journal.write_behind or journal.pending_bytes + incoming <= journal.pending_max:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(WRITE_BEHIND_WAIT):
                while journal.pending_bytes + incoming > journal.pending_max:
                    states = [sender.state for sender in self.senders.values()]
                    if not states or not all(
                        state.connected and state.persisted < journal.head for state in states
                    ):
                        return
                    self._acked.clear()
                    await self._acked.wait()
                    await self._skip_persisted(journal)

    def _append(self, journal: Journal, entries: list[Entry]) -> tuple[int, int]:
        return journal.append(self.epoch, entries)

    async def _sync_journal(self) -> None:
        """Group commit of the journal, beside capture, for what no passive holds yet.

        A record every passive has persisted is durable already (on the passives); only the
        rest needs this node's disk. With ``fsync = "batch"`` the journal holds new records
        in memory (write-behind): as acknowledgements arrive, the records every passive has
        persisted are dropped unwritten, so file data costs this node no second write. The
        syncer gives the passives ``JOURNAL_SYNC_DELAY`` to acknowledge the head; what some
        passive has not persisted by then is written and fsynced. After a crash the
        restart's full check covers whatever was in neither place. Policy "always" writes
        and syncs every append in the journal itself; "never" writes without syncing.
        """
        assert self.journal is not None
        journal = self.journal
        while True:
            await self._journal_dirty.wait()
            self._journal_dirty.clear()
            if self.cluster.replication.fsync != "batch":
                continue
            target = journal.head
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(JOURNAL_SYNC_DELAY):
                    while True:
                        await self._skip_persisted(journal)
                        if self._persisted_everywhere(target):
                            break
                        self._acked.clear()
                        await self._acked.wait()
            await self._skip_persisted(journal)
            if self._persisted_everywhere(target):
                continue
            try:
                await asyncio.to_thread(journal.flush, target)
                await asyncio.to_thread(journal.sync)
            except (JournalError, OSError) as exc:
                log.error("journal sync failed: %s", exc)
                self.journal_error = str(exc)
                for sender in self.senders.values():
                    sender.state.require_check("full")

    async def _skip_persisted(self, journal: Journal) -> None:
        """Drop from the journal's memory what every passive has persisted."""
        states = [sender.state for sender in self.senders.values()]
        if not states or not all(state.connected for state in states):
            return
        floor = min(state.persisted for state in states)
        if journal.pending_bytes:
            await asyncio.to_thread(journal.skip_through, floor)

    def _persisted_everywhere(self, seq: int) -> bool:
        return all(s.state.connected and s.state.persisted >= seq for s in self.senders.values())

    def _on_overflow(self) -> None:
        for sender in self.senders.values():
            sender.state.require_check("fast")
            if sender.state.connected and not sender.state.checking:
                self.start_check(node=sender.peer.name, fast=sender.state.needs_check == "fast")

    async def _peer_connected(self, state: PeerState) -> None:
        await asyncio.to_thread(self.store.set, f"needs_check:{state.name}", state.needs_check)
        if state.needs_check and not state.checking:
            self.start_check(node=state.name, fast=state.needs_check == "fast")

    async def _trim_journal(self) -> None:
        """Drop journal segments every passive has persisted (the bound drops the rest)."""
        assert self.journal is not None
        seen: set[str] = set()
        while True:
            await asyncio.sleep(5.0)
            for name, sender in self.senders.items():
                if sender.state.connected:
                    seen.add(name)
            if seen >= set(self.senders):
                floor = min(s.state.persisted for s in self.senders.values())
                await asyncio.to_thread(self.journal.discard_through, floor)
                self.appends.forget_through(floor)

    # ---- passive -----------------------------------------------------------------------

    async def _start_passive(self, tasks: asyncio.TaskGroup) -> None:
        replication = self.cluster.replication
        # The receive queue never drops what it acknowledged: past its bound the receiver
        # stops reading (backpressure), and the active's journal bound takes over.
        queue = ReceiveQueue(
            self.state_dir / "queue",
            max_bytes=UNBOUNDED,
            fsync=replication.fsync,
            segment_bytes=segment_bytes(replication.journal_max),
        )
        applier = Applier(self.roots)
        applier.quarantine_dir = self.quarantine_dir
        applier.recover()
        self.receiver = Receiver(
            me=self.me,
            cluster=self.cluster,
            queue=queue,
            applier=applier,
            store=self.store,
            epoch=lambda: self.epoch,
            handle_request=self._handle_request,
            on_epoch=self.follow_epoch,
        )
        tasks.create_task(self.receiver.apply_loop())
        tasks.create_task(self.receiver.sync_loop())

    async def _handle_request(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        if kind == "list":
            return await check.answer_list(self.roots, self.filters, body)
        raise UsageError(f"unknown request {kind!r}")

    # ---- status ------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        nodes: list[dict[str, Any]] = []
        me: dict[str, Any] = {"name": self.me, "role": self.role, "self": True}
        if self.journal is not None:
            head = self.journal.head
            me.update(state="active", journal_head=head, applied=head)
            nodes.append(me)
            for name, sender in self.senders.items():
                state = sender.state
                nodes.append(
                    {
                        "name": name,
                        "role": "passive",
                        "state": state.state(head),
                        "address": state.address,
                        "received": state.received,
                        "persisted": state.persisted,
                        "applied": state.applied,
                        "queue_bytes": self.appends.bytes_after(state.applied, head),
                        "lag_seconds": round(self.appends.age_after(state.applied, now), 3),
                        "bytes_sent": state.bytes_sent,
                        "error": state.error,
                    }
                )
            journal = {
                "head": head,
                "first": self.journal.first,
                "bytes": self.journal.total_bytes,
                "memory_bytes": self.journal.pending_bytes,  # write-behind: not on disk
                "skipped": self.journal.skipped_records,  # never written: passives had them
            }
        else:
            if self.receiver is not None:
                me.update(self.receiver.status())
                me["state"] = "connected" if self.receiver.connected else "disconnected"
            else:
                me["state"] = "changing role"
            nodes.append(me)
            journal = {}
        return {
            "cluster": self.cluster.cluster.name,
            "node": self.me,
            "role": self.role,
            "epoch": self.epoch,
            "uptime": round(time.time() - self.started, 1),
            "journal": journal,
            "capture": (
                dataclasses.asdict(self.capture.stats)
                | {"phase": self.capture_phase, "initial_scan_entries": self.scan_entries}
                if self.capture
                else {}
            ),
            "nodes": nodes,
            "roles": self.roles_status(),
            "failover_timeout": self.cluster.failover.timeout,
        }


UNBOUNDED = 1 << 62
STOP_FLUSH_TIMEOUT = 10.0
EMIT_QUEUE_BATCHES = 4  # captured batches waiting for the journal writer (backpressure)
JOURNAL_SYNC_DELAY = 1.0  # seconds the passives get to persist a record before we fsync it
WRITE_BEHIND_WAIT = 1.0  # seconds capture waits for the passives while the journal memory is full


def segment_bytes(bound: int) -> int:
    """Segments small enough that the bound drops and trims in steps of an eighth."""
    return max(4 * 1024**2, min(64 * 1024**2, bound // 8))


class _Stopping(Exception):
    pass


class _RoleSwitch(Exception):
    pass


async def run_agent(loaded: Loaded) -> None:
    agent = Agent(loaded)
    with contextlib.suppress(asyncio.CancelledError):
        await agent.run()
