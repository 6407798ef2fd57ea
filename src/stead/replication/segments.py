"""A durable, append-only log of ``(seq, payload)`` records in segment files.

Both the active's journal and the passive's receive queue are a :class:`SegmentLog`. Records
carry strictly increasing sequence numbers chosen by the caller (the receive queue keeps the
active's numbers, so gaps are allowed; duplicates never are). Records live in segment files named
after the first sequence number they hold, zero-padded to 20 digits so that lexical order is
numeric order and every u64 fits.

The record format lives in :mod:`stead.replication.segment_format`.

Duties of this seam, in the manner of Patroni's ``AbstractDCS``:

Timing
    ``append`` costs one ``writev`` per segment touched and never waits for the disk unless
    ``fsync="always"``. ``sync`` fsyncs and may take milliseconds to seconds; call it from a
    worker thread. Appends by another thread proceed while ``sync`` waits (group commit).
    ``read_from`` never holds the lock while it reads, so readers do not stall the writer.

Atomicity
    A record is durable once a ``sync`` that started after its ``append`` returned has returned
    (with ``fsync="always"``: once ``append`` returns). A crash may leave a prefix of an
    ``append`` batch; on open a torn or corrupt record at the end of the last segment is cut off
    (and logged), while damage followed by valid records, or in an older segment, raises
    :class:`CorruptRecord`: nothing is ever skipped silently. ``truncate_after`` and ``reset``
    are durable when they return (except ``fsync="never"``). Deleting whole segments
    (``discard_through``, the size bound) need not be durable: a segment that reappears after a
    crash only holds records that are still valid.

Threads
    One writer thread (``append``, ``discard_through``, ``truncate_after``, ``reset``) and any
    number of reader threads (``read_from``) and one syncing thread. Readers open their own file
    descriptors and use ``os.pread``.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Self

from stead.errors import CorruptRecord, JournalError
from stead.replication.segment_format import (
    HEADER_BYTES,
    MAX_PAYLOAD_BYTES,
    MAX_SEQ,
    SEGMENT_SUFFIX,
    SEQ_DIGITS,
    RetryRead,
    Scan,
    SegmentIndex,
    encode,
    read_records,
    scan_file,
    segment_name,
    valid_record_after,
    walk_headers,
    write_all,
)

log = logging.getLogger(__name__)

FsyncPolicy = Literal["always", "batch", "never"]
BASE_FILE = "base"
_READ_ATTEMPTS = 8  # lock-free read attempts before reading under the lock


class SegmentLog:
    """Append-only log of ``(seq, payload)`` records; see the module docstring for duties."""

    def __init__(
        self,
        directory: Path,
        *,
        segment_bytes: int = 64 * 1024 * 1024,
        max_bytes: int = 10 * 1024 * 1024 * 1024,
        fsync: FsyncPolicy = "batch",
        verify_on_open: bool = True,
    ) -> None:
        if fsync not in ("always", "batch", "never"):
            raise JournalError(f"unknown fsync policy {fsync!r}")
        if segment_bytes < HEADER_BYTES or max_bytes < segment_bytes:
            raise JournalError("need header size <= segment_bytes <= max_bytes")
        self.directory = Path(directory)
        self.segment_bytes = segment_bytes
        self.max_bytes = max_bytes
        self.fsync_policy: FsyncPolicy = fsync
        self.verify_on_open = verify_on_open
        self.dropped_through = 0  # since open; `first` is the durable account
        self._lock = threading.Lock()
        self._sync_lock = threading.Lock()  # taken before _lock, never after it
        self._segments: list[SegmentIndex] = []
        self._firsts: list[int] = []  # segment first seqs, for bisect
        self._base = 0
        self._total_bytes = 0
        self._fd: int | None = None  # the last segment, open for appending
        self._unsynced_fds: list[int] = []  # rolled-away segments awaiting the next sync
        self._dir_dirty = False
        self._synced = 0
        self._generation = 0  # bumped when bytes on disk are rewritten, not just appended
        self._closed = False
        self._broken: str | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        self._dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._recover()
        except BaseException:
            self._close_fds()
            raise
        self._synced = self._head()

    # -- properties -------------------------------------------------------------------------

    @property
    def head(self) -> int:
        """Seq of the last record, or the base when the log is empty."""
        with self._lock:
            return self._head()

    @property
    def first(self) -> int:
        """Seq of the first record still stored, or ``head + 1`` when empty."""
        with self._lock:
            for segment in self._segments:
                if segment.count:
                    return segment.first
            return self._head() + 1

    @property
    def synced(self) -> int:
        """Highest seq known to be on disk (``head`` after ``sync``; meaningless for "never")."""
        with self._lock:
            return self._synced

    @property
    def total_bytes(self) -> int:
        with self._lock:
            return self._total_bytes

    @property
    def record_count(self) -> int:
        with self._lock:
            return sum(segment.count for segment in self._segments)

    def _head(self) -> int:
        # The base lifts the head above the last record after truncate_after(seq) removed
        # only records above seq, and stands in for it when the log is empty.
        for segment in reversed(self._segments):
            if segment.count:
                return max(segment.last, self._base)
        return self._base

    # -- writing ----------------------------------------------------------------------------

    def append(self, records: Sequence[tuple[int, bytes]]) -> None:
        """Append records whose seqs are above ``head`` and strictly increasing.

        Everything is checked before anything is written. If the write itself fails (a full
        file system), the segment being written is cut back to its last whole record, a prefix
        of the batch may remain (``head`` says how far), and :class:`JournalError` is raised.
        """
        if not records:
            return
        always = self.fsync_policy == "always"
        with self._sync_lock if always else contextlib.nullcontext(), self._lock:
            self._check_writable()
            previous = self._head()
            for seq, payload in records:
                if not 0 < seq <= MAX_SEQ or seq <= previous:
                    raise JournalError(f"seq {seq} is not above {previous}")
                if len(payload) > MAX_PAYLOAD_BYTES:
                    raise JournalError(f"record {seq} of {len(payload)} bytes is too large")
                previous = seq
            start = 0
            while start < len(records):
                start = self._write_group(records, start)
            self._enforce_bound()
            if always:
                self._fsync_locked()

    def append_payloads(self, payloads: Sequence[bytes]) -> tuple[int, int]:
        """Append with seqs ``head + 1 ..``; returns (first, last) (``(head+1, head)`` if none)."""
        with self._lock:
            first = self._head() + 1
        self.append([(first + i, payload) for i, payload in enumerate(payloads)])
        return first, first + len(payloads) - 1

    def _write_group(self, records: Sequence[tuple[int, bytes]], start: int) -> int:
        """Write records from ``start`` that fit the current segment; return the next index."""
        segment = self._segments[-1] if self._segments else None
        if (
            segment is None
            or self._fd is None
            or (
                segment.size
                and segment.size + HEADER_BYTES + len(records[start][1]) > self.segment_bytes
            )
        ):
            segment = self._roll(records[start][0])
        assert self._fd is not None
        size = start_size = segment.size
        parts: list[bytes] = []
        placed: list[tuple[int, int, int]] = []
        end = start
        while end < len(records):
            seq, payload = records[end]
            length = len(payload)
            if placed and size + HEADER_BYTES + length > self.segment_bytes:
                break
            parts.append(encode(seq, payload))
            parts.append(payload)
            placed.append((seq, size, length))
            size += HEADER_BYTES + length
            end += 1
        try:
            write_all(self._fd, parts)
        except OSError as exc:
            self._cut_back(segment)
            raise JournalError(f"writing {segment.path}: {exc}") from exc
        for seq, offset, length in placed:
            segment.note(seq, offset, length)
        self._total_bytes += size - start_size
        return end

    def _retire_writer(self) -> None:
        """Stop writing to the current segment; the next ``sync`` fsyncs and closes its fd.

        Never closed here: a ``sync`` running in another thread may be fsyncing it.
        """
        if self._fd is not None:
            if self.fsync_policy == "never":
                os.close(self._fd)
            else:
                self._unsynced_fds.append(self._fd)
            self._fd = None

    def _roll(self, first_seq: int) -> SegmentIndex:
        """Start a new segment; the old one is fsynced by the next ``sync``."""
        self._retire_writer()
        segment = SegmentIndex(first=first_seq, path=self.directory / segment_name(first_seq))
        segment.last = first_seq - 1
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC
        try:
            self._fd = os.open(segment.path, flags, 0o600)
        except OSError as exc:
            raise JournalError(f"creating {segment.path}: {exc}") from exc
        self._segments.append(segment)
        self._firsts.append(first_seq)
        self._dir_dirty = True
        return segment

    def _cut_back(self, segment: SegmentIndex) -> None:
        """After a failed write, drop whatever part of it reached the file.

        A segment left without records goes too: it is named after a record it never got.
        """
        assert self._fd is not None
        try:
            if segment.count:
                os.ftruncate(self._fd, segment.size)
            else:
                self._retire_writer()
                self._segments.pop()
                self._firsts.pop()
                segment.path.unlink(missing_ok=True)
        except OSError as exc:
            self._broken = f"cannot cut back {segment.path} after a failed write: {exc}"
            log.error("journal %s", self._broken)

    def _enforce_bound(self) -> None:
        while self._total_bytes > self.max_bytes and len(self._segments) > 1:
            oldest = self._drop_oldest()
            self.dropped_through = max(self.dropped_through, oldest.last)
            log.warning(
                "journal %s over its bound of %d bytes: dropped records %d..%d",
                self.directory,
                self.max_bytes,
                oldest.first,
                oldest.last,
            )

    def _drop_oldest(self) -> SegmentIndex:
        oldest = self._segments.pop(0)
        self._firsts.pop(0)
        self._total_bytes -= oldest.size
        oldest.path.unlink(missing_ok=True)
        return oldest

    def sync(self) -> None:
        """Make every record appended before this call durable (group commit).

        The fsync runs outside the main lock, so appends continue meanwhile. After an fsync
        failure the log refuses further writes: the kernel may have dropped the dirty pages.
        """
        with self._sync_lock:
            with self._lock:
                self._check_writable()
                if self.fsync_policy == "never":
                    self._synced = self._head()
                    return
                target = self._head()
                fds, self._unsynced_fds = self._unsynced_fds, []
                current = self._fd
                dir_dirty, self._dir_dirty = self._dir_dirty, False
            try:
                for fd in [*fds, *([current] if current is not None else [])]:
                    os.fsync(fd)
                if dir_dirty:
                    os.fsync(self._dir_fd)
            except OSError as exc:
                with self._lock:
                    self._broken = f"fsync failed: {exc}"
                raise JournalError(f"{self.directory}: fsync failed: {exc}") from exc
            finally:
                for fd in fds:
                    os.close(fd)
            with self._lock:
                self._synced = max(self._synced, target)

    def _fsync_locked(self) -> None:
        """fsync while holding the lock (policy "always" and destructive operations)."""
        if self.fsync_policy == "never":
            self._synced = self._head()
            return
        try:
            for fd in self._unsynced_fds:
                os.fsync(fd)
                os.close(fd)
            self._unsynced_fds = []
            if self._fd is not None:
                os.fsync(self._fd)
            if self._dir_dirty:
                self._dir_dirty = False
                os.fsync(self._dir_fd)
        except OSError as exc:
            self._broken = f"fsync failed: {exc}"
            raise JournalError(f"{self.directory}: fsync failed: {exc}") from exc
        self._synced = self._head()

    # -- dropping records ---------------------------------------------------------------------

    def discard_through(self, seq: int) -> None:
        """Delete whole segments whose records are all ``<= seq``; never the one being written."""
        with self._lock:
            self._check_open()
            while len(self._segments) > 1 and self._segments[0].last <= seq:
                self._drop_oldest()

    def truncate_after(self, seq: int) -> None:
        """Drop every record above ``seq`` (a forked history); ``head`` becomes ``seq``.

        Durable on return: the cut files are fsynced, then ``seq`` is kept as the base.
        """
        with self._sync_lock, self._lock:
            self._check_writable()
            if seq >= self._head():
                return
            self._generation += 1
            while self._segments and self._segments[-1].first > seq:
                segment = self._segments.pop()
                self._firsts.pop()
                self._total_bytes -= segment.size
                segment.path.unlink(missing_ok=True)
            self._close_writer()
            if self._segments:
                self._cut_segment(self._segments[-1], seq)
            self._dir_dirty = True
            self._fsync_locked()
            # After the cut is durable: a crash before this leaves the head at or below seq.
            self._write_base(seq)
            self._synced = min(self._synced, seq)

    def _cut_segment(self, segment: SegmentIndex, seq: int) -> None:
        """Cut ``segment`` before its first record above ``seq`` and make it the writer's."""
        cut = segment.size
        kept = SegmentIndex(first=segment.first, path=segment.path, last=segment.first - 1)
        fd = os.open(segment.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        try:
            for rec_seq, offset, length in walk_headers(fd, segment.path, 0, segment.size):
                if rec_seq > seq:
                    cut = offset
                    break
                kept.note(rec_seq, offset, length)
            os.ftruncate(fd, cut)
        except BaseException:
            os.close(fd)
            raise
        self._total_bytes -= segment.size - cut
        kept.size = cut
        self._segments[-1] = kept
        self._fd = fd

    def reset(self, base: int) -> None:
        """Remove every record; the next record must be above ``base``. Durable on return."""
        if not 0 <= base <= MAX_SEQ:
            raise JournalError(f"base {base} out of range")
        with self._sync_lock, self._lock:
            self._check_writable()
            self._generation += 1
            self._close_writer()
            for segment in self._segments:
                segment.path.unlink(missing_ok=True)
            self._segments.clear()
            self._firsts.clear()
            self._total_bytes = 0
            # Segments go first: a crash before the base is written leaves an empty log at the
            # old base, never old records above a new base.
            self._dir_dirty = True
            self._fsync_locked()
            self._write_base(base)
            self._synced = base

    def _write_base(self, base: int) -> None:
        tmp = self.directory / (BASE_FILE + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"{base}\n".encode())
            if self.fsync_policy != "never":
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.directory / BASE_FILE)
        if self.fsync_policy != "never":
            os.fsync(self._dir_fd)
        self._base = base

    # -- reading ------------------------------------------------------------------------------

    def read_from(
        self, seq: int, max_bytes: int = 4 * 1024 * 1024, max_records: int = 10_000
    ) -> list[tuple[int, bytes]]:
        """Records with seq >= ``seq``, at most ``max_records`` and ``max_bytes`` of payload.

        Always returns at least one record when one exists, however large. Sees records
        appended but not yet synced. Reads without the lock and starts over if the log was
        rewritten meanwhile (``truncate_after``/``reset``); after a few tries it reads under the
        lock, so the loop is bounded.
        """
        max_bytes, max_records = max(max_bytes, 0), max(max_records, 1)
        for _ in range(_READ_ATTEMPTS):
            with self._lock:
                self._check_open()
                plan = self._read_plan(seq)
                generation = self._generation
            try:
                records = read_records(plan, seq, max_bytes, max_records)
            except RetryRead:
                continue
            except CorruptRecord:
                with self._lock:
                    if self._generation != generation:
                        continue
                raise
            with self._lock:
                if self._generation == generation:
                    return records
        with self._lock:
            self._check_open()
            try:
                return read_records(self._read_plan(seq), seq, max_bytes, max_records)
            except RetryRead:
                raise JournalError(f"{self.directory}: segment files changed under it") from None

    def _read_plan(self, seq: int) -> list[tuple[Path, int, int]]:
        """(path, start offset, end offset) of each segment that may hold records >= seq."""
        i = max(bisect.bisect_right(self._firsts, seq) - 1, 0)
        plan: list[tuple[Path, int, int]] = []
        for segment in self._segments[i:]:
            if segment.count and segment.last >= seq:
                start = segment.offset_for(seq) if segment.first < seq else 0
                plan.append((segment.path, start, segment.size))
        return plan

    # -- opening and closing ------------------------------------------------------------------

    def _recover(self) -> None:
        base_path = self.directory / BASE_FILE
        if base_path.exists():
            try:
                self._base = int(base_path.read_text().strip())
            except ValueError:
                raise JournalError(f"{base_path} does not hold a sequence number") from None
        firsts: list[int] = []
        for entry in os.listdir(self.directory):
            if entry.endswith(SEGMENT_SUFFIX) and len(entry) == SEQ_DIGITS + len(SEGMENT_SUFFIX):
                stem = entry[:SEQ_DIGITS]
                if stem.isdigit():
                    firsts.append(int(stem))
        firsts.sort()
        previous = 0
        for i, first in enumerate(firsts):
            path = self.directory / segment_name(first)
            is_last = i == len(firsts) - 1
            scan = scan_file(path, first, previous, verify=is_last or self.verify_on_open)
            if scan.bad_offset is not None:
                if not is_last:
                    raise CorruptRecord(scan.reason, file=str(path), offset=scan.bad_offset)
                self._repair_tail(path, scan)
            segment = scan.segment
            if segment.count:
                self._segments.append(segment)
                self._firsts.append(first)
                self._total_bytes += segment.size
                previous = segment.last
            elif is_last:
                # Created for a record that never reached the disk: the head was below it.
                path.unlink()
                os.fsync(self._dir_fd)
                if not self._segments and self._base < first - 1:
                    self._write_base(first - 1)
            else:
                raise CorruptRecord("empty segment before the last", file=str(path), offset=0)
        if self._segments:
            last = self._segments[-1]
            self._fd = os.open(last.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            if self.fsync_policy != "never":
                # What a crashed process left in the page cache is not on disk yet: make it so,
                # so that `synced` starts out true.
                os.fsync(self._fd)

    def _repair_tail(self, path: Path, scan: Scan) -> None:
        """Cut a torn last record; refuse damage that has valid records after it."""
        offset = scan.bad_offset
        assert offset is not None
        if valid_record_after(path, offset, scan.segment.last):
            raise CorruptRecord(
                f"{scan.reason}, with valid records after it", file=str(path), offset=offset
            )
        log.warning(
            "journal %s: cutting torn tail at offset %d of %s (%s)",
            self.directory,
            offset,
            path.name,
            scan.reason,
        )
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _close_writer(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _close_fds(self) -> None:
        self._close_writer()
        for fd in self._unsynced_fds:
            os.close(fd)
        self._unsynced_fds = []
        os.close(self._dir_fd)

    def close(self) -> None:
        """Sync (unless ``fsync="never"``) and release file descriptors. Idempotent."""
        with self._sync_lock, self._lock:
            if self._closed:
                return
            try:
                if self._broken is None:
                    self._fsync_locked()
            finally:
                self._closed = True
                self._close_fds()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise JournalError(f"{self.directory} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self._broken is not None:
            raise JournalError(f"{self.directory} refuses writes: {self._broken}")
