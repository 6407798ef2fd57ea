"""Frames on a byte stream: the only way bytes travel between two nodes.

A frame is a 5-byte header, a 4-byte big-endian payload length and a flags byte (bit 0: the
payload is zstd-compressed; bit 1: the map has a tail; every other bit must be zero), then
the payload: one msgpack map. With a tail, the (decompressed) payload is instead the map's
length (4 bytes, big-endian), the map, and raw bytes: the parts the map's ``tail`` key
lists by length. Bulk data (file contents) travels as a tail, so that it is neither copied
into a msgpack buffer when sent nor out of one when received: the receiver gets views of
the frame it read.
Strings are packed and unpacked with ``surrogateescape``, so a Linux file name that is not
valid UTF-8 travels as a ``str`` holding surrogates and comes back byte for byte.

Limits are enforced before memory is committed: the header's length is checked against the
maximum frame size before the payload is read, and a compressed payload may not decompress
to more than that size either (no zip bombs).

Duties:

- Timing: nothing here sets a deadline; the transport wraps every read and drain in one.
- Atomicity: :func:`write_message` hands the whole frame to the writer in one ``write`` call,
  so concurrent writers never interleave frames. :func:`read_message` is not safe to cancel
  once the header has been consumed: the stream is then mid-frame and must be dropped (the
  transport's ``Connection`` does this).
- :class:`Compression` keeps state (its zstd context and statistics): one per connection.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from typing import Any, Literal

import msgpack
import zstandard

from stead.errors import ChannelError, FrameTooLarge, ProtocolError

HEADER = struct.Struct(">IB")
HEADER_SIZE = HEADER.size
FLAG_ZSTD = 0x01
FLAG_TAIL = 0x02
KNOWN_FLAGS = FLAG_ZSTD | FLAG_TAIL
TAIL_KEY = "tail"
MAP_LENGTH = struct.Struct(">I")
DEFAULT_MAX_FRAME = 64 * 1024 * 1024

CompressionMode = Literal["auto", "always", "never"]


class Compression:
    """When to compress a frame's payload.

    ``never`` and ``always`` do what they say. ``auto`` compresses payloads of at least
    ``min_size`` bytes and watches what it gains: when the last ``sample`` compressed frames
    saved less than ``min_saving`` of their size together (already compressed data, media,
    encrypted files), it sends the next ``pause`` frames as they are, then tries again. In
    ``auto`` a frame whose compressed form is not smaller is sent uncompressed.

    ``auto`` also stays out of the way on fast links: the connection reports how long each
    send took (:meth:`observe_send`), and while the measured link rate is above
    ``fast_link`` bytes per second (compressing would cost more time than it saves, zstd
    level 3 runs at a few hundred MB/s per core) frames go as they are. A link only looks
    slow once its socket buffers fill, so short bursts are never delayed by compression.
    """

    def __init__(
        self,
        mode: CompressionMode = "auto",
        *,
        min_size: int = 512,
        level: int = 3,
        sample: int = 8,
        min_saving: float = 0.10,
        pause: int = 64,
        fast_link: float = 200e6,
    ) -> None:
        if mode not in ("auto", "always", "never"):
            raise ValueError(f"unknown compression mode {mode!r}")
        if min_size < 0 or sample < 1 or pause < 0 or not 0.0 <= min_saving < 1.0:
            raise ValueError("invalid compression parameters")
        self.mode: CompressionMode = mode
        self.min_size = min_size
        self.sample = sample
        self.min_saving = min_saving
        self.pause = pause
        self._compressor = zstandard.ZstdCompressor(level=level)
        self._recent: deque[tuple[int, int]] = deque(maxlen=sample)  # (raw, compressed)
        self._skip = 0
        self.fast_link = fast_link
        self.link_rate: float | None = None  # bytes/s, smoothed over recent large sends
        self.frames_compressed = 0
        self.frames_plain = 0

    def observe_send(self, nbytes: int, seconds: float) -> None:
        """Learn the link's rate from a send of ``nbytes`` that took ``seconds``."""
        if nbytes < 64 * 1024 or seconds <= 0:
            return  # small frames say more about scheduling than about the link
        rate = nbytes / seconds
        self.link_rate = rate if self.link_rate is None else 0.8 * self.link_rate + 0.2 * rate

    @property
    def link_is_fast(self) -> bool:
        return self.link_rate is not None and self.link_rate > self.fast_link

    @property
    def paused(self) -> bool:
        """True while ``auto`` has given up on compression for a while."""
        return self._skip > 0

    def passes(self, size: int) -> bool:
        """Whether a payload of ``size`` bytes goes as it is without a try (counted as
        such); False: :meth:`apply` will try to compress it."""
        if self.mode == "always":
            return False
        if self.mode == "never" or size < self.min_size or self.link_is_fast:
            self.frames_plain += 1
            return True
        if self._skip > 0:
            self._skip -= 1
            self.frames_plain += 1
            return True
        return False

    def apply(self, raw: bytes) -> tuple[int, bytes]:
        """Return ``(flags, payload)`` for one frame's msgpack bytes."""
        if self.passes(len(raw)):
            return 0, raw
        if self.mode == "always":
            self.frames_compressed += 1
            return FLAG_ZSTD, self._compressor.compress(raw)
        packed = self._compressor.compress(raw)
        self._learn(len(raw), len(packed))
        if len(packed) >= len(raw):
            return self._plain(raw)
        self.frames_compressed += 1
        return FLAG_ZSTD, packed

    def _plain(self, raw: bytes) -> tuple[int, bytes]:
        self.frames_plain += 1
        return 0, raw

    def _learn(self, raw_size: int, packed_size: int) -> None:
        self._recent.append((raw_size, packed_size))
        if len(self._recent) < self.sample:
            return
        raw_total = sum(r for r, _ in self._recent)
        packed_total = sum(p for _, p in self._recent)
        if raw_total - packed_total < self.min_saving * raw_total:
            # Forget the sample so that the next attempt judges fresh data only.
            self._skip = self.pause
            self._recent.clear()


def pack(obj: dict[str, Any]) -> bytes:
    """Msgpack bytes of one message map (non-UTF-8 text survives via surrogateescape)."""
    return msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogateescape")


def encode_frame(
    obj: dict[str, Any],
    compression: Compression | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> bytes:
    """The complete frame (header and payload) for one message map.

    Raises :class:`FrameTooLarge` when the payload exceeds ``max_frame``: the peer would
    refuse it, so the sender must split its batch instead.
    """
    header, payload = encode_frame_parts(obj, compression, max_frame)
    return header + payload


def encode_frame_parts(
    obj: dict[str, Any],
    compression: Compression | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> tuple[bytes, bytes]:
    """:func:`encode_frame` as its header and its payload, so that a large payload is not
    copied once more only to join it to its five-byte header."""
    raw = pack(obj)
    flags, payload = compression.apply(raw) if compression else (0, raw)
    if len(payload) > max_frame or len(raw) > max_frame:
        raise FrameTooLarge(
            f"outgoing message of {len(raw)} bytes exceeds the frame limit of {max_frame}"
        )
    return HEADER.pack(len(payload), flags), payload


def encode_frame_tail(
    obj: dict[str, Any],
    tail: list[bytes],
    compression: Compression | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> list[bytes]:
    """The frame for ``obj`` with ``tail`` as raw parts after it: header first, then the
    parts to write in order (the tail's own buffers, unless the frame is compressed)."""
    raw = pack({**obj, TAIL_KEY: [len(part) for part in tail]})
    head = MAP_LENGTH.pack(len(raw)) + raw
    size = len(head) + sum(len(part) for part in tail)
    if size > max_frame:
        raise FrameTooLarge(
            f"outgoing message of {size} bytes exceeds the frame limit of {max_frame}"
        )
    if compression is None or compression.passes(size):
        return [HEADER.pack(size, FLAG_TAIL), *_runs([head, *tail])]
    flags, payload = compression.apply(b"".join([head, *tail]))
    return [HEADER.pack(len(payload), flags | FLAG_TAIL), payload]


RUN = 64 * 1024  # parts smaller than this are joined into runs of about this size


def _runs(parts: list[bytes]) -> list[bytes]:
    """The same bytes in fewer pieces: large parts as they are (no copy), small ones joined
    (a TLS record and a call per part would cost more than copying a few KiB)."""
    out: list[bytes] = []
    small: list[bytes] = []
    size = 0
    for part in parts:
        if len(part) >= RUN:
            if small:
                out.append(b"".join(small))
                small, size = [], 0
            out.append(part)
            continue
        small.append(part)
        size += len(part)
        if size >= RUN:
            out.append(b"".join(small))
            small, size = [], 0
    if small:
        out.append(b"".join(small))
    return out


def parse_header(header: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> tuple[int, int]:
    """``(length, flags)`` from a frame header, refusing unknown flags and oversized frames."""
    length, flags = HEADER.unpack(header)
    if flags & ~KNOWN_FLAGS:
        raise ProtocolError(f"unknown frame flags 0x{flags:02x}")
    if length > max_frame:
        raise FrameTooLarge(f"incoming frame of {length} bytes exceeds the limit of {max_frame}")
    return length, flags


def decode_payload(
    payload: bytes | bytearray, flags: int = 0, max_frame: int = DEFAULT_MAX_FRAME
) -> dict[str, Any]:
    """Decompress (bounded by ``max_frame``) and unpack one payload into a message map."""
    if flags & FLAG_ZSTD:
        payload = _decompress(payload, max_frame)
    if not flags & FLAG_TAIL:
        obj = _unpack_map(payload)
        if TAIL_KEY in obj:
            raise ProtocolError("a tail listed in a frame without one")
        return obj
    view = memoryview(payload)
    if len(view) < MAP_LENGTH.size:
        raise ProtocolError("frame with a tail is too short for its map's length")
    (length,) = MAP_LENGTH.unpack_from(view)
    start = MAP_LENGTH.size + length
    if start > len(view):
        raise ProtocolError(f"the map's length {length} exceeds the frame")
    obj = _unpack_map(view[MAP_LENGTH.size : start])
    sizes = obj.get(TAIL_KEY)
    if (
        not isinstance(sizes, list)
        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in sizes)
        or sum(sizes) != len(view) - start
    ):
        raise ProtocolError("the tail's sizes do not match the frame")
    parts = []
    for size in sizes:
        parts.append(view[start : start + size])
        start += size
    obj[TAIL_KEY] = parts
    return obj


def _unpack_map(payload: bytes | bytearray | memoryview) -> dict[str, Any]:
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            unicode_errors="surrogateescape",
            use_list=True,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"undecodable payload: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"payload is a {type(obj).__name__}, not a map")
    return obj


def decode_frame(frame: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> dict[str, Any]:
    """Decode one complete frame held in memory (tests and benchmarks)."""
    if len(frame) < HEADER_SIZE:
        raise ProtocolError("truncated frame header")
    length, flags = parse_header(frame[:HEADER_SIZE], max_frame)
    if len(frame) != HEADER_SIZE + length:
        raise ProtocolError(f"frame length {length} does not match {len(frame) - HEADER_SIZE}")
    return decode_payload(frame[HEADER_SIZE:], flags, max_frame)


async def read_frame(
    reader: asyncio.StreamReader, max_frame: int = DEFAULT_MAX_FRAME
) -> tuple[int, bytes]:
    """Read one frame; return ``(flags, payload)``.

    Raises :class:`ChannelError` when the stream ends (cleanly between frames or in the
    middle of one) and :class:`ProtocolError` for a bad header.
    """
    try:
        header = await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ChannelError("peer closed the connection inside a frame header") from None
        raise ChannelError("peer closed the connection") from None
    length, flags = parse_header(header, max_frame)
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ChannelError(
            f"peer closed the connection after {len(exc.partial)} of {length} payload bytes"
        ) from None
    return flags, payload


async def read_message(
    reader: asyncio.StreamReader, max_frame: int = DEFAULT_MAX_FRAME
) -> dict[str, Any]:
    """Read and decode one message map."""
    flags, payload = await read_frame(reader, max_frame)
    return decode_payload(payload, flags, max_frame)


async def write_message(
    writer: asyncio.StreamWriter,
    obj: dict[str, Any],
    compression: Compression | None = None,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> None:
    """Encode, write and drain one message map."""
    writer.write(encode_frame(obj, compression, max_frame))
    await writer.drain()


def _decompress(payload: bytes | bytearray, max_frame: int) -> bytes:
    try:
        # A frame that declares its size is checked before zstd allocates that size;
        # max_output_size bounds only frames that do not declare it.
        declared = zstandard.frame_content_size(payload)
        if declared > max_frame:
            raise FrameTooLarge(
                f"compressed frame expands to {declared} bytes, over the limit of {max_frame}"
            )
        return zstandard.ZstdDecompressor().decompress(payload, max_output_size=max_frame)
    except zstandard.ZstdError as exc:
        raise ProtocolError(f"bad compressed payload: {exc}") from None
