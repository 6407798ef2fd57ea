"""Node-to-node transport: asyncio TCP with mutual TLS 1.3 and typed messages.

Both sides present a certificate from the cluster CA (see :mod:`stead.pki`); a certificate
from another CA fails the TLS handshake itself. After the handshake each side checks the
peer's certificate once more in Python: its serial must not be in the revoked set, and its
common name must be the node we meant to reach (client) or a name we accept (server).
Nodes connect by IP address, so host-name checking is off and the common-name check takes
its place.

Duties:

- Timing: every network await runs under ``asyncio.timeout``: connecting and the handshake
  under ``timeout``, each send under ``io_timeout``, each receive under the caller's
  ``timeout`` for the wait for a frame to start and under ``io_timeout`` for the rest of it.
- Atomicity: a frame's header and payload are handed to the transport together, with no
  await between them, so concurrent senders never interleave. A receive interrupted inside
  a frame (timeout, cancellation) leaves the stream unusable, so the connection is aborted
  at once; a receive that times out before any byte arrived leaves it intact
  (:class:`TimeoutExpired`, the caller may wait again).
- Errors say who broke: :class:`ChannelError` "closed by us" after :meth:`Connection.close`,
  "broken" with the cause attached when the peer or the network failed, and
  :class:`AuthenticationError` when either side refused the other's certificate.

With TLS 1.3 the server judges the client's certificate after the client's handshake has
completed, so a refusal by the server reaches the client on its first ``recv()``: as
:class:`AuthenticationError` when the server refused it after the handshake (revoked, not a
member), but only as :class:`ChannelError` "closed before sending anything" when the TLS
handshake itself failed on the server (another CA), because asyncio drops the TLS alert.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from stead.channel.framing import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    Compression,
    CompressionMode,
    decode_payload,
    encode_frame_parts,
    encode_frame_tail,
)
from stead.channel.messages import Error, Message, parse_message
from stead.channel.stream import FrameStream
from stead.errors import AuthenticationError, ChannelError, TimeoutExpired
from stead.pki import cert_common_name, cert_serial

log = logging.getLogger(__name__)

PathLike = str | Path
Handler = Callable[["Connection"], Awaitable[None]]
AUTH_CODE = "auth"  # Error.code when a certificate is refused
CLOSE_TIMEOUT = 5.0  # a TLS close_notify to a vanished peer must not hold us up


class ChannelContext(ssl.SSLContext):
    """An SSL context that also carries the revoked serials checked after each handshake.

    The set is consulted on every new connection, so adding a serial to it in place takes
    effect for the next connection (connections already open are not re-checked).
    """

    revoked_serials: set[int]


def server_context(
    ca_pem_path: PathLike,
    cert_path: PathLike,
    key_path: PathLike,
    revoked_serials: set[int] | None = None,
) -> ChannelContext:
    """Server side: TLS 1.3 only, client certificates required and verified against the CA."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, ca_pem_path, cert_path, key_path, revoked_serials)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(
    ca_pem_path: PathLike,
    cert_path: PathLike,
    key_path: PathLike,
    revoked_serials: set[int] | None = None,
) -> ChannelContext:
    """Client side: TLS 1.3 only, the server verified against the CA, checked by CN later."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, ca_pem_path, cert_path, key_path, revoked_serials)
    ctx.check_hostname = False  # nodes connect by IP; connect() checks the CN instead
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _context(
    protocol: ssl._SSLMethod,
    ca_pem_path: PathLike,
    cert_path: PathLike,
    key_path: PathLike,
    revoked_serials: set[int] | None,
) -> ChannelContext:
    ctx = ChannelContext(protocol)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(cafile=str(ca_pem_path))
    ctx.load_cert_chain(str(cert_path), str(key_path))
    ctx.revoked_serials = revoked_serials if revoked_serials is not None else set()
    return ctx


class Connection:
    """One authenticated channel connection carrying typed messages.

    ``recv`` must not be called from two tasks at once; ``send`` may be.
    """

    def __init__(
        self,
        stream: FrameStream,
        peer_name: str,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        compression: Compression | None = None,
        io_timeout: float = 60.0,
    ) -> None:
        self._stream = stream
        assert stream.transport is not None
        self._transport = stream.transport
        stream.max_frame = max_frame
        self.peer_name = peer_name
        self.max_frame = max_frame
        self.compression = compression if compression is not None else Compression()
        self.io_timeout = io_timeout
        self.bytes_sent = 0
        self.bytes_received = 0
        self.messages_sent = 0
        self.messages_received = 0
        self._closed = False
        self._broken: ChannelError | None = None
        self._receiving = False

    @property
    def closed(self) -> bool:
        """True once closed by us or found broken."""
        return self._closed or self._broken is not None

    @property
    def peer_address(self) -> Any:
        return self._stream.get_extra_info("peername")

    @property
    def local_address(self) -> str:
        """Our address on this connection: which channel it came in on."""
        sockname = self._stream.get_extra_info("sockname")
        return str(sockname[0]) if sockname else "?"

    async def send(self, msg: Message) -> None:
        """Send one message and wait until the transport has taken it (bounded)."""
        self._check_usable()
        tail = msg.tail()
        if tail:
            parts = encode_frame_tail(msg.to_wire(), tail, self.compression, self.max_frame)
        else:
            parts = list(encode_frame_parts(msg.to_wire(), self.compression, self.max_frame))
        size = sum(len(part) for part in parts)
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.io_timeout):
                self._stream.write(*parts)  # one call: frames never interleave
                await self._stream.drain()
            if self.compression is not None:
                self.compression.observe_send(size, time.monotonic() - started)
        except TimeoutError:
            raise self._break(f"peer did not take data for {self.io_timeout}s") from None
        except (OSError, RuntimeError) as exc:  # RuntimeError: transport closing underneath
            raise self._break(f"send failed: {exc}", exc) from exc
        self.bytes_sent += size
        self.messages_sent += 1

    async def recv(self, timeout: float | None = None) -> Message:
        """Receive one message.

        Raises :class:`TimeoutExpired` if no frame starts within ``timeout`` (the connection
        stays usable), :class:`ProtocolError` for a malformed message (framing stays intact;
        the caller should send an :class:`Error` and close), :class:`ChannelError` when the
        connection is closed or broken, and a received :class:`Error` message is raised as
        :class:`ChannelError` (:class:`AuthenticationError` for a refused certificate).
        """
        self._check_usable()
        if self._receiving:
            raise RuntimeError("recv() called concurrently on one connection")
        self._receiving = True
        try:
            flags, payload = await self._read_frame(wait=timeout)
        finally:
            self._receiving = False
        self.bytes_received += HEADER_SIZE + len(payload)
        self.messages_received += 1
        msg = parse_message(decode_payload(payload, flags, self.max_frame))
        if isinstance(msg, Error):
            text = f"{self.peer_name} closed the channel: {msg.code}: {msg.message}"
            error = AuthenticationError(text) if msg.code == AUTH_CODE else ChannelError(text)
            self._broken = error
            self._transport.abort()
            raise error
        return msg

    async def _read_frame(self, wait: float | None) -> tuple[int, bytes | bytearray]:
        stream = self._stream
        try:
            async with asyncio.timeout(wait):
                # Nothing is consumed until a whole frame is there, so a timeout here (no
                # byte of the next frame yet) leaves the stream at a frame boundary.
                await stream.wait(lambda: stream.started)
        except TimeoutError:
            raise TimeoutExpired(f"nothing from {self.peer_name} for {wait}s") from None
        try:
            async with asyncio.timeout(self.io_timeout):
                await stream.wait(lambda: bool(stream.frames) or stream.eof or _refused(stream))
        except TimeoutError:
            done, length = stream.progress
            raise self._break(
                f"frame of {length} bytes unfinished after {self.io_timeout}s"
                if length
                else f"frame header unfinished after {self.io_timeout}s"
            ) from None
        except asyncio.CancelledError:
            if stream.in_frame:
                self._break("receive cancelled inside a frame")
            raise
        if stream.frames:
            return stream.pop()
        if stream.refused is not None:
            # The payload was not read: the stream is no longer at a frame boundary.
            self._break("refused a frame header")
            raise stream.refused
        if stream.lost is not None:
            raise self._break_from(stream.lost)
        if stream.in_frame:
            done, length = stream.progress
            if not length:
                raise self._break("peer closed the connection inside a frame header")
            raise self._break(f"peer closed the connection after {done} of {length} bytes")
        if self.messages_received == 0:
            # asyncio drops the TLS alert when the server's handshake fails, so a refused
            # certificate looks like this from the client side.
            where = "before sending anything (did it refuse our certificate?)"
        else:
            where = "between frames"
        raise self._break(f"peer closed the connection {where}")

    async def close(self, error: Error | None = None) -> None:
        """Close the connection; send ``error`` first when given (best effort). Idempotent."""
        if self._closed:
            return
        if error is not None and self._broken is None:
            try:
                await self.send(error)
            except ChannelError as exc:
                log.debug("could not tell %s why we close: %s", self.peer_name, exc)
        self._closed = True
        self._transport.close()
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.shield(self._stream.closed)
        except (TimeoutError, OSError, ssl.SSLError):
            # The peer is gone or slow to confirm; our side is released either way.
            self._transport.abort()

    def abort(self) -> None:
        """Drop the connection at once, without waiting for a peer that may be gone."""
        self._closed = True
        self._transport.abort()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise ChannelError(f"connection to {self.peer_name} was closed by us")
        if self._broken is not None:
            raise ChannelError(f"connection to {self.peer_name} is broken: {self._broken}")

    def _break(self, reason: str, cause: BaseException | None = None) -> ChannelError:
        """Mark the connection broken by the peer or the network, and drop it."""
        error = ChannelError(f"connection to {self.peer_name} broken: {reason}")
        error.__cause__ = cause
        if self._broken is None:
            self._broken = error
        self._transport.abort()
        return error

    def _break_from(self, exc: BaseException) -> ChannelError:
        if _is_certificate_alert(exc):
            error: ChannelError = AuthenticationError(
                f"{self.peer_name} refused our certificate: {exc}"
            )
            self._broken = error
            self._transport.abort()
            return error
        return self._break(str(exc) or type(exc).__name__, exc)


async def connect(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    expected_peer: str,
    timeout: float,  # bounds the TCP connect and the TLS handshake together
    *,
    max_frame: int = DEFAULT_MAX_FRAME,
    compression: Compression | CompressionMode | None = None,
    io_timeout: float = 60.0,
) -> Connection:
    """Connect to a node and check that it is ``expected_peer``.

    Raises :class:`AuthenticationError` when the certificates do not match, and
    :class:`ChannelError` when the node cannot be reached within ``timeout``.
    """
    where = f"{expected_peer} at {host}:{port}"
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            _, stream = await loop.create_connection(
                lambda: FrameStream(max_frame),
                host,
                port,
                ssl=ctx,
                server_hostname=expected_peer,
                ssl_handshake_timeout=timeout,
            )
    except TimeoutError:
        raise ChannelError(f"no answer from {where} within {timeout}s") from None
    except ssl.SSLCertVerificationError as exc:
        raise AuthenticationError(f"{where}: certificate refused: {exc.verify_message}") from exc
    except (OSError, ssl.SSLError) as exc:
        if _is_certificate_alert(exc):
            raise AuthenticationError(f"{where} refused our certificate: {exc}") from exc
        raise ChannelError(f"cannot connect to {where}: {exc}") from exc
    try:
        name = _check_peer(stream, ctx)
        if name != expected_peer:
            raise AuthenticationError(f"{host}:{port} is {name!r}, not {expected_peer!r}")
    except AuthenticationError:
        if stream.transport is not None:
            stream.transport.abort()
        raise
    return Connection(
        stream,
        name,
        max_frame=max_frame,
        compression=_compression(compression),
        io_timeout=io_timeout,
    )


class ChannelServer:
    """A listening channel endpoint that owns its connection tasks.

    It offers the shape of ``asyncio.Server`` (``close()``, ``wait_closed()``, ``sockets``,
    ``async with``), but ``close()`` also cancels every running handler and ``wait_closed()``
    waits for them, so no connection outlives the server (asyncio 3.11 leaves them running).
    """

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.connections_refused = 0

    @property
    def sockets(self) -> tuple[Any, ...]:
        return tuple(self.server.sockets) if self.server is not None else ()

    @property
    def port(self) -> int:
        """The port actually bound (useful with port 0)."""
        return int(self.sockets[0].getsockname()[1])

    @property
    def active_connections(self) -> int:
        return len(self._tasks)

    def is_serving(self) -> bool:
        return self.server is not None and self.server.is_serving()

    def close(self) -> None:
        """Stop listening and cancel every connection handler."""
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):
            task.cancel()

    async def wait_closed(self) -> None:
        """Wait until every connection handler has finished and closed its connection."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    async def __aenter__(self) -> ChannelServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
        await self.wait_closed()


async def serve(
    host: str,
    port: int,
    ctx: ssl.SSLContext,
    handler: Handler,
    *,
    accept_peer: Callable[[str], bool] | None = None,
    handshake_timeout: float = 10.0,
    max_frame: int = DEFAULT_MAX_FRAME,
    compression: CompressionMode | Callable[[], Compression] = "auto",
    io_timeout: float = 60.0,
) -> ChannelServer:
    """Listen for channel connections and run ``handler`` for each authenticated one.

    A peer whose certificate is revoked or whose name ``accept_peer`` refuses gets an
    :class:`Error` and is closed. A handler's exception is logged and its connection closed;
    the server keeps serving. The connection is closed when the handler returns.
    ``compression`` is a mode or a factory: each connection gets its own policy state.
    """
    channel_server = ChannelServer()

    async def run(stream: FrameStream) -> None:
        conn: Connection | None = None
        try:
            try:
                name = _check_peer(stream, ctx)
                if accept_peer is not None and not accept_peer(name):
                    raise AuthenticationError(f"{name!r} is not a member of this cluster")
            except AuthenticationError as exc:
                channel_server.connections_refused += 1
                log.warning("refused channel from %s: %s", stream.get_extra_info("peername"), exc)
                refused = Connection(stream, "<refused>", io_timeout=CLOSE_TIMEOUT)
                await refused.close(Error(AUTH_CODE, str(exc)))
                return
            conn = Connection(
                stream,
                name,
                max_frame=max_frame,
                compression=_compression(compression),
                io_timeout=io_timeout,
            )
            await handler(conn)
        except ChannelError as exc:
            log.info("channel with %s ended: %s", conn.peer_name if conn else "?", exc)
        except Exception:
            log.exception("channel handler for %s failed", conn.peer_name if conn else "?")
        finally:
            if conn is not None:
                await conn.close()
            elif stream.transport is not None and not stream.transport.is_closing():
                stream.transport.abort()

    def on_connect(stream: FrameStream) -> None:
        task = asyncio.create_task(run(stream))
        channel_server._tasks.add(task)
        task.add_done_callback(channel_server._tasks.discard)

    loop = asyncio.get_running_loop()
    channel_server.server = await loop.create_server(
        lambda: FrameStream(max_frame, on_connect),
        host,
        port,
        ssl=ctx,
        ssl_handshake_timeout=handshake_timeout,
    )
    return channel_server


class Backoff:
    """Delays for a reconnect loop: exponential, capped, with proportional jitter.

    It never sleeps itself: the caller sleeps ``next_delay()`` (on its injected clock) and
    calls ``reset()`` after a connection that worked.
    """

    def __init__(
        self,
        initial: float = 0.2,
        maximum: float = 5.0,
        factor: float = 2.0,
        jitter: float = 0.1,
        rng: random.Random | None = None,
    ) -> None:
        if initial <= 0 or maximum < initial or factor < 1 or not 0 <= jitter < 1:
            raise ValueError("invalid backoff parameters")
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self.jitter = jitter
        self._rng = rng or random.Random()
        self.attempts = 0

    def next_delay(self) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(self.attempts, 64))
        self.attempts += 1
        # Jitter spreads reconnects of several nodes that lost the link at the same moment.
        spread = base * self.jitter
        return min(self.maximum, max(0.0, base + self._rng.uniform(-spread, spread)))

    def reset(self) -> None:
        self.attempts = 0


def _compression(
    setting: Compression | CompressionMode | Callable[[], Compression] | None,
) -> Compression:
    if setting is None:
        return Compression()
    if isinstance(setting, str):
        return Compression(setting)
    if isinstance(setting, Compression):
        return setting
    return setting()


def _check_peer(stream: FrameStream, ctx: ssl.SSLContext) -> str:
    """The peer's CN after checking its certificate is present and not revoked."""
    ssl_object = stream.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not der:
        raise AuthenticationError("the peer presented no certificate")
    revoked = getattr(ctx, "revoked_serials", None) or set()
    serial = cert_serial(der)
    if serial in revoked:
        raise AuthenticationError(f"certificate serial {serial:x} is revoked")
    name = cert_common_name(der)
    if not name:
        raise AuthenticationError("the peer certificate has no common name")
    return name


def _is_certificate_alert(exc: BaseException) -> bool:
    """True for a TLS alert by which the peer rejected our certificate."""
    reason = getattr(exc, "reason", None) or ""
    return (
        isinstance(exc, ssl.SSLError)
        and "ALERT" in reason
        and ("CERTIFICATE" in reason or "UNKNOWN_CA" in reason or "ACCESS_DENIED" in reason)
    )


def _refused(stream: FrameStream) -> bool:
    return stream.refused is not None
