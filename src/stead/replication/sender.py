"""The active's sender: one per passive, streaming the journal over the channel.

Timing duties: every network await sits under a timeout derived from ``peer_timeout``; a
lost connection is retried with backoff forever; nothing here blocks the event loop (journal
reads run in a thread). Ordering duty: records go out strictly in sequence order from the
passive's persisted sequence + 1, so a reconnect resends exactly what the passive lacks and
the passive's queue drops any duplicate. A passive that needs records the journal no longer
holds (beyond the bound, or a history the active does not know) is reset to the journal head
and marked out of sync until a full system check has repaired it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from stead.aio import TaskGroup, first_cause
from stead.channel import messages as m
from stead.channel.transport import Backoff, Connection, connect
from stead.config.schema import ClusterConfig, NodeSection
from stead.errors import ChannelError, ProtocolError, SteadError
from stead.replication.journal import Journal

log = logging.getLogger(__name__)


@dataclass
class PeerState:
    """What the active knows of one passive; the status table shows it."""

    name: str
    connected: bool = False
    address: str = ""
    received: int = 0
    persisted: int = 0
    applied: int = 0
    epoch: int = 0
    needs_check: str | None = None  # "fast" or "full" while the passive may differ
    needs_generation: int = 0  # bumped whenever needs_check is raised: a check clears its own
    checking: bool = False
    last_ack: float = 0.0
    last_heartbeat: float = 0.0
    bytes_sent: int = 0
    error: str = ""
    applied_changed: asyncio.Event = field(default_factory=asyncio.Event)

    def require_check(self, kind: str) -> None:
        """Note that the passive needs a check; "full" outranks "fast"."""
        if self.needs_check != "full":
            self.needs_check = kind
        self.needs_generation += 1

    def synced_to(self, seq: int) -> bool:
        """Applied ``seq`` and nothing known to differ: what wait-sync waits for."""
        return self.connected and self.applied >= seq and not (self.needs_check or self.checking)

    def state(self, head: int) -> str:
        if not self.connected:
            return "disconnected"
        if self.needs_check or self.checking:
            return "out of sync"
        return "in sync" if self.applied >= head else "syncing"


class Sender:
    def __init__(
        self,
        *,
        me: str,
        peer: NodeSection,
        cluster: ClusterConfig,
        journal: Journal,
        ssl_context: ssl.SSLContext,
        epoch: Callable[[], int],
        on_connected: Callable[[PeerState], Coroutine[Any, Any, None]],
        on_ack: Callable[[], None] | None = None,
        lineage: Callable[[], tuple[int, int]] = lambda: (-1, -1),
    ) -> None:
        self.me = me
        self.peer = peer
        self.cluster = cluster
        self.journal = journal
        self.ssl_context = ssl_context
        self.epoch = epoch
        self.on_connected = on_connected
        self.on_ack = on_ack
        self.lineage = lineage  # (base, epoch before it) where this node's journal began
        self.state = PeerState(peer.name)
        self._conn: Connection | None = None
        self._pending: dict[int, asyncio.Future[m.Reply]] = {}
        self._ids = itertools.count(1)

    async def run(self) -> None:
        """Keep a session with the passive open, forever."""
        backoff = Backoff(initial=0.1, maximum=3.0)
        addresses = itertools.cycle(self.peer.addresses)
        while True:
            address = next(addresses)
            try:
                await self._session(address, backoff)
            except (SteadError, OSError, TimeoutError, ssl.SSLError) as exc:
                if self.state.connected or self.state.error != str(exc):
                    log.info("channel to %s (%s) lost: %s", self.peer.name, address, exc)
                self.state.error = str(exc) or type(exc).__name__
            finally:
                self.state.connected = False
                self._conn = None
                for future in self._pending.values():
                    if not future.done():
                        future.set_exception(ChannelError(f"channel to {self.peer.name} lost"))
                self._pending.clear()
            await asyncio.sleep(backoff.next_delay())

    async def _session(self, address: str, backoff: Backoff) -> None:
        channel = self.cluster.channel
        conn = await connect(
            address,
            channel.port,
            self.ssl_context,
            expected_peer=self.peer.name,
            timeout=channel.connect_timeout,
            max_frame=channel.max_frame,
            compression=channel.compression,
        )
        try:
            await conn.send(self._hello())
            hello = await conn.recv(timeout=channel.peer_timeout)
            if not isinstance(hello, m.Hello):
                raise ProtocolError(f"expected hello, got {type(hello).__name__}")
            if hello.cluster_id != self.cluster.cluster.id:
                raise ProtocolError(f"{self.peer.name} belongs to another cluster")
            self._conn = conn
            state = self.state
            state.address, state.epoch = address, hello.epoch
            state.received = state.persisted = hello.persisted_seq
            state.applied = hello.applied_seq
            state.connected, state.error = True, ""
            state.last_ack = time.monotonic()
            backoff.reset()
            log.info(
                "channel to %s (%s) up: persisted %d, applied %d, journal %d..%d",
                self.peer.name,
                address,
                hello.persisted_seq,
                hello.applied_seq,
                self.journal.first,
                self.journal.head,
            )
            try:
                async with TaskGroup() as tasks:
                    tasks.create_task(self._read_loop(conn))
                    await self._join(hello)
                    tasks.create_task(self._pump(conn, hello.tail_records))
                    tasks.create_task(self._heartbeats(conn))
                    tasks.create_task(self.on_connected(state))
            except BaseExceptionGroup as group:
                raise first_cause(group) from None
        finally:
            await conn.close()

    def abort(self) -> None:
        """Drop the session at once (this node is changing role; the passive may be gone)."""
        if self._conn is not None:
            self._conn.abort()

    async def _join(self, hello: m.Hello) -> None:
        """Continue the passive where it stands, or reset it (a full check follows).

        A position from an older epoch continues only where this node's journal began
        (``lineage``): that history both nodes share. Anything else (ahead of it, behind
        it, another epoch's records) may differ, so the passive is reset and checked.
        """
        epoch = self.epoch()
        lineage = hello.lineage if hello.lineage >= 0 else hello.epoch
        if lineage != epoch:
            base, predecessor = self.lineage()
            if lineage == predecessor and hello.persisted_seq == base:
                await self.request("adopt", {"epoch": epoch})
                log.info("%s continues from %d into epoch %d", self.peer.name, base, epoch)
                return
            log.warning(
                "%s stands at %d of epoch %d; this journal began at %d of epoch %d",
                self.peer.name,
                hello.persisted_seq,
                lineage,
                base,
                predecessor,
            )
            await self._reset_passive()
            return
        if hello.persisted_seq > self.journal.head or (
            hello.persisted_seq + 1 < self.journal.first
        ):
            await self._reset_passive()

    async def _reset_passive(self) -> None:
        """The passive cannot continue from its queue: start it at our head, then check."""
        head = self.journal.head
        log.warning(
            "%s persisted %d but the journal holds %d..%d: reset to %d, full check due",
            self.peer.name,
            self.state.persisted,
            self.journal.first,
            head,
            head,
        )
        await self.request("reset", {"base": head, "epoch": self.epoch()})
        self.state.received = self.state.persisted = self.state.applied = head
        self.state.require_check("full")

    def _hello(self) -> m.Hello:
        return m.Hello(
            protocol=m.PROTOCOL_VERSION,
            cluster_id=self.cluster.cluster.id,
            node=self.me,
            epoch=self.epoch(),
            role="active",
            applied_seq=self.journal.head,
            persisted_seq=self.journal.head,
            journal_head=self.journal.head,
            lineage=self.epoch(),
        )

    async def _pump(self, conn: Connection, as_tail: bool = False) -> None:
        """Send journal records from where the passive stands, as they arrive (``as_tail``:
        the payloads as the frame's raw tail, for a passive that said it takes them)."""
        position = self.state.persisted + 1
        batch_bytes = self.cluster.replication.batch_bytes
        while True:
            if position > self.journal.head:
                with contextlib.suppress(TimeoutError):
                    await self.journal.wait_beyond(position - 1, timeout=1.0)
                continue
            if position < self.journal.first:
                # The bound dropped records this passive still needed while it was connected.
                await self._reset_passive()
                position = self.state.persisted + 1
                continue
            records = await asyncio.to_thread(self.journal.read_from, position, batch_bytes)
            if not records:
                continue
            if records[0][0] != position:
                # The bound dropped records between our check and the read: never skip.
                await self._reset_passive()
                position = self.state.persisted + 1
                continue
            await conn.send(m.Records(epoch=self.epoch(), records=records, as_tail=as_tail))
            self.state.bytes_sent += sum(len(payload) for _, payload in records)
            position = records[-1][0] + 1

    async def _heartbeats(self, conn: Connection) -> None:
        interval = self.cluster.channel.heartbeat
        while True:
            await conn.send(
                m.Heartbeat(
                    epoch=self.epoch(),
                    role="active",
                    sent_at=time.time(),
                    journal_head=self.journal.head,
                    applied_seq=self.journal.head,
                )
            )
            await asyncio.sleep(interval)

    async def _read_loop(self, conn: Connection) -> None:
        timeout = self.cluster.channel.peer_timeout
        while True:
            message = await conn.recv(timeout=timeout)
            now = time.monotonic()
            if isinstance(message, m.Ack):
                state = self.state
                state.received = max(state.received, message.received)
                state.persisted = max(state.persisted, message.persisted)
                if message.applied > state.applied:
                    state.applied = message.applied
                    state.applied_changed.set()
                    state.applied_changed = asyncio.Event()
                state.last_ack = now
                if self.on_ack is not None:
                    self.on_ack()
                if message.out_of_sync and not state.checking and state.needs_check != "full":
                    state.require_check("full")
                    await self.on_connected(state)  # starts the check
            elif isinstance(message, m.Heartbeat):
                self.state.last_heartbeat = now
            elif isinstance(message, m.Reply):
                future = self._pending.pop(message.id, None)
                if future is not None and not future.done():
                    future.set_result(message)
            elif isinstance(message, m.Error):
                raise ChannelError(f"{self.peer.name} says {message.code}: {message.message}")
            else:
                raise ProtocolError(f"unexpected {type(message).__name__} from a passive")

    async def request(self, kind: str, body: dict[str, Any], timeout: float = 60.0) -> m.Reply:
        """Ask the passive something over the open channel and wait for its reply."""
        conn = self._conn
        if conn is None:
            raise ChannelError(f"{self.peer.name} is not connected")
        request_id = next(self._ids)
        future: asyncio.Future[m.Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            await conn.send(m.Request(id=request_id, kind=kind, body=body))
            async with asyncio.timeout(timeout):
                reply = await future
        finally:
            self._pending.pop(request_id, None)
        if not reply.ok:
            raise ChannelError(f"{self.peer.name} refused {kind}: {reply.error}")
        return reply

    async def wait_applied(self, seq: int, timeout: float, *, settled: bool = False) -> bool:
        """True once the passive has applied ``seq`` (and, if ``settled``, has no check due).

        False on timeout or disconnection.
        """

        def done() -> bool:
            return self.state.synced_to(seq) if settled else self.state.applied >= seq

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not done():
                    if not self.state.connected:
                        return False
                    event = self.state.applied_changed
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.5):
                            await event.wait()
        return done()
