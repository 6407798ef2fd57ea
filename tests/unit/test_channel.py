"""The channel: framing, message validation and mutual TLS over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zstandard

from stead import pki
from stead.channel import framing
from stead.channel import messages as m
from stead.channel.framing import Compression, decode_frame, encode_frame
from stead.channel.transport import (
    AUTH_CODE,
    Backoff,
    ChannelServer,
    Connection,
    client_context,
    connect,
    serve,
    server_context,
)
from stead.errors import (
    AuthenticationError,
    ChannelError,
    FrameTooLarge,
    ProtocolError,
    TimeoutExpired,
)

HOST = "127.0.0.1"
TIMEOUT = 10.0


def hello(node: str) -> m.Hello:
    return m.Hello(m.PROTOCOL_VERSION, "c1", node, 3, "active", 10, 11, 12)


# ---- a PKI on disk --------------------------------------------------------------------------


@dataclass
class Identity:
    ca: Path
    cert: Path
    key: Path
    serial: int


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Identity]:
    """Nodes of our cluster, plus one node of a foreign cluster with its own CA."""
    base = tmp_path_factory.mktemp("pki")
    ids: dict[str, Identity] = {}
    for ca_name, nodes in (("lab", ["primary", "secondary", "stranger"]), ("evil", ["mallory"])):
        ca_cert, ca_key = pki.create_ca(ca_name)
        ca_path = base / f"{ca_name}-ca.pem"
        ca_path.write_bytes(ca_cert)
        for node in nodes:
            cert, key = pki.issue_node_cert(ca_cert, ca_key, node, [HOST])
            (base / f"{node}.pem").write_bytes(cert)
            pki.write_private(base / f"{node}.key", key)
            ids[node] = Identity(
                ca_path, base / f"{node}.pem", base / f"{node}.key", pki.cert_serial(cert)
            )
    return ids


def server_ctx(ids: dict[str, Identity], node: str, revoked: set[int] | None = None) -> Any:
    i = ids[node]
    return server_context(i.ca, i.cert, i.key, revoked or set())


def client_ctx(ids: dict[str, Identity], node: str, revoked: set[int] | None = None) -> Any:
    i = ids[node]
    return client_context(i.ca, i.cert, i.key, revoked or set())


Handler = Callable[[Connection], Awaitable[None]]


@pytest.fixture
async def start_server(
    pki_dir: dict[str, Identity],
) -> AsyncIterator[Callable[..., Awaitable[ChannelServer]]]:
    servers: list[ChannelServer] = []

    async def start(handler: Handler, **kwargs: Any) -> ChannelServer:
        revoked = kwargs.pop("revoked", None)
        ctx = server_ctx(pki_dir, "primary", revoked)
        server = await serve(HOST, 0, ctx, handler, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def echo_hello(conn: Connection) -> None:
    """Answer a hello with our own, then wait for the client to go."""
    got = await conn.recv(timeout=TIMEOUT)
    assert isinstance(got, m.Hello)
    await conn.send(hello("primary"))
    with contextlib.suppress(ChannelError):
        await conn.recv(timeout=TIMEOUT)


# ---- TLS and authentication -----------------------------------------------------------------


async def test_hello_both_ways(pki_dir: dict[str, Identity], start_server: Any) -> None:
    seen: asyncio.Future[tuple[str, m.Message, Connection]] = asyncio.Future()

    async def handler(conn: Connection) -> None:
        msg = await conn.recv(timeout=TIMEOUT)
        await conn.send(hello("primary"))
        seen.set_result((conn.peer_name, msg, conn))
        with pytest.raises(ChannelError, match="closed the connection"):
            await conn.recv(timeout=TIMEOUT)

    server = await start_server(handler)
    ctx = client_ctx(pki_dir, "secondary")
    async with await connect(HOST, server.port, ctx, "primary", TIMEOUT) as conn:
        assert conn.peer_name == "primary"
        await conn.send(hello("secondary"))
        answer = await conn.recv(timeout=TIMEOUT)
        peer, received, server_conn = await seen
    assert answer == hello("primary")
    assert peer == "secondary"
    assert received == hello("secondary")
    assert conn.bytes_sent == server_conn.bytes_received > 0
    assert conn.bytes_received == server_conn.bytes_sent > 0
    assert conn.messages_sent == conn.messages_received == 1


async def test_client_from_another_ca_fails_handshake(
    pki_dir: dict[str, Identity], start_server: Any
) -> None:
    calls = 0

    async def handler(conn: Connection) -> None:
        nonlocal calls
        calls += 1
        await echo_hello(conn)

    server = await start_server(handler)
    ctx = client_ctx(pki_dir, "mallory")
    # mallory trusts its own CA only, so make it trust ours to reach the server's check.
    ctx.load_verify_locations(cafile=str(pki_dir["primary"].ca))
    # With TLS 1.3 the client's handshake completes; the server's verdict comes on a read.
    async with await connect(HOST, server.port, ctx, "primary", TIMEOUT) as conn:
        with pytest.raises(ChannelError) as caught:
            await conn.recv(timeout=TIMEOUT)
    # asyncio drops the server's TLS alert, so the client can only tell that it got nothing.
    assert "before sending anything" in str(caught.value)
    assert server.connections_refused == 0  # refused by TLS itself, before our own checks
    await _still_serving(pki_dir, server)
    assert calls == 1  # only the good client reached the handler


async def test_server_from_another_ca_is_refused(pki_dir: dict[str, Identity]) -> None:
    mallory = pki_dir["mallory"]
    evil_ctx = server_context(mallory.ca, mallory.cert, mallory.key)
    evil_ctx.load_verify_locations(cafile=str(pki_dir["primary"].ca))
    async with await serve(HOST, 0, evil_ctx, echo_hello) as server:
        with pytest.raises(AuthenticationError, match="certificate"):
            await connect(HOST, server.port, client_ctx(pki_dir, "secondary"), "primary", TIMEOUT)


async def test_revoked_client_is_refused(pki_dir: dict[str, Identity], start_server: Any) -> None:
    server = await start_server(echo_hello, revoked={pki_dir["secondary"].serial})
    conn = await connect(HOST, server.port, client_ctx(pki_dir, "secondary"), "primary", TIMEOUT)
    async with conn:
        with pytest.raises(AuthenticationError, match="revoked"):
            await conn.recv(timeout=TIMEOUT)
        with pytest.raises(ChannelError, match="broken"):
            await conn.send(hello("secondary"))
    assert server.connections_refused == 1
    await _still_serving(pki_dir, server, client="stranger")


async def test_revoked_server_is_refused(pki_dir: dict[str, Identity], start_server: Any) -> None:
    server = await start_server(echo_hello)
    ctx = client_ctx(pki_dir, "secondary", revoked={pki_dir["primary"].serial})
    with pytest.raises(AuthenticationError, match="revoked"):
        await connect(HOST, server.port, ctx, "primary", TIMEOUT)
    await _still_serving(pki_dir, server)


async def test_wrong_node_is_refused(pki_dir: dict[str, Identity], start_server: Any) -> None:
    server = await start_server(echo_hello)
    with pytest.raises(AuthenticationError, match="not 'tertiary'"):
        await connect(HOST, server.port, client_ctx(pki_dir, "secondary"), "tertiary", TIMEOUT)


async def test_server_refuses_unknown_member(
    pki_dir: dict[str, Identity], start_server: Any
) -> None:
    server = await start_server(echo_hello, accept_peer=lambda name: name == "secondary")
    conn = await connect(HOST, server.port, client_ctx(pki_dir, "stranger"), "primary", TIMEOUT)
    async with conn:
        with pytest.raises(AuthenticationError, match="not a member"):
            await conn.recv(timeout=TIMEOUT)
    await _still_serving(pki_dir, server)


async def test_nobody_listening_is_a_channel_error(pki_dir: dict[str, Identity]) -> None:
    async with await serve(HOST, 0, server_ctx(pki_dir, "primary"), echo_hello) as server:
        port = server.port
    with pytest.raises(ChannelError, match="cannot connect") as caught:
        await connect(HOST, port, client_ctx(pki_dir, "secondary"), "primary", TIMEOUT)
    assert caught.value.retryable


async def _still_serving(
    ids: dict[str, Identity], server: ChannelServer, client: str = "secondary"
) -> None:
    async with await connect(HOST, server.port, client_ctx(ids, client), "primary", TIMEOUT) as c:
        await c.send(hello(client))
        assert await c.recv(timeout=TIMEOUT) == hello("primary")


# ---- connection behaviour -------------------------------------------------------------------


async def test_handler_failure_does_not_stop_the_server(
    pki_dir: dict[str, Identity], start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def handler(conn: Connection) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("handler bug")
        await echo_hello(conn)

    server = await start_server(handler)
    ctx = client_ctx(pki_dir, "secondary")
    async with await connect(HOST, server.port, ctx, "primary", TIMEOUT) as conn:
        with pytest.raises(ChannelError, match="closed the connection"):
            await conn.recv(timeout=TIMEOUT)
    assert "handler bug" in caplog.text
    await _still_serving(pki_dir, server)


async def test_who_broke_it(pki_dir: dict[str, Identity], start_server: Any) -> None:
    async def hang_up(conn: Connection) -> None:
        await conn.recv(timeout=TIMEOUT)

    server = await start_server(hang_up)
    conn = await connect(HOST, server.port, client_ctx(pki_dir, "secondary"), "primary", TIMEOUT)
    await conn.send(hello("secondary"))
    with pytest.raises(ChannelError, match="broken: peer closed"):
        await conn.recv(timeout=TIMEOUT)
    assert conn.closed
    await conn.close()
    with pytest.raises(ChannelError, match="closed by us"):
        await conn.send(hello("secondary"))
    with pytest.raises(ChannelError, match="closed by us"):
        await conn.recv(timeout=TIMEOUT)
    await conn.close()  # idempotent


async def test_recv_timeout_keeps_connection(
    pki_dir: dict[str, Identity], start_server: Any
) -> None:
    server = await start_server(echo_hello)
    ctx = client_ctx(pki_dir, "secondary")
    async with await connect(HOST, server.port, ctx, "primary", TIMEOUT) as conn:
        with pytest.raises(TimeoutExpired):
            await conn.recv(timeout=0.01)
        await conn.send(hello("secondary"))
        assert await conn.recv(timeout=TIMEOUT) == hello("primary")


async def test_error_message_is_raised(pki_dir: dict[str, Identity], start_server: Any) -> None:
    async def reject(conn: Connection) -> None:
        await conn.close(m.Error("cluster", "wrong cluster id"))

    server = await start_server(reject)
    ctx = client_ctx(pki_dir, "secondary")
    async with await connect(HOST, server.port, ctx, "primary", TIMEOUT) as conn:
        with pytest.raises(ChannelError, match="cluster: wrong cluster id") as caught:
            await conn.recv(timeout=TIMEOUT)
    assert not isinstance(caught.value, AuthenticationError)
    assert AUTH_CODE == "auth"


async def _server_recv_error(
    pki_dir: dict[str, Identity], start_server: Any, raw: bytes, **kwargs: Any
) -> BaseException:
    """Send raw bytes to a server and return what its recv() raised."""
    outcome: asyncio.Future[BaseException] = asyncio.Future()

    async def handler(conn: Connection) -> None:
        try:
            await conn.recv(timeout=TIMEOUT)
        except Exception as exc:
            outcome.set_result(exc)
            raise

    server = await start_server(handler, **kwargs)
    ctx = client_ctx(pki_dir, "secondary")
    async with await connect(HOST, server.port, ctx, "primary", TIMEOUT) as conn:
        conn._transport.write(raw)
        return await outcome


async def test_oversized_frame_refused(pki_dir: dict[str, Identity], start_server: Any) -> None:
    frame = encode_frame(m.Records(1, [(1, b"x" * 5000)]).to_wire(), Compression("never"))
    error = await _server_recv_error(pki_dir, start_server, frame, max_frame=1024)
    assert isinstance(error, FrameTooLarge)
    assert "exceeds the limit of 1024" in str(error)


async def test_malformed_message_refused(pki_dir: dict[str, Identity], start_server: Any) -> None:
    frame = encode_frame({"type": "ack", "received": -1, "persisted": 0, "applied": 0})
    error = await _server_recv_error(pki_dir, start_server, frame)
    assert isinstance(error, ProtocolError)
    assert "negative" in str(error)


async def test_sender_refuses_oversized_message(
    pki_dir: dict[str, Identity], start_server: Any
) -> None:
    server = await start_server(echo_hello)
    ctx = client_ctx(pki_dir, "secondary")
    conn = await connect(HOST, server.port, ctx, "primary", TIMEOUT, max_frame=1024)
    async with conn:
        with pytest.raises(FrameTooLarge, match="outgoing"):
            await conn.send(m.Records(1, [(1, b"x" * 5000)]))
        await conn.send(hello("secondary"))  # still usable: nothing was written
        assert await conn.recv(timeout=TIMEOUT) == hello("primary")


async def test_records_travel_as_a_raw_tail(
    pki_dir: dict[str, Identity], start_server: Any
) -> None:
    """The form an active sends a passive that asked for it: payloads as views of the
    received frame, seqs in the map."""
    records = [(7, b"a" * 5000), (8, b""), (10, bytes(range(256)) * 300)]
    received: asyncio.Future[m.Message] = asyncio.get_running_loop().create_future()

    async def take(conn: Connection) -> None:
        received.set_result(await conn.recv(timeout=TIMEOUT))

    server = await start_server(take)
    ctx = client_ctx(pki_dir, "secondary")
    async with await connect(HOST, server.port, ctx, "primary", TIMEOUT) as conn:
        await conn.send(m.Records(3, records, as_tail=True))
        async with asyncio.timeout(TIMEOUT):
            message = await received
    assert isinstance(message, m.Records)
    assert message.as_tail
    assert message.epoch == 3
    assert [(seq, bytes(payload)) for seq, payload in message.records] == records


# ---- message validation ---------------------------------------------------------------------

GOOD_HELLO = hello("primary").to_wire()


@pytest.mark.parametrize(
    ("wire", "complaint"),
    [
        ([], "not a map"),
        ({}, "without a type"),
        ({"type": "nonsense"}, "unknown message type"),
        ({**GOOD_HELLO, "epoch": -1}, "negative"),
        ({**GOOD_HELLO, "epoch": True}, "not int"),
        ({**GOOD_HELLO, "epoch": 1.5}, "not int"),
        ({**GOOD_HELLO, "role": "leader"}, "unknown role"),
        ({**GOOD_HELLO, "node": ""}, "empty"),
        ({**GOOD_HELLO, "protocol": 0}, "protocol"),
        ({k: v for k, v in GOOD_HELLO.items() if k != "node"}, "missing field 'node'"),
        ({"type": "records", "epoch": 1, "records": [[2, b"a"], [2, b"b"]]}, "does not follow"),
        ({"type": "records", "epoch": 1, "records": [[-1, b"a"]]}, "invalid seq"),
        ({"type": "records", "epoch": 1, "records": [[1, "text"]]}, "not bytes"),
        ({"type": "records", "epoch": 1, "records": [[1]]}, "pair"),
        ({"type": "records", "epoch": 1, "records": {}}, "not list"),
        ({"type": "records", "epoch": 1, "seqs": [1, 2], "tail": [b"a"]}, "2 seqs but a tail of 1"),
        ({"type": "records", "epoch": 1, "seqs": [2, 2], "tail": [b"a", b"b"]}, "does not follow"),
        ({"type": "records", "epoch": 1, "seqs": [True], "tail": [b"a"]}, "invalid seq"),
        ({"type": "records", "epoch": 1, "tail": [b"a"]}, "needs a list of seqs"),
        ({**GOOD_HELLO, "tail_records": "yes"}, "not bool"),
        ({"type": "ack", "received": 1, "persisted": 2, "applied": 0}, "out of order"),
        ({"type": "heartbeat", "epoch": 1, "role": "active", "sent_at": float("nan"),
          "journal_head": 0, "applied_seq": 0}, "finite"),
        ({"type": "heartbeat", "epoch": 1, "role": "active", "sent_at": "now",
          "journal_head": 0, "applied_seq": 0}, "not a number"),
        ({"type": "request", "id": 1, "kind": "", "body": {}}, "empty"),
        ({"type": "request", "id": 1, "kind": "x", "body": {b"k": 1}}, "non-text key"),
        ({"type": "reply", "id": 1, "ok": 1, "body": {}, "error": ""}, "not bool"),
        ({"type": "reply", "id": 1, "ok": False, "body": {}, "error": ""}, "must say why"),
        ({"type": "error", "code": 5, "message": ""}, "not str"),
    ],
)  # fmt: skip
def test_malformed_messages(wire: Any, complaint: str) -> None:
    with pytest.raises(ProtocolError, match=complaint):
        m.parse_message(wire)


def test_protocol_version_check() -> None:
    m.check_protocol(hello("primary"))
    with pytest.raises(ProtocolError, match="speaks protocol 2"):
        m.check_protocol(m.Hello(2, "c1", "x", 0, "passive", 0, 0, 0))


def test_unknown_fields_are_ignored() -> None:
    assert m.parse_message({**GOOD_HELLO, "later": 1}) == hello("primary")


def test_register_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="twice"):
        m.register("hello")(m.Ack)
    assert set(m.message_types()) >= {"hello", "records", "ack", "heartbeat", "error"}


# ---- framing --------------------------------------------------------------------------------


def _reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
def test_frame_round_trip(mode: framing.CompressionMode) -> None:
    obj = {"type": "x", "name": b"caf\xe9".decode("utf-8", "surrogateescape"), "d": b"a" * 4000}
    frame = encode_frame(obj, Compression(mode))
    assert decode_frame(frame) == obj
    compressed = bool(frame[4] & framing.FLAG_ZSTD)
    assert compressed == (mode != "never")
    if compressed:
        assert len(frame) < 1000


async def test_stream_round_trip_and_clean_eof() -> None:
    frames = b"".join(encode_frame({"n": n}) for n in range(3))
    reader = _reader(frames)
    assert [await framing.read_message(reader) for _ in range(3)] == [{"n": n} for n in range(3)]
    with pytest.raises(ChannelError, match=r"peer closed the connection$"):
        await framing.read_message(reader)


async def test_truncated_stream() -> None:
    frame = encode_frame({"n": 1})
    with pytest.raises(ChannelError, match="inside a frame header"):
        await framing.read_message(_reader(frame[:3]))
    with pytest.raises(ChannelError, match="payload bytes"):
        await framing.read_message(_reader(frame[:-1]))


async def test_oversized_header_refused_before_payload() -> None:
    # Only the header is there and the stream stays open: refusal must not wait for data.
    header = framing.HEADER.pack(2**31, 0)
    with pytest.raises(FrameTooLarge):
        await framing.read_message(_reader(header, eof=False), max_frame=1024)


def test_unknown_flags_and_bad_payloads() -> None:
    with pytest.raises(ProtocolError, match="flags"):
        decode_frame(framing.HEADER.pack(1, 0x80) + b"\x80")
    with pytest.raises(ProtocolError, match="not a map"):
        decode_frame(framing.HEADER.pack(1, 0) + msgpack.packb(1))
    with pytest.raises(ProtocolError, match="undecodable"):
        decode_frame(framing.HEADER.pack(1, 0) + b"\xc1")
    with pytest.raises(ProtocolError, match="compressed"):
        decode_frame(framing.HEADER.pack(4, framing.FLAG_ZSTD) + b"junk")
    with pytest.raises(ProtocolError, match="does not match"):
        decode_frame(framing.HEADER.pack(9, 0) + b"\x80")


@pytest.mark.parametrize("mode", ["auto", "always", "never"])
def test_tail_round_trip(mode: framing.CompressionMode) -> None:
    """Raw parts after the map come back as views of the frame, byte for byte."""
    tail = [b"", b"x", os.urandom(100), b"a" * 70_000, os.urandom(3), b"b" * 200_000]
    parts = framing.encode_frame_tail({"type": "reply", "n": 1}, tail, Compression(mode))
    frame = b"".join(parts)
    assert frame[4] & framing.FLAG_TAIL
    assert bool(frame[4] & framing.FLAG_ZSTD) == (mode != "never")  # auto: link rate unknown
    if mode == "never":
        # Large parts are written as they are, small ones joined into runs.
        assert any(part is tail[3] for part in parts) and any(p is tail[5] for p in parts)
        assert len(parts) < 2 + len(tail)
    wire = decode_frame(frame)
    assert [bytes(p) for p in wire["tail"]] == tail
    assert all(isinstance(p, memoryview) for p in wire["tail"])
    assert wire["n"] == 1


def test_malformed_tails_are_refused() -> None:
    def framed(payload: bytes, flags: int = framing.FLAG_TAIL) -> bytes:
        return framing.HEADER.pack(len(payload), flags) + payload

    head = msgpack.packb({"type": "reply", "tail": [3, 2]})
    good = framing.MAP_LENGTH.pack(len(head)) + head + b"abcde"
    assert [bytes(p) for p in decode_frame(framed(good))["tail"]] == [b"abc", b"de"]
    cases = {
        "too short": b"\0\0",
        "exceeds the frame": framing.MAP_LENGTH.pack(10_000) + head,
        "do not match": framing.MAP_LENGTH.pack(len(head)) + head + b"abcdef",
    }
    for complaint, payload in cases.items():
        with pytest.raises(ProtocolError, match=complaint):
            decode_frame(framed(payload))
    for sizes in ([-1, 6], [True, 4], "5", [5.0]):
        head = msgpack.packb({"type": "reply", "tail": sizes})
        with pytest.raises(ProtocolError, match="do not match"):
            decode_frame(framed(framing.MAP_LENGTH.pack(len(head)) + head + b"abcde"))
    with pytest.raises(ProtocolError, match="without one"):  # a tail key, no tail flag
        decode_frame(framed(msgpack.packb({"type": "reply", "tail": [1]}), 0))
    forged = {"type": "reply", "id": 1, "ok": True, "body": {}, "error": "", "tail": [1]}
    with pytest.raises(ProtocolError, match="tail"):  # a reply built from a forged map
        m.parse_message(forged)


async def test_a_reply_with_a_tail_over_tls(
    pki_dir: dict[str, Identity], start_server: Any
) -> None:
    data = (b"", os.urandom(10), os.urandom(300_000), os.urandom(5000))

    async def answer(conn: Connection) -> None:
        request = await conn.recv(timeout=TIMEOUT)
        assert isinstance(request, m.Request)
        await conn.send(m.Reply(id=request.id, ok=True, body={"n": 4}, data=data))
        with contextlib.suppress(ChannelError):
            await conn.recv(timeout=TIMEOUT)

    server = await start_server(answer)
    async with await connect(HOST, server.port, client_ctx(pki_dir, "secondary"), "primary",
                             TIMEOUT) as conn:  # fmt: skip
        await conn.send(m.Request(id=7, kind="read", body={}))
        reply = await conn.recv(timeout=TIMEOUT)
    assert isinstance(reply, m.Reply)
    assert (reply.id, reply.body) == (7, {"n": 4})
    assert [bytes(d) for d in reply.data] == list(data)


def test_zip_bomb_with_declared_size_refused() -> None:
    bomb = zstandard.ZstdCompressor().compress(msgpack.packb({"d": b"\0" * 1_000_000}))
    assert len(bomb) < 1000
    with pytest.raises(FrameTooLarge, match="expands"):
        framing.decode_payload(bomb, framing.FLAG_ZSTD, max_frame=100_000)


def test_zip_bomb_without_declared_size_refused() -> None:
    stream = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    bomb = stream.compress(msgpack.packb({"d": b"\0" * 1_000_000})) + stream.flush()
    assert zstandard.frame_content_size(bomb) == -1
    with pytest.raises(ProtocolError):
        framing.decode_payload(bomb, framing.FLAG_ZSTD, max_frame=100_000)
    assert framing.decode_payload(bomb, framing.FLAG_ZSTD)["d"] == b"\0" * 1_000_000


def test_auto_compression_skips_small_frames() -> None:
    policy = Compression("auto", min_size=512)
    flags, payload = policy.apply(b"a" * 100)
    assert (flags, payload) == (0, b"a" * 100)


def test_auto_compression_pauses_when_it_does_not_pay() -> None:
    rng = random.Random(7)
    policy = Compression("auto", sample=4, pause=3)
    noise = [rng.randbytes(2048) for _ in range(4)]
    for chunk in noise:  # the sample: compressed tries, none pays off
        assert policy.apply(chunk)[0] == 0
    assert policy.paused
    for _ in range(3):  # the pause: even compressible data goes as it is
        assert policy.apply(b"a" * 2048)[0] == 0
    assert not policy.paused
    assert policy.apply(b"a" * 2048)[0] == framing.FLAG_ZSTD  # and then it tries again
    assert policy.frames_compressed == 1
    assert policy.frames_plain == 7


def test_compression_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="mode"):
        Compression("sometimes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="parameters"):
        Compression(sample=0)


# ---- backoff --------------------------------------------------------------------------------


def test_backoff_grows_caps_and_resets() -> None:
    backoff = Backoff(initial=0.2, maximum=5.0, factor=2, jitter=0.0)
    assert [backoff.next_delay() for _ in range(7)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    backoff.reset()
    assert backoff.next_delay() == 0.2
    delays = [backoff.next_delay() for _ in range(200)]  # no overflow after many attempts
    assert delays[-1] == max(delays) == 5.0


def test_backoff_jitter_stays_in_bounds() -> None:
    backoff = Backoff(initial=1.0, maximum=5.0, factor=2, jitter=0.25, rng=random.Random(1))
    delays = [backoff.next_delay() for _ in range(50)]
    assert 0.75 <= delays[0] <= 1.25
    assert all(0 < d <= 5.0 for d in delays)
    assert len(set(delays[5:])) > 1  # jittered, not all equal at the cap


def test_contexts_are_tls13_only(pki_dir: dict[str, Identity]) -> None:
    for ctx in (server_ctx(pki_dir, "primary"), client_ctx(pki_dir, "primary")):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED


async def test_stalled_frame_breaks_the_connection(
    pki_dir: dict[str, Identity], start_server: Any
) -> None:
    frame = encode_frame(hello("secondary").to_wire())
    # Header and half the payload, then silence: the stream is mid-frame and must be dropped.
    error = await _server_recv_error(pki_dir, start_server, frame[:-5], io_timeout=0.05)
    assert isinstance(error, ChannelError)
    assert "unfinished" in str(error)


def test_auto_compression_stays_out_of_the_way_on_fast_links() -> None:
    from stead.channel.framing import Compression

    text = b"compressible " * 10_000
    slow = Compression("auto")
    slow.observe_send(4 * 1024**2, 1.0)  # 4 MiB/s: a WAN
    assert slow.apply(text)[0] != 0
    fast = Compression("auto")
    fast.observe_send(4 * 1024**2, 0.002)  # 2 GB/s: namespaces on one host
    assert fast.apply(text) == (0, text)
    fast.observe_send(100, 10.0)  # small frames say nothing about the link
    assert fast.link_is_fast
    for _ in range(30):  # the link slows down: compression comes back
        fast.observe_send(4 * 1024**2, 1.0)
    assert fast.apply(text)[0] != 0
