"""The journal (active side) and the receive queue (passive side): typed segment logs.

A record's payload is msgpack ``[epoch, entry.to_wire()]``, packed and unpacked with
``use_bin_type=True`` and ``unicode_errors="surrogateescape"`` so that Linux file names that are
not UTF-8 survive the trip. Senders ship payloads as stored, without decoding them again.

Timing
    ``append`` returns after one ``writev`` (plus an fsync with ``fsync="always"``); call it and
    ``sync`` from a worker thread in the agent (``asyncio.to_thread``). Waiters in
    ``wait_beyond`` are woken through ``loop.call_soon_threadsafe``, so appends from any thread
    wake coroutines on any event loop.

Atomicity
    As :class:`~stead.replication.segments.SegmentLog`: a record is durable after a ``sync``
    that started after its ``append`` returned, or at once under ``fsync="always"``. The
    receive queue defaults to ``"always"`` because ``persisted`` is what the passive
    acknowledges as persisted.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import msgpack

from stead.errors import JournalError, ProtocolError
from stead.replication.entries import Entry
from stead.replication.segments import FsyncPolicy, SegmentLog

DEFAULT_MAX_BYTES = 10 * 1024 * 1024 * 1024
DEFAULT_READ_BYTES = 4 * 1024 * 1024
DEFAULT_READ_RECORDS = 10_000
DEFAULT_TAIL_BYTES = 32 * 1024 * 1024
DEFAULT_PENDING_BYTES = 64 * 1024 * 1024


_packers = threading.local()


def encode_record(epoch: int, entry: Entry) -> bytes:
    """The stored and shipped form of one entry.

    One packer per thread, reused: ``msgpack.packb`` makes a packer (and its 1 MiB buffer)
    for every call, which was a sixth of the active's Python time with small files."""
    packer = getattr(_packers, "packer", None)
    if packer is None:
        packer = _packers.packer = msgpack.Packer(
            use_bin_type=True, unicode_errors="surrogateescape"
        )
    packed: bytes = packer.pack([epoch, entry.to_wire()])
    return packed


def decode_record(payload: bytes) -> tuple[int, Entry]:
    """(epoch, entry) from a payload; :class:`ProtocolError` for anything malformed."""
    try:
        item: Any = msgpack.unpackb(payload, raw=False, unicode_errors="surrogateescape")
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable journal record: {exc}") from None
    if not isinstance(item, list) or len(item) != 2:
        raise ProtocolError("journal record is not [epoch, entry]")
    epoch, wire = item
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise ProtocolError("journal record epoch is not a non-negative integer")
    return epoch, Entry.from_wire(wire)


class _HeadWatch:
    """Wakes coroutines waiting for the head to pass a seq, whatever thread moved it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = set()

    def notify(self) -> None:
        with self._lock:
            waiters, self._waiters = self._waiters, set()
        for loop, future in waiters:
            # A closed loop raises RuntimeError: nobody is left there to wake.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake, future)

    def register(self) -> tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]:
        loop = asyncio.get_running_loop()
        waiter = (loop, loop.create_future())
        with self._lock:
            self._waiters.add(waiter)
        return waiter

    def unregister(self, waiter: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]) -> None:
        with self._lock:
            self._waiters.discard(waiter)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _TypedLog:
    """What the journal and the receive queue share: a segment log and head waiters."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int,
        fsync: FsyncPolicy,
        segment_bytes: int,
    ) -> None:
        self.log = SegmentLog(
            directory, segment_bytes=segment_bytes, max_bytes=max_bytes, fsync=fsync
        )
        self._watch = _HeadWatch()
        self._closed = False

    @property
    def head(self) -> int:
        return self.log.head

    @property
    def first(self) -> int:
        return self.log.first

    @property
    def synced(self) -> int:
        return self.log.synced

    @property
    def total_bytes(self) -> int:
        return self.log.total_bytes

    @property
    def record_count(self) -> int:
        return self.log.record_count

    @property
    def dropped_through(self) -> int:
        """Highest seq the size bound deleted since open (0 if none)."""
        return self.log.dropped_through

    def read_from(
        self,
        seq: int,
        max_bytes: int = DEFAULT_READ_BYTES,
        max_records: int = DEFAULT_READ_RECORDS,
    ) -> list[tuple[int, bytes]]:
        """Raw (seq, payload) pairs from ``seq`` on; see :meth:`SegmentLog.read_from`."""
        return self.log.read_from(seq, max_bytes, max_records)

    def read_entries(
        self,
        seq: int,
        max_bytes: int = DEFAULT_READ_BYTES,
        max_records: int = DEFAULT_READ_RECORDS,
    ) -> list[tuple[int, int, Entry]]:
        """(seq, epoch, entry) triples from ``seq`` on."""
        return [
            (rec_seq, *decode_record(payload))
            for rec_seq, payload in self.read_from(seq, max_bytes, max_records)
        ]

    def sync(self) -> None:
        """fsync what was appended (blocking: run it in a thread)."""
        self.log.sync()

    def discard_through(self, seq: int) -> None:
        self.log.discard_through(seq)

    async def wait_beyond(self, seq: int, timeout: float | None = None) -> int:
        """Wait until ``head > seq`` and return the head.

        Raises :class:`TimeoutError` after ``timeout`` seconds and :class:`JournalError` when
        the log is closed meanwhile. Each pass of the loop follows a notification, and the
        head is checked again after registering, so no append is missed.
        """
        async with asyncio.timeout(timeout):
            while True:
                head = self.head_if_open()
                if head > seq:
                    return head
                waiter = self._watch.register()
                try:
                    head = self.head_if_open()
                    if head > seq:
                        return head
                    await waiter[1]
                finally:
                    self._watch.unregister(waiter)

    def head_if_open(self) -> int:
        if self._closed:
            raise JournalError(f"{self.log.directory} is closed")
        return self.head

    def _notify(self) -> None:
        self._watch.notify()

    def close(self) -> None:
        """Sync and close; waiters get :class:`JournalError`."""
        self._closed = True
        try:
            self.log.close()
        finally:
            self._watch.notify()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _Tail:
    """The newest records, kept in memory as appended, so that senders keeping up with the
    journal never read back from disk what was just written. Bounded by payload bytes (plus a
    per-record allowance, so that tiny records are bounded too); contiguous in seq."""

    RECORD_OVERHEAD = 128  # bytes counted per record besides its payload

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._records: deque[tuple[int, bytes]] = deque()
        self._bytes = 0

    def add(self, first: int, payloads: Sequence[bytes]) -> None:
        if self.max_bytes <= 0 or not payloads:
            return
        with self._lock:
            if self._records and self._records[-1][0] + 1 != first:
                self._clear()
            for seq, payload in enumerate(payloads, first):
                self._records.append((seq, payload))
                self._bytes += len(payload) + self.RECORD_OVERHEAD
            while self._bytes > self.max_bytes and len(self._records) > 1:
                self._bytes -= len(self._records.popleft()[1]) + self.RECORD_OVERHEAD

    def read(self, seq: int, max_bytes: int, max_records: int) -> list[tuple[int, bytes]] | None:
        """Records from ``seq`` on if the tail holds ``seq``, else None (read the log)."""
        with self._lock:
            if not self._records or not self._records[0][0] <= seq <= self._records[-1][0]:
                return None
            start = seq - self._records[0][0]
            return _take(itertools.islice(self._records, start, None), max_bytes, max_records)

    def drop_after(self, seq: int) -> None:
        with self._lock:
            while self._records and self._records[-1][0] > seq:
                self._bytes -= len(self._records.pop()[1]) + self.RECORD_OVERHEAD

    def clear(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        self._records.clear()
        self._bytes = 0


class Journal(_TypedLog):
    """The active's ordered send queue of entries.

    The newest ``tail_bytes`` of records are also kept in memory: :meth:`read_from` serves
    them from there, so a sender that keeps up costs no disk read.

    Write-behind (``write_behind=True``, the agent's ``fsync = "batch"``): appended records
    are first held in memory only ("pending", at most ``pending_bytes``). Records every
    passive has persisted are dropped from there unwritten (:meth:`skip_through`): they are
    durable on the passives, and writing file data to this disk too would cost the active
    as much again as capturing it. The rest is written to the segment log by :meth:`flush`
    (the agent's syncer, after giving the passives a moment) or when pending is full, and
    always by :meth:`close`. Numbering survives: before the first record after a skip is
    written, the log is reset to the skipped position. After a crash, pending records are
    gone and the head may be lower than what passives persisted; the sender then resets
    such a passive and a full check repairs it, as for any crash of the active.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        fsync: FsyncPolicy = "batch",
        segment_bytes: int = 64 * 1024 * 1024,
        tail_bytes: int = DEFAULT_TAIL_BYTES,
        write_behind: bool = False,
        pending_bytes: int = DEFAULT_PENDING_BYTES,
    ) -> None:
        super().__init__(directory, max_bytes=max_bytes, fsync=fsync, segment_bytes=segment_bytes)
        self._tail = _Tail(tail_bytes)
        self.write_behind = write_behind
        self.pending_max = pending_bytes
        self._order = threading.Lock()  # appends, flushes and skips, in seq order
        self._pending: deque[tuple[int, bytes]] = deque()  # not in the log yet, contiguous
        self._pending_bytes = 0
        self._skipped = -1  # highest seq dropped unwritten while above the log's head
        self._head = self.log.head
        self.skipped_records = 0  # records every passive held before they were written

    @property
    def head(self) -> int:
        return self._head

    @property
    def first(self) -> int:
        """The lowest seq still held, on disk or in memory (``head + 1`` when none).

        Read without the journal's lock (a flush may be writing): pending first, then the
        log, so that a flush moving records from one to the other meanwhile can only make
        the answer lower, never skip records.
        """
        try:
            pending_first: int | None = self._pending[0][0]
        except IndexError:
            pending_first = None
        head = self._head
        log_first = self.log.first
        if log_first <= self.log.head:
            return log_first
        return pending_first if pending_first is not None else head + 1

    @property
    def total_bytes(self) -> int:
        return self.log.total_bytes + self._pending_bytes

    @property
    def pending_bytes(self) -> int:
        """Bytes held in memory only (write-behind), not yet in the segment log."""
        return self._pending_bytes

    @property
    def record_count(self) -> int:
        return self.log.record_count + len(self._pending)

    def append(self, epoch: int, entries: Sequence[Entry]) -> tuple[int, int]:
        """Append entries under ``epoch``; returns their (first, last) seqs.

        For no entries returns ``(head + 1, head)``, an empty range, and writes nothing.
        With write-behind a full pending area is written out here, oldest first; a failure
        of that write raises :class:`JournalError` after the records are numbered and held.
        """
        if epoch < 0:
            raise JournalError(f"epoch {epoch} is negative")
        payloads = [encode_record(epoch, entry) for entry in entries]
        if not payloads:
            return self._head + 1, self._head
        try:
            with self._order:
                self._check_not_closed()
                first = self._head + 1
                if not self.write_behind:
                    self._write_locked(list(enumerate(payloads, first)))
                else:
                    for seq, payload in enumerate(payloads, first):
                        self._pending.append((seq, payload))
                        self._pending_bytes += len(payload)
                self._head = first + len(payloads) - 1
                self._tail.add(first, payloads)
                if self._pending_bytes > self.pending_max:
                    self._flush_locked(self._pending_bytes - self.pending_max // 2)
        finally:
            self._notify()
        return first, first + len(payloads) - 1

    def skip_through(self, seq: int) -> int:
        """Drop pending records up to ``seq`` unwritten: every passive has persisted them.

        Only records above everything in the log are dropped (the log stays contiguous).
        Returns how many were dropped.
        """
        with self._order:
            if seq < self.log.head:
                return 0
            dropped = 0
            while self._pending and self._pending[0][0] <= seq:
                last, payload = self._pending.popleft()
                self._pending_bytes -= len(payload)
                self._skipped = last
                dropped += 1
            self.skipped_records += dropped
            return dropped

    def flush(self, through: int | None = None) -> None:
        """Write pending records up to ``through`` (all: None) to the segment log."""
        with self._order:
            limit = self._head if through is None else through
            due = itertools.takewhile(lambda record: record[0] <= limit, self._pending)
            self._flush_locked(sum(len(payload) for _, payload in due))

    def _flush_locked(self, nbytes: int) -> None:
        """Write the oldest pending records, at least ``nbytes`` of them (if there are).

        If the write fails, what reached the log leaves pending; the rest stays there,
        numbered, unless pending has outgrown twice its bound: then the oldest records are
        dropped (a passive that still needed them sees the gap and gets a full check).
        """
        batch: list[tuple[int, bytes]] = []
        size = 0
        for record in self._pending:
            if size >= nbytes:
                break
            batch.append(record)
            size += len(record[1])
        if not batch:
            return
        try:
            self._write_locked(batch)
        finally:
            written = self.log.head
            while self._pending and self._pending[0][0] <= written:
                self._pending_bytes -= len(self._pending.popleft()[1])
            while self._pending_bytes > 2 * self.pending_max and self._pending:
                seq, payload = self._pending.popleft()
                self._pending_bytes -= len(payload)
                self._skipped = seq

    def _write_locked(self, records: list[tuple[int, bytes]]) -> None:
        if self._skipped > self.log.head and records[0][0] == self._skipped + 1:
            # Continue the numbering after the records the passives took unwritten.
            self.log.reset(self._skipped)
        try:
            self.log.append(records)
        finally:
            self._head = max(self._head, self.log.head)

    def read_from(
        self,
        seq: int,
        max_bytes: int = DEFAULT_READ_BYTES,
        max_records: int = DEFAULT_READ_RECORDS,
    ) -> list[tuple[int, bytes]]:
        """Records from ``seq`` on: from memory when held there, else from the log.

        A seq that is neither in the log nor in memory (dropped unwritten) yields the
        records after it, so the caller sees the gap and never skips silently.
        """
        max_bytes, max_records = max(max_bytes, 0), max(max_records, 1)
        records = self._tail.read(seq, max_bytes, max_records)
        if records is not None:
            return records
        with self._order:
            if self._pending and seq > self.log.head:
                start = max(0, seq - self._pending[0][0])
                return _take(itertools.islice(self._pending, start, None), max_bytes, max_records)
        return self.log.read_from(seq, max_bytes, max_records)

    def discard_through(self, seq: int) -> None:
        """Drop what every passive holds: whole segments up to ``seq``, and pending records."""
        self.log.discard_through(seq)
        self.skip_through(seq)

    def truncate_after(self, seq: int) -> None:
        """Drop entries above ``seq`` (the node's history forked there); durable on return."""
        with self._order:
            while self._pending and self._pending[-1][0] > seq:
                self._pending_bytes -= len(self._pending.pop()[1])
            self._tail.drop_after(seq)
            if self._skipped > seq:
                self._skipped = seq
            if seq < self.log.head:
                self.log.truncate_after(seq)
            self._head = min(self._head, max(seq, self.log.head))

    def restart_at(self, base: int) -> None:
        """Forget every entry and continue numbering after ``base``: a node taking over
        starts its journal where its applied position stands. Durable on return."""
        with self._order:
            self._pending.clear()
            self._pending_bytes = 0
            self._skipped = -1
            self._tail.clear()
            self.log.reset(base)
            self._head = base
        self._notify()

    def close(self) -> None:
        """Write what is pending, sync and close; waiters get :class:`JournalError`.

        If pending records cannot be written, the log is closed anyway and the error is
        raised: the caller must not take the stop as clean.
        """
        try:
            if not self._closed:
                with self._order:
                    self._flush_locked(self._pending_bytes)
                    if self._skipped > self.log.head:
                        self.log.reset(self._skipped)  # the numbering goes on after them
        finally:
            super().close()

    def _check_not_closed(self) -> None:
        if self._closed:
            raise JournalError(f"{self.log.directory} is closed")


def _take(
    records: Iterable[tuple[int, bytes]], max_bytes: int, max_records: int
) -> list[tuple[int, bytes]]:
    """At least one record, then as many as fit ``max_bytes`` and ``max_records``."""
    taken: list[tuple[int, bytes]] = []
    size = 0
    for record in records:
        if taken and (size + len(record[1]) > max_bytes or len(taken) >= max_records):
            break
        taken.append(record)
        size += len(record[1])
    return taken


class ReceiveQueue(_TypedLog):
    """Entries a passive has persisted (and acknowledged) but not yet applied."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        fsync: FsyncPolicy = "always",
        segment_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        super().__init__(directory, max_bytes=max_bytes, fsync=fsync, segment_bytes=segment_bytes)
        self.duplicates_skipped = 0

    @property
    def persisted(self) -> int:
        """Highest seq stored (durable at once under the default ``fsync="always"``)."""
        return self.log.head

    def append(self, records: Sequence[tuple[int, bytes]]) -> int:
        """Store records received from the active; returns how many were new.

        Records at or below ``persisted`` are duplicates resent after a reconnect: skipped and
        counted. Every payload must decode and seqs must rise, else :class:`ProtocolError` and
        nothing is stored.
        """
        head = self.log.head
        fresh: list[tuple[int, bytes]] = []
        previous = head
        for seq, payload in records:
            if seq <= head:
                self.duplicates_skipped += 1
                continue
            if seq <= previous:
                raise ProtocolError(f"received seq {seq} after {previous}")
            decode_record(payload)
            fresh.append((seq, payload))
            previous = seq
        if fresh:
            self.log.append(fresh)
            self._notify()
        return len(fresh)

    def reset(self, base: int) -> None:
        """Forget every record; the next one expected is ``base + 1`` (after a full sync)."""
        self.log.reset(base)
        self._notify()
