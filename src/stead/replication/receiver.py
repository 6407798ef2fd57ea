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
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from stead.aio import TaskGroup, first_cause
from stead.channel import messages as m
from stead.channel.transport import Connection
from stead.config.schema import ClusterConfig
from stead.errors import OutOfSync, ProtocolError, SteadError
from stead.replication.applier import Applier
from stead.replication.entries import Entry
from stead.replication.journal import ReceiveQueue, decode_record
from stead.store.db import StateStore

log = logging.getLogger(__name__)

APPLIED_KEY = "applied_seq"
OUT_OF_SYNC_KEY = "out_of_sync"
RESET_KEY = "reset_pending"
PEER_EPOCH_KEY = "active_epoch"
LINEAGE_KEY = "lineage"  # the epoch whose history our position belongs to
CHECK_DUE_KEY = "check_due"  # reset: a full check must still repair what may differ
QUARANTINE_KEY = "quarantine"  # set while divergent files must be kept before repair
WROTE_KEY = "wrote_lineage"  # the epoch in which this node itself was the active
TRIM_EVERY = 1000  # applied records between attempts to drop applied queue segments
APPLY_BYTES = 32 * 1024**2  # file data per applier batch (one group commit)
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
        on_epoch: Callable[[int], None] | None = None,
    ) -> None:
        self.me = me
        self.cluster = cluster
        self.queue = queue
        self.applier = applier
        self.store = store
        self.epoch = epoch
        self.handle_request = handle_request
        self.on_epoch = on_epoch
        self.active_name: str = ""
        self.connected = False
        self.last_heartbeat = 0.0
        self.active_head = 0
        self.apply_error = ""
        self.refused = 0
        self.spilled_bytes = 0  # records written to the queue because memory was full
        self._queued = asyncio.Event()
        self._progress = asyncio.Event()
        self._unsynced = asyncio.Event()
        self._current: Connection | None = None
        self._lock = threading.RLock()  # one of: applying a batch, a reset
        # Records the applier takes straight from memory (written once, to their files);
        # the queue takes over ("spills") while the applier is behind.
        self._memory: deque[tuple[int, bytes]] = deque()
        self._memory_lock = threading.Lock()
        self._memory_bytes = 0
        self._finish_reset()
        self.applied: int = int(store.get(APPLIED_KEY, queue.first - 1 if queue.head else 0))
        self.memory_head = self.applied
        self.out_of_sync = bool(store.get(OUT_OF_SYNC_KEY, False))
        self.lineage = int(store.get(LINEAGE_KEY, epoch()))
        self.check_due = bool(store.get(CHECK_DUE_KEY, False))
        self.applier.quarantine = store.get(QUARANTINE_KEY)

    @property
    def in_sync(self) -> bool:
        """Nothing known to differ from the active's history (lag aside)."""
        return not (self.out_of_sync or self.check_due)

    async def wait_applied_all(self) -> None:
        """Return once everything received and made durable has been applied."""
        while self._pending() or self.applied < self.persisted:
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await self._progress.wait()

    async def close(self) -> None:
        """End the session with the active (this node is changing role)."""
        current, self._current = self._current, None
        self.connected = False
        if current is not None:
            current.abort()  # the active may be dead: a role change must not wait for it

    # ---- applier -----------------------------------------------------------------------

    async def apply_loop(self) -> None:
        """Apply received records in order, forever; a failure is retried, never skipped.

        Records come from memory while the applier keeps up: they are written once, to
        their files, and acknowledged as persisted once applied. While the applier is
        behind, the receiver spills them to the queue, and only records the queue has made
        durable are applied from it. Either way the applied mark never runs ahead of what
        a restart can find (in the files, or in the queue).
        """
        while True:
            if not self._pending():
                self._queued.clear()
                if not self._pending():
                    await self._queued.wait()
                continue
            try:
                before = self.applied
                await asyncio.to_thread(self._apply_some)
                self.apply_error = ""
                if self.applied == before:
                    # The next record waits for the queue's sync: wait for it, do not spin.
                    self._queued.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(0.05):
                            await self._queued.wait()
                if self.queue.first <= self.applied - TRIM_EVERY:
                    await asyncio.to_thread(self.queue.discard_through, self.applied)
            except Exception as exc:  # a full disk, a broken queue: stall and retry, loudly
                if str(exc) != self.apply_error:
                    log.error("apply stalled at %d: %s", self.applied + 1, exc)
                    with contextlib.suppress(Exception):
                        self.store.event("apply", f"apply stalled: {exc}", level="error")
                self.apply_error = str(exc) or type(exc).__name__
                await asyncio.sleep(1.0)  # nothing to await: the cause is outside us
            self._progress.set()

    def _pending(self) -> bool:
        return bool(self._memory) or self._queue_durable() > self.applied

    def _queue_durable(self) -> int:
        if self.cluster.replication.fsync == "never":
            return self.queue.head
        return self.queue.synced

    @property
    def persisted(self) -> int:
        """Durable here: applied, or in the queue and synced (fsync "never": in the queue)."""
        return max(self._queue_durable(), self.applied)

    @property
    def head(self) -> int:
        """The last record received, wherever it is held."""
        return max(self.queue.head, self.memory_head, self.applied)

    @property
    def spilling(self) -> bool:
        """The queue holds records not yet applied: new ones must queue behind them."""
        return self.queue.head > self.applied

    def _take_memory(self) -> list[tuple[int, bytes]]:
        with self._memory_lock:
            taken: list[tuple[int, bytes]] = []
            size = 0
            for seq, payload in itertools.islice(self._memory, 2000):
                if taken and size + len(payload) > APPLY_BYTES:
                    break
                taken.append((seq, payload))
                size += len(payload)
            return taken

    def _drop_memory_through(self, seq: int) -> None:
        with self._memory_lock:
            while self._memory and self._memory[0][0] <= seq:
                self._memory_bytes -= len(self._memory.popleft()[1])

    def _apply_some(self) -> None:
        with self._lock:
            raw = [(q, p) for q, p in self._take_memory() if q > self.applied]
            gap = bool(raw) and raw[0][0] != self.applied + 1
            from_memory = bool(raw) and not gap
            if not from_memory:
                memory, raw = raw, []
                self._drop_memory_through(self.applied)
                limit = self._queue_durable()
                queued = self.queue.read_from(
                    self.applied + 1, max_bytes=APPLY_BYTES, max_records=2000
                )
                raw = [(seq, payload) for seq, payload in queued if seq <= limit]
                if (raw and raw[0][0] != self.applied + 1) or (
                    gap and not raw and self.queue.head <= self.applied
                ):
                    # Neither memory nor the queue holds the next record. Never skip it
                    # silently: the active runs a full check that repairs what it carried.
                    first = raw[0][0] if raw else memory[0][0]
                    log.error("receive gap: %d..%d lost", self.applied + 1, first - 1)
                    self._flag_out_of_sync(f"records {self.applied + 1}..{first - 1} lost")
                    if not raw:
                        raw, from_memory = memory, True
            if not raw:
                return
            records: list[tuple[int, Entry]] = []
            for seq, payload in raw:
                try:
                    records.append((seq, decode_record(payload)[1]))
                except ProtocolError as exc:
                    self._refuse(seq, None, exc)  # malformed: refused, never applied
            self.applier.apply(records, commit=self._commit, on_refused=self._refuse)
            self._commit(raw[-1][0])
            if from_memory:
                self._drop_memory_through(raw[-1][0])

    def _commit(self, seq: int) -> None:
        with self._lock:
            if seq > self.applied:
                self.store.set(APPLIED_KEY, seq)
                self.applied = seq

    def _refuse(self, seq: int, entry: Entry | None, exc: Exception) -> None:
        """An entry that cannot be applied is skipped; the passive then needs a check."""
        path = entry.path if entry is not None else "?"
        if isinstance(exc, OutOfSync):
            # The passive differs from what the active assumed (a file deleted here, say).
            # Holding the queue would hold the check's repairs behind this entry too.
            log.warning("skipped entry %d (%s): %s", seq, path, exc)
            self._flag_out_of_sync(str(exc))
            return
        self.refused += 1
        log.error("refused entry %d (%s): %s", seq, path, exc)
        self.store.event("refused", f"entry {seq} refused: {exc}", level="error", path=path)

    def _flag_out_of_sync(self, why: str) -> None:
        if not self.out_of_sync:
            self.store.set(OUT_OF_SYNC_KEY, True)
            self.store.event("out-of-sync", f"out of sync, a check is needed: {why}")
        self.out_of_sync = True  # the next ack says so (the apply loop wakes the ack loop)

    # ---- channel -----------------------------------------------------------------------

    async def serve_connection(self, conn: Connection, hello: m.Hello) -> None:
        """One session with the active; a newer session replaces an older one."""
        timeout = self.cluster.channel.peer_timeout
        if hello.cluster_id != self.cluster.cluster.id:
            await conn.send(m.Error(code="cluster", message="wrong cluster id"))
            raise ProtocolError(f"{conn.peer_name} belongs to another cluster")
        if hello.node != conn.peer_name:
            raise ProtocolError(f"certificate says {conn.peer_name}, hello says {hello.node}")
        m.check_protocol(hello)
        if hello.role != "active":
            raise ProtocolError(f"{hello.node} is {hello.role}; only the active streams to us")
        seen = max(int(self.store.get(PEER_EPOCH_KEY, 0)), self.epoch())
        if hello.epoch < seen:
            await conn.send(m.Error(code="epoch", message=f"epoch {hello.epoch} < {seen}"))
            raise ProtocolError(f"{hello.node} has epoch {hello.epoch}, we follow epoch {seen}")
        if hello.epoch > int(self.store.get(PEER_EPOCH_KEY, 0)):
            self.store.set(PEER_EPOCH_KEY, hello.epoch)
        if self.on_epoch is not None:
            self.on_epoch(hello.epoch)
        await conn.send(
            m.Hello(
                protocol=m.PROTOCOL_VERSION,
                cluster_id=self.cluster.cluster.id,
                node=self.me,
                epoch=self.epoch(),
                role="passive",
                applied_seq=self.applied,
                persisted_seq=self.persisted,
                journal_head=self.head,
                lineage=self.lineage,
                tail_records=True,
            )
        )
        previous, self._current = self._current, conn
        if previous is not None:
            await previous.close()
        self.active_name, self.connected = hello.node, True
        self.last_heartbeat = time.monotonic()
        log.info("active %s connected (epoch %d)", hello.node, hello.epoch)
        try:
            async with TaskGroup() as tasks:
                acks = tasks.create_task(self._ack_loop(conn))
                try:
                    await self._read_loop(conn, timeout, tasks)
                finally:
                    acks.cancel()
        except BaseExceptionGroup as group:
            raise first_cause(group) from None
        finally:
            if self._current is conn:
                self._current, self.connected = None, False

    async def _read_loop(self, conn: Connection, timeout: float, tasks: asyncio.TaskGroup) -> None:
        while True:
            message = await conn.recv(timeout=timeout)
            self.last_heartbeat = time.monotonic()
            if isinstance(message, m.Records):
                await self._room_for_more()
                head = self.head
                fresh = [(seq, payload) for seq, payload in message.records if seq > head]
                if not fresh:
                    continue  # a resend of what we hold already
                if fresh[0][0] > head + 1:
                    # A gap: the active's journal dropped what we needed. Never skip it.
                    await conn.send(m.Error(code="gap", message=f"need {head + 1}"))
                    raise ProtocolError(f"records start at {fresh[0][0]}, we hold {head}")
                await self._hold(fresh)
            elif isinstance(message, m.Heartbeat):
                self.active_head = message.journal_head
                await conn.send(self._ack())
            elif isinstance(message, m.Request):
                # Answered aside: hashing a listing must not stop records flowing.
                tasks.create_task(self._answer_and_send(conn, message))
            elif isinstance(message, m.Error):
                log.warning("active says %s: %s", message.code, message.message)
                return
            else:
                raise ProtocolError(f"unexpected {type(message).__name__} from the active")

    async def _hold(self, records: list[tuple[int, bytes]]) -> None:
        """Hand records to the applier in memory, or spill them to the queue while it is
        behind (and keep spilling until it has caught up with the queue)."""
        size = sum(len(payload) for _, payload in records)
        room = self.cluster.replication.receive_memory
        if not self.spilling and self._memory_bytes + size <= room:
            with self._memory_lock:
                self._memory.extend(records)
                self._memory_bytes += size
            self.memory_head = records[-1][0]
            self._queued.set()
            return
        await asyncio.to_thread(self.queue.append, records)
        self.spilled_bytes += size
        self._unsynced.set()  # the sync loop makes them durable, then they are acked

    async def _room_for_more(self) -> None:
        """Backpressure: past the bound, stop reading until the applier catches up.

        The active keeps hearing our acks (the ack loop runs on), so the channel stays up;
        its sender blocks on the full socket, and its journal bound decides what follows.
        """
        bound = self.cluster.replication.journal_max
        while self.queue.total_bytes > bound and self.spilling:
            self._progress.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._progress.wait()

    async def sync_loop(self) -> None:
        """Group commit of the receive queue: one fsync covers every frame that arrived
        meanwhile, while the read loop goes on reading (network and disk overlap)."""
        while True:
            await self._unsynced.wait()
            self._unsynced.clear()
            if self.cluster.replication.fsync != "never":
                await asyncio.to_thread(self.queue.sync)
            self._queued.set()
            self._progress.set()

    async def _answer_and_send(self, conn: Connection, request: m.Request) -> None:
        reply = await self._answer(request)
        with contextlib.suppress(SteadError):  # the channel dropped: the active asks again
            await conn.send(reply)

    async def _answer(self, request: m.Request) -> m.Reply:
        try:
            if request.kind == "reset":
                base = request.body.get("base")
                if not isinstance(base, int) or base < 0:
                    raise ProtocolError("reset needs a non-negative base")
                epoch = request.body.get("epoch", self.lineage)
                if not isinstance(epoch, int) or epoch < 0:
                    raise ProtocolError("reset needs a non-negative epoch")
                await asyncio.to_thread(self._reset, base, epoch)
                body: dict[str, Any] = {"base": base}
            elif request.kind == "adopt":
                epoch = request.body.get("epoch")
                if not isinstance(epoch, int) or epoch < self.lineage:
                    raise ProtocolError("adopt needs an epoch not below ours")
                self.lineage = epoch
                await asyncio.to_thread(self.store.set, LINEAGE_KEY, epoch)
                body = {}
            elif request.kind == "check-finished":
                self.check_due = False
                self.applier.quarantine = None
                await asyncio.to_thread(
                    self.store.set_many, {CHECK_DUE_KEY: False, QUARANTINE_KEY: None}
                )
                body = {}
            elif request.kind == "check-started":
                # A check now covers whatever made us out of sync until this moment.
                self.out_of_sync = False
                await asyncio.to_thread(self.store.set, OUT_OF_SYNC_KEY, False)
                body = {}
            else:
                body = await self.handle_request(request.kind, request.body)
            return m.Reply(id=request.id, ok=True, body=body, error="")
        except SteadError as exc:
            return m.Reply(id=request.id, ok=False, body={}, error=str(exc))

    def _reset(self, base: int, epoch: int) -> None:
        """Start the queue over at ``base``: an intent first, so a crash finishes it.

        If this node wrote the history it leaves (it was the active of that epoch), the
        files the repairing check replaces are kept in a quarantine first.
        """
        with self._lock:
            values: dict[str, Any] = {RESET_KEY: base, LINEAGE_KEY: epoch, CHECK_DUE_KEY: True}
            if self.store.get(WROTE_KEY) == self.lineage and self.lineage != epoch:
                values[QUARANTINE_KEY] = f"epoch-{epoch}-{int(time.time())}"
            self.store.set_many(values)
            self.lineage, self.check_due = epoch, True
            self._finish_reset()
        self.store.event("reset", f"receive queue reset to {base}; a check follows")

    def _finish_reset(self) -> None:
        base = self.store.get(RESET_KEY)
        if base is None:
            return
        with self._memory_lock:
            self._memory.clear()
            self._memory_bytes = 0
        self.queue.reset(int(base))
        self.store.set_many({APPLIED_KEY: int(base), RESET_KEY: None})
        self.applied = self.memory_head = int(base)
        self.applier.quarantine = self.store.get(QUARANTINE_KEY)

    def _ack(self) -> m.Ack:
        head, persisted = self.head, self.persisted
        return m.Ack(
            received=head,
            persisted=persisted,
            applied=min(self.applied, persisted),
            out_of_sync=self.out_of_sync,
        )

    async def _ack_loop(self, conn: Connection) -> None:
        """Acknowledge persisted and applied progress as it happens, coalesced."""
        last: tuple[int, int, bool] = (-1, -1, False)
        while True:
            self._progress.clear()
            current = (self.persisted, self.applied, self.out_of_sync)
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
            "persisted": self.persisted,
            "out_of_sync": self.out_of_sync,
            "applied": self.applied,
            "queue_bytes": self.queue.total_bytes + self._memory_bytes,
            "heartbeat_age": round(time.monotonic() - self.last_heartbeat, 3)
            if self.last_heartbeat
            else None,
            "apply_error": self.apply_error,
            "refused": self.refused,
            "spilled_bytes": self.spilled_bytes,
            "lineage": self.lineage,
            "in_sync": self.in_sync,
            "quarantine": self.applier.quarantine,
        }
