"""On-disk form of segment files: record headers, checksums, scanning and reading.

The pure, lock-free half of :mod:`stead.replication.segments`: everything here works on file
descriptors and paths handed to it and keeps no state between calls.

Record format (little-endian), checksum over the first 16 header bytes and the payload::

    magic "SL" | flags u8 | version u8 | payload length u32 | seq u64 | crc32 u32 | payload
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from array import array
from dataclasses import dataclass, field
from pathlib import Path

from stead.errors import CorruptRecord

MAGIC = b"SL"
FORMAT_VERSION = 1
HEADER = struct.Struct("<2sBBIQI")
HEADER_BYTES = HEADER.size  # 20
CHECKED_HEADER_BYTES = HEADER_BYTES - 4  # the crc covers everything before itself
MAX_PAYLOAD_BYTES = 256 * 1024 * 1024
MAX_SEQ = 2**64 - 1
SEGMENT_SUFFIX = ".seg"
SEQ_DIGITS = 20

# A sparse index entry every this many bytes bounds how much read_from scans inside a segment.
INDEX_INTERVAL_BYTES = 64 * 1024
# Writev accepts at most IOV_MAX buffers per call.
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)
_SCAN_CHUNK = 4 * 1024 * 1024
_HEADER_WALK_CHUNK = 64 * 1024
_READ_CHUNK_MIN = 256 * 1024


def segment_name(first_seq: int) -> str:
    return f"{first_seq:0{SEQ_DIGITS}d}{SEGMENT_SUFFIX}"


def crc(header16: bytes | memoryview, payload: bytes | memoryview) -> int:
    return zlib.crc32(payload, zlib.crc32(header16))


def encode(seq: int, payload: bytes) -> bytes:
    """One record's header (the payload follows it unchanged)."""
    head = HEADER.pack(MAGIC, 0, FORMAT_VERSION, len(payload), seq, 0)[:CHECKED_HEADER_BYTES]
    return head + crc(head, payload).to_bytes(4, "little")


@dataclass(slots=True)
class SegmentIndex:
    """One segment file as the log keeps it in memory: bounds, size and a sparse index."""

    first: int  # from the file name: the seq of its first record
    path: Path
    last: int = 0  # seq of the last record; first - 1 while empty
    size: int = 0
    count: int = 0
    index_seqs: array[int] = field(default_factory=lambda: array("Q"))
    index_offsets: array[int] = field(default_factory=lambda: array("Q"))

    def note(self, seq: int, offset: int, length: int) -> None:
        """Account for a record written (or found) at ``offset``."""
        if not self.index_offsets or offset - self.index_offsets[-1] >= INDEX_INTERVAL_BYTES:
            self.index_seqs.append(seq)
            self.index_offsets.append(offset)
        self.last = seq
        self.count += 1
        self.size = offset + HEADER_BYTES + length

    def offset_for(self, seq: int) -> int:
        """Offset of a record at or before the first record with a seq >= ``seq``."""
        i = bisect.bisect_right(self.index_seqs, seq) - 1
        return self.index_offsets[i] if i >= 0 else 0


@dataclass(slots=True)
class Scan:
    """What walking one segment file found."""

    segment: SegmentIndex
    bad_offset: int | None = None  # where the first invalid record starts
    reason: str = ""


class RetryRead(Exception):
    """A lock-free read saw the log change under it."""


def write_all(fd: int, parts: list[bytes]) -> None:
    """Write every buffer, resuming after short writes, in IOV_MAX-sized writev calls."""
    pending: list[bytes | memoryview] = [part for part in parts if part]
    i = 0
    while i < len(pending):  # every pass writes at least one byte, or raises
        batch = pending[i : i + _IOV_MAX]
        written = os.writev(fd, batch)
        if written <= 0:
            raise OSError(f"writev wrote {written} bytes")
        for buf in batch:
            if written < len(buf):
                break
            written -= len(buf)
            i += 1
        if written:  # a short write stopped inside pending[i]
            pending[i] = memoryview(pending[i])[written:]


def parse_header(buf: bytes | memoryview, pos: int, previous: int) -> tuple[int, int, str]:
    """(seq, payload length, reason) of the header at ``pos``; reason is empty when sane."""
    magic, flags, version, length, seq, _ = HEADER.unpack_from(buf, pos)
    if magic != MAGIC:
        return 0, 0, "bad magic"
    if version != FORMAT_VERSION or flags != 0:
        return 0, 0, f"unknown format version {version} or flags {flags:#x}"
    if length > MAX_PAYLOAD_BYTES:
        return 0, 0, f"length {length} over the limit"
    if seq <= previous:
        return 0, 0, f"seq {seq} not above {previous}"
    return seq, length, ""


def check_crc(buf: bytes | memoryview, pos: int, length: int) -> bool:
    stored = int.from_bytes(buf[pos + CHECKED_HEADER_BYTES : pos + HEADER_BYTES], "little")
    start = pos + HEADER_BYTES
    return crc(buf[pos : pos + CHECKED_HEADER_BYTES], buf[start : start + length]) == stored


def scan_file(path: Path, first: int, previous: int, *, verify: bool) -> Scan:
    """Walk a segment, building its index; stop at the first invalid record.

    ``verify`` checks every checksum (the last segment, where a crash tears records); older
    segments get a header walk only and their checksums are checked whenever they are read.
    """
    segment = SegmentIndex(first=first, path=path, last=first - 1)
    scan = Scan(segment)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        chunk_size = _SCAN_CHUNK if verify else _HEADER_WALK_CHUNK
        offset = 0  # file offset of buf[0]
        while size - offset >= HEADER_BYTES:
            buf = os.pread(fd, min(chunk_size, size - offset), offset)
            pos = 0
            while pos + HEADER_BYTES <= len(buf):
                at = offset + pos
                seq, length, reason = parse_header(buf, pos, max(previous, first - 1))
                if not reason and segment.count == 0 and seq != first:
                    reason = f"first record {seq} does not match the file name"
                if not reason and at + HEADER_BYTES + length > size:
                    reason = "record runs past the end of the file"
                if reason:
                    scan.bad_offset, scan.reason = at, reason
                    return scan
                if verify:
                    if pos + HEADER_BYTES + length > len(buf):
                        if pos:
                            break  # read it again from its start
                        buf = os.pread(fd, HEADER_BYTES + length, at)
                    if not check_crc(buf, pos, length):
                        scan.bad_offset, scan.reason = at, "checksum mismatch"
                        return scan
                # A header walk may step past the buffer: the next read starts there.
                segment.note(seq, at, length)
                previous = seq
                pos += HEADER_BYTES + length
            offset += pos
        if offset < size:
            scan.bad_offset, scan.reason = offset, "partial header at the end of the file"
        return scan
    finally:
        os.close(fd)


def valid_record_after(path: Path, offset: int, previous: int) -> bool:
    """Whether a checksummed record with a higher seq starts anywhere after ``offset``."""
    data = path.read_bytes()[offset:]
    pos = data.find(MAGIC, 1)
    while pos != -1:
        if pos + HEADER_BYTES <= len(data):
            _, length, reason = parse_header(data, pos, previous)
            if (
                not reason
                and pos + HEADER_BYTES + length <= len(data)
                and check_crc(data, pos, length)
            ):
                return True
        pos = data.find(MAGIC, pos + 1)
    return False


def walk_headers(fd: int, path: Path, start: int, end: int) -> list[tuple[int, int, int]]:
    """(seq, offset, length) of each record in ``[start, end)`` by header walk."""
    found: list[tuple[int, int, int]] = []
    offset = start
    while offset < end:
        head = os.pread(fd, HEADER_BYTES, offset)
        if len(head) < HEADER_BYTES:
            raise CorruptRecord("short header", file=str(path), offset=offset)
        seq, length, reason = parse_header(head, 0, found[-1][0] if found else 0)
        if reason:
            raise CorruptRecord(reason, file=str(path), offset=offset)
        found.append((seq, offset, length))
        offset += HEADER_BYTES + length
    return found


def read_records(
    plan: list[tuple[Path, int, int]], seq: int, max_bytes: int, max_records: int
) -> list[tuple[int, bytes]]:
    """Read records >= ``seq`` following ``plan``, checking every checksum returned."""
    out: list[tuple[int, bytes]] = []
    used = 0
    for path, start, end in plan:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if out:
                return out  # discarded behind us: what we have is still a consecutive run
            raise RetryRead() from None
        try:
            offset = start
            while offset < end:
                want = min(end - offset, max(_READ_CHUNK_MIN, max_bytes - used + HEADER_BYTES))
                buf = os.pread(fd, want, offset)
                if len(buf) < HEADER_BYTES:
                    raise RetryRead()
                pos = 0
                while pos + HEADER_BYTES <= len(buf):
                    got_seq, length, reason = parse_header(buf, pos, 0)
                    if reason:
                        raise CorruptRecord(reason, file=str(path), offset=offset + pos)
                    if pos + HEADER_BYTES + length > len(buf):
                        if pos:
                            break
                        buf = os.pread(fd, HEADER_BYTES + length, offset)
                        if len(buf) < HEADER_BYTES + length:
                            raise RetryRead()
                    if got_seq >= seq:
                        if out and (used + length > max_bytes):
                            return out
                        if not check_crc(buf, pos, length):
                            raise CorruptRecord(
                                "checksum mismatch", file=str(path), offset=offset + pos
                            )
                        body = pos + HEADER_BYTES
                        out.append((got_seq, bytes(buf[body : body + length])))
                        used += length
                        if len(out) >= max_records:
                            return out
                    pos += HEADER_BYTES + length
                offset += pos
        finally:
            os.close(fd)
    return out
