"""One channel connection's byte stream as frames: an asyncio buffered protocol.

asyncio's ``StreamReader`` copies every byte several times on its way to a large frame
(into its buffer, out of it by ``readexactly``, and its buffer is compacted as it is
consumed): on the lab's VMs that cost more CPU than the TLS decryption itself. Here the
transport writes straight into the frame: small frames are cut out of a scratch buffer,
and a frame of at least :data:`DIRECT_FROM` bytes gets a buffer of its own into which the
TLS layer decrypts the rest of it (``get_buffer``), so its payload is never copied again.

The protocol knows frames, not messages: :class:`~stead.channel.transport.Connection`
decodes them. Flow control both ways: reading pauses while more than :data:`READ_AHEAD`
bytes of complete frames wait to be received; :meth:`FrameStream.drain` waits while the
transport's write buffer is above its high-water mark.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from stead.channel.framing import DEFAULT_MAX_FRAME, HEADER_SIZE, parse_header
from stead.errors import ProtocolError

SCRATCH = 256 * 1024  # what one read may take while frames are small
DIRECT_FROM = 64 * 1024  # a payload this large is read into a buffer of its own
READ_AHEAD = 16 * 1024**2  # complete frames held before reading pauses


class FrameStream(asyncio.BufferedProtocol):
    """Frames as they arrive, for one reader; writes with back-pressure, for any writer."""

    def __init__(
        self,
        max_frame: int = DEFAULT_MAX_FRAME,
        on_connect: Callable[[FrameStream], None] | None = None,
    ) -> None:
        self.max_frame = max_frame
        self.on_connect = on_connect
        self.transport: asyncio.Transport | None = None
        self.frames: collections.deque[tuple[int, bytes | bytearray]] = collections.deque()
        self.queued = 0  # payload bytes in ``frames``
        self.refused: ProtocolError | None = None  # a header refused; nothing after it is read
        self.eof = False
        self.lost: BaseException | None = None  # the transport's error, when it broke
        self._scratch = bytearray(SCRATCH)
        self._partial = bytearray()  # an incomplete header or small payload, its header first
        self._frame: bytearray | None = None  # a large payload being read in place
        self._frame_flags = 0
        self._filled = 0  # bytes of ``_frame`` read so far
        self._waiter: asyncio.Future[None] | None = None
        self._paused_reading = False
        self._paused_writing = False
        self._drain_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # -- asyncio callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.on_connect is not None:
            self.on_connect(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._frame is not None:
            return memoryview(self._frame)[self._filled :]
        return memoryview(self._scratch)

    def buffer_updated(self, nbytes: int) -> None:
        if self._frame is not None:
            self._filled += nbytes
            if self._filled == len(self._frame):
                frame, self._frame = self._frame, None
                self._push(self._frame_flags, frame)
            return
        self._parse(memoryview(self._scratch)[:nbytes])

    def eof_received(self) -> bool | None:
        self.eof = True
        self._wake()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.lost = exc
        if not self.closed.done():
            self.closed.set_result(None)
        self._wake()
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    def pause_writing(self) -> None:
        self._paused_writing = True

    def resume_writing(self) -> None:
        self._paused_writing = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # -- parsing ------------------------------------------------------------------------------

    def _parse(self, data: memoryview) -> None:
        while data and self.refused is None:
            if len(self._partial) < HEADER_SIZE:
                take = min(HEADER_SIZE - len(self._partial), len(data))
                self._partial += data[:take]
                data = data[take:]
                if len(self._partial) < HEADER_SIZE:
                    return
            try:
                length, flags = parse_header(bytes(self._partial[:HEADER_SIZE]), self.max_frame)
            except ProtocolError as exc:
                self.refused = exc
                self._pause_reading()
                self._wake()
                return
            have = len(self._partial) - HEADER_SIZE
            if length >= DIRECT_FROM:
                # The rest of this frame goes straight into its own buffer.
                frame = bytearray(length)
                frame[:have] = self._partial[HEADER_SIZE:]
                take = min(length - have, len(data))
                frame[have : have + take] = data[:take]
                data = data[take:]
                self._partial.clear()
                if have + take == length:
                    self._push(flags, frame)
                    continue
                self._frame, self._frame_flags, self._filled = frame, flags, have + take
                self._wake()  # a frame has begun: the receiver's wait for it is over
                return  # ``data`` is empty: the frame needed all of it
            take = min(length - have, len(data))
            self._partial += data[:take]
            data = data[take:]
            if len(self._partial) - HEADER_SIZE == length:
                self._push(flags, bytes(self._partial[HEADER_SIZE:]))
                self._partial.clear()
        self._wake()

    def _push(self, flags: int, payload: bytes | bytearray) -> None:
        self.frames.append((flags, payload))
        self.queued += len(payload)
        if self.queued > READ_AHEAD:
            self._pause_reading()
        self._wake()

    def _pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None:
            self._paused_reading = True
            self.transport.pause_reading()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- for the connection ----------------------------------------------------------------------

    @property
    def started(self) -> bool:
        """True once a frame is complete, has begun, or the stream has ended."""
        return bool(self.frames) or self.in_frame or self.eof or self.refused is not None

    @property
    def in_frame(self) -> bool:
        """Some but not all of a frame has arrived."""
        return bool(self._partial) or self._frame is not None

    @property
    def progress(self) -> tuple[int, int]:
        """Of the frame under way: payload bytes read, payload length (0: unknown yet)."""
        if self._frame is not None:
            return self._filled, len(self._frame)
        if len(self._partial) >= HEADER_SIZE:
            length, _ = parse_header(bytes(self._partial[:HEADER_SIZE]), self.max_frame)
            return len(self._partial) - HEADER_SIZE, length
        return len(self._partial), 0

    async def wait(self, ready: Callable[[], bool]) -> None:
        """Wait until ``ready()`` (checked after each arrival); one waiter at a time."""
        while not ready():
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def pop(self) -> tuple[int, bytes | bytearray]:
        flags, payload = self.frames.popleft()
        self.queued -= len(payload)
        if self._paused_reading and self.queued <= READ_AHEAD and self.refused is None:
            self._paused_reading = False
            if self.transport is not None:
                self.transport.resume_reading()
        return flags, payload

    def write(self, *parts: bytes | bytearray | memoryview) -> None:
        """Hand ``parts`` to the transport at once (no other writer can come between)."""
        assert self.transport is not None
        if len(parts) == 1:
            self.transport.write(parts[0])
        else:  # TLS: each part encrypted in turn, then one write to the socket
            self.transport.writelines(parts)

    async def drain(self) -> None:
        """Wait until the transport's write buffer is below its high-water mark."""
        if self.transport is None or self.transport.is_closing():
            if self.lost is not None:
                raise ConnectionResetError(str(self.lost)) from self.lost
            await asyncio.sleep(0)
            if self.closed.done():
                raise ConnectionResetError("connection lost")
        while self._paused_writing and not self.closed.done():
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self.lost is not None:
            raise ConnectionResetError(str(self.lost)) from self.lost

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default) if self.transport else default
