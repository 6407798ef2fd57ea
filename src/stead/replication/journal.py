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
import threading
from collections.abc import Sequence
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


def encode_record(epoch: int, entry: Entry) -> bytes:
    """The stored and shipped form of one entry."""
    packed: bytes = msgpack.packb(
        [epoch, entry.to_wire()], use_bin_type=True, unicode_errors="surrogateescape"
    )
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
            for rec_seq, payload in self.log.read_from(seq, max_bytes, max_records)
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
        return self.log.head

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


class Journal(_TypedLog):
    """The active's ordered, durable send queue of entries."""

    def __init__(
        self,
        directory: Path,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        fsync: FsyncPolicy = "batch",
        segment_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        super().__init__(directory, max_bytes=max_bytes, fsync=fsync, segment_bytes=segment_bytes)

    def append(self, epoch: int, entries: Sequence[Entry]) -> tuple[int, int]:
        """Append entries under ``epoch``; returns their (first, last) seqs.

        For no entries returns ``(head + 1, head)``, an empty range, and writes nothing.
        """
        if epoch < 0:
            raise JournalError(f"epoch {epoch} is negative")
        payloads = [encode_record(epoch, entry) for entry in entries]
        span = self.log.append_payloads(payloads)
        if payloads:
            self._notify()
        return span

    def truncate_after(self, seq: int) -> None:
        """Drop entries above ``seq`` (the node's history forked there); durable on return."""
        self.log.truncate_after(seq)

    def restart_at(self, base: int) -> None:
        """Forget every entry and continue numbering after ``base``: a node taking over
        starts its journal where its applied position stands. Durable on return."""
        self.log.reset(base)
        self._notify()


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
