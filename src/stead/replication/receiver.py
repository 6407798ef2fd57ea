"""The passive's receiver and applier loop.

Durability duty: a record is acknowledged as *persisted* only after the receive queue has
been synced according to the fsync policy, and as *applied* only after the applier's commit
callback has stored the applied mark in SQLite (``synchronous=FULL``). On restart the
applier resumes from that mark, so no entry is lost and none is applied twice out of order.
Timing duty: the connection is dropped when the active is silent for ``peer_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from stead.aio import first_cause
from stead.channel import messages as m
from stead.channel.transport import Connection
from stead.config.schema import ClusterConfig
from stead.errors import ApplyError, OutOfSync, ProtocolError, SteadError
from stead.replication.applier import Applier
from stead.replication.entries import Entry
from stead.replication.journal import ReceiveQueue, decode_record
from stead.store.db import StateStore

log = logging.getLogger(__name__)

APPLIED_KEY = "applied_seq"
TRIM_EVERY = 1000  # applied records between attempts to drop applied queue segments
RequestHandler = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]


class Receiver:
    def __init__(
        self,
        *,
        me: str,
        cluster: ClusterConfig,
        queue: ReceiveQueue,
        applier: Applier,
        store: StateStore,
        epoch: Callable[[], int],
        handle_request: RequestHandler,
    ) -> None:
        self.me = me
        self.cluster = cluster
        self.queue = queue
        self.applier = applier
        self.store = store
        self.epoch = epoch
        self.handle_request = handle_request
        self.applied: int = int(store.get(APPLIED_KEY, queue.first - 1 if queue.head else 0))
        self.active_name: str = ""
        self.connected = False
        self.last_heartbeat = 0.0
        self.active_head = 0
        self.apply_error = ""
        self.refused = 0
        self._queued = asyncio.Event()
        self._progress = asyncio.Event()
        self._current: Connection | None = None

    # ---- applier -----------------------------------------------------------------------

    async def apply_loop(self) -> None:
        """Apply the receive queue in order, forever; a failure is retried, never skipped."""
        while True:
            if self.queue.head <= self.applied:
                self._queued.clear()
                if self.queue.head <= self.applied:
                    await self._queued.wait()
                continue
            try:
                await asyncio.to_thread(self._apply_some)
                self.apply_error = ""
                if self.queue.first <= self.applied - TRIM_EVERY:
                    await asyncio.to_thread(self.queue.discard_through, self.applied)
            except (ApplyError, OutOfSync, OSError) as exc:
                if str(exc) != self.apply_error:
                    log.error("apply stalled at %d: %s", self.applied + 1, exc)
                    self.store.event("apply", f"apply stalled: {exc}", level="error")
                self.apply_error = str(exc)
                await asyncio.sleep(1.0)  # a full disk or a missing base: retry until repaired
            self._progress.set()

    def _apply_some(self) -> None:
        raw = self.queue.read_from(self.applied + 1, max_bytes=32 * 1024**2, max_records=2000)
        if not raw:
            # The queue no longer holds what we need (reset while we were applying).
            self.applied = max(self.applied, self.queue.first - 1)
            return
        records: list[tuple[int, Entry]] = []
        for seq, payload in raw:
            try:
                records.append((seq, decode_record(payload)[1]))
            except ProtocolError as exc:
                self._refuse(seq, None, exc)  # malformed: refused, never applied
        self.applier.apply(records, commit=self._commit, on_refused=self._refuse)
        self._commit(raw[-1][0])

    def _commit(self, seq: int) -> None:
        if seq > self.applied:
            self.store.set(APPLIED_KEY, seq)
            self.applied = seq

    def _refuse(self, seq: int, entry: Entry | None, exc: Exception) -> None:
        self.refused += 1
        path = entry.path if entry is not None else "?"
        log.error("refused entry %d (%s): %s", seq, path, exc)
        self.store.event("refused", f"entry {seq} refused: {exc}", level="error", path=path)

    # ---- channel -----------------------------------------------------------------------

    async def serve_connection(self, conn: Connection) -> None:
        """One session with the active; a newer session replaces an older one."""
        timeout = self.cluster.channel.peer_timeout
        hello = await conn.recv(timeout=timeout)
        if not isinstance(hello, m.Hello):
            raise ProtocolError(f"expected hello, got {type(hello).__name__}")
        if hello.cluster_id != self.cluster.cluster.id:
            await conn.send(m.Error(code="cluster", message="wrong cluster id"))
            raise ProtocolError(f"{conn.peer_name} belongs to another cluster")
        if hello.node != conn.peer_name:
            raise ProtocolError(f"certificate says {conn.peer_name}, hello says {hello.node}")
        await conn.send(
            m.Hello(
                protocol=m.PROTOCOL_VERSION,
                cluster_id=self.cluster.cluster.id,
                node=self.me,
                epoch=self.epoch(),
                role="passive",
                applied_seq=self.applied,
                persisted_seq=self.queue.head,
                journal_head=self.queue.head,
            )
        )
        previous, self._current = self._current, conn
        if previous is not None:
            await previous.close()
        self.active_name, self.connected = hello.node, True
        self.last_heartbeat = time.monotonic()
        log.info("active %s connected (epoch %d)", hello.node, hello.epoch)
        try:
            async with asyncio.TaskGroup() as tasks:
                acks = tasks.create_task(self._ack_loop(conn))
                try:
                    await self._read_loop(conn, timeout)
                finally:
                    acks.cancel()
        except BaseExceptionGroup as group:
            raise first_cause(group) from None
        finally:
            if self._current is conn:
                self._current, self.connected = None, False

    async def _read_loop(self, conn: Connection, timeout: float) -> None:
        while True:
            message = await conn.recv(timeout=timeout)
            self.last_heartbeat = time.monotonic()
            if isinstance(message, m.Records):
                await self._room_for_more()
                await asyncio.to_thread(self._persist, message.records)
                self._queued.set()
                self._progress.set()
            elif isinstance(message, m.Heartbeat):
                self.active_head = message.journal_head
                await conn.send(self._ack())
            elif isinstance(message, m.Request):
                await conn.send(await self._answer(message))
            elif isinstance(message, m.Error):
                log.warning("active says %s: %s", message.code, message.message)
                return
            else:
                raise ProtocolError(f"unexpected {type(message).__name__} from the active")

    async def _room_for_more(self) -> None:
        """Backpressure: past the bound, stop reading until the applier catches up.

        The active keeps hearing our acks (the ack loop runs on), so the channel stays up;
        its sender blocks on the full socket, and its journal bound decides what follows.
        """
        bound = self.cluster.replication.journal_max
        while self.queue.total_bytes > bound and self.queue.head > self.applied:
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._progress.wait()

    def _persist(self, records: list[tuple[int, bytes]]) -> None:
        self.queue.append(records)
        if self.cluster.replication.fsync != "never":
            self.queue.sync()

    async def _answer(self, request: m.Request) -> m.Reply:
        try:
            if request.kind == "reset":
                base = request.body.get("base")
                if not isinstance(base, int) or base < 0:
                    raise ProtocolError("reset needs a non-negative base")
                await asyncio.to_thread(self._reset, base)
                body: dict[str, Any] = {"base": base}
            else:
                body = await self.handle_request(request.kind, request.body)
            return m.Reply(id=request.id, ok=True, body=body, error="")
        except SteadError as exc:
            return m.Reply(id=request.id, ok=False, body={}, error=str(exc))

    def _reset(self, base: int) -> None:
        self.queue.reset(base)
        self.store.set(APPLIED_KEY, base)
        self.applied = base
        self.store.event("reset", f"receive queue reset to {base}; a check follows")

    def _ack(self) -> m.Ack:
        head = self.queue.head
        return m.Ack(received=head, persisted=head, applied=self.applied)

    async def _ack_loop(self, conn: Connection) -> None:
        """Acknowledge persisted and applied progress as it happens, coalesced."""
        last: tuple[int, int] = (-1, -1)
        while True:
            self._progress.clear()
            current = (self.queue.head, self.applied)
            if current != last:
                await conn.send(self._ack())
                last = current
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cluster.channel.heartbeat):
                    await self._progress.wait()

    def status(self) -> dict[str, Any]:
        return {
            "active": self.active_name,
            "connected": self.connected,
            "persisted": self.queue.head,
            "applied": self.applied,
            "queue_bytes": self.queue.total_bytes,
            "heartbeat_age": round(time.monotonic() - self.last_heartbeat, 3)
            if self.last_heartbeat
            else None,
            "apply_error": self.apply_error,
            "refused": self.refused,
        }
