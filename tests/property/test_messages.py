"""Every channel message survives a round trip; nothing a peer sends crashes the parser."""

from __future__ import annotations

import contextlib
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from stead.channel import framing
from stead.channel import messages as m
from stead.channel.framing import Compression, decode_frame, encode_frame
from stead.errors import ChannelError, ProtocolError

U64 = st.integers(min_value=0, max_value=2**64 - 1)
I64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)
# Linux file names are bytes; those that are not UTF-8 travel as surrogate-escaped text.
LINUX_NAMES = st.binary(min_size=1, max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape"))
TEXT = st.text(max_size=40) | LINUX_NAMES
NAMES = st.text(min_size=1, max_size=20) | LINUX_NAMES
ROLES = st.sampled_from(sorted(m.ROLES))
FLOATS = st.floats(allow_nan=False, allow_infinity=False)

VALUES = st.recursive(
    st.none() | st.booleans() | I64 | FLOATS | TEXT | st.binary(max_size=64),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
BODIES = st.dictionaries(TEXT, VALUES, max_size=5)


@st.composite
def records(draw: st.DrawFn) -> m.Records:
    seqs = sorted(draw(st.sets(U64, max_size=8)))
    payloads = draw(st.lists(st.binary(max_size=256), min_size=len(seqs), max_size=len(seqs)))
    return m.Records(draw(U64), list(zip(seqs, payloads, strict=True)), draw(st.booleans()))


@st.composite
def acks(draw: st.DrawFn) -> m.Ack:
    applied, persisted, received = sorted(draw(st.lists(U64, min_size=3, max_size=3)))
    return m.Ack(received=received, persisted=persisted, applied=applied)


@st.composite
def replies(draw: st.DrawFn) -> m.Reply:
    ok = draw(st.booleans())
    error = draw(TEXT) if ok else draw(NAMES)
    return m.Reply(draw(U64), ok, draw(BODIES), error)


MESSAGES: st.SearchStrategy[m.Message] = st.one_of(
    st.builds(
        m.Hello,
        st.integers(1, 2**32),
        NAMES,
        NAMES,
        U64,
        ROLES,
        U64,
        U64,
        U64,
        tail_records=st.booleans(),
    ),
    records(),
    acks(),
    st.builds(m.Heartbeat, U64, ROLES, FLOATS, U64, U64),
    st.builds(m.Request, U64, NAMES, BODIES),
    replies(),
    st.builds(m.Error, NAMES, TEXT),
)
MODES = st.sampled_from(["auto", "always", "never"])


def test_every_type_is_covered() -> None:
    covered = {m.Hello, m.Records, m.Ack, m.Heartbeat, m.Request, m.Reply, m.Error}
    assert covered == set(m.message_types().values())


def _sent_form(msg: m.Message) -> m.Message:
    """What arrives: records without payloads go in the list form whatever was asked."""
    if isinstance(msg, m.Records) and not msg.records:
        return m.Records(msg.epoch, [])
    return msg


@given(MESSAGES.filter(lambda msg: not msg.tail()))
def test_wire_round_trip(msg: m.Message) -> None:
    assert m.parse_message(msg.to_wire()) == _sent_form(msg)


@given(MESSAGES, MODES)
def test_frame_round_trip(msg: m.Message, mode: framing.CompressionMode) -> None:
    """As the transport sends it: with its raw tail when it has one."""
    compression = Compression(mode, min_size=0)
    tail = msg.tail()
    if tail:
        frame = b"".join(framing.encode_frame_tail(msg.to_wire(), tail, compression))
    else:
        frame = encode_frame(msg.to_wire(), compression)
    assert m.parse_message(decode_frame(frame)) == _sent_form(msg)


@given(st.lists(NAMES, min_size=1, max_size=5), MODES)
def test_non_utf8_names_survive(names: list[str], mode: framing.CompressionMode) -> None:
    wire = {"type": "request", "id": 1, "kind": "list", "body": {n: n for n in names}}
    back = decode_frame(encode_frame(wire, Compression(mode, min_size=0)))
    raw = [n.encode("utf-8", "surrogateescape") for n in back["body"]]
    assert raw == [n.encode("utf-8", "surrogateescape") for n in dict.fromkeys(names)]


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    with contextlib.suppress(ProtocolError, ChannelError):
        m.parse_message(decode_frame(data, max_frame=4096))


@given(st.dictionaries(TEXT, VALUES, max_size=6), st.sampled_from(sorted(m.message_types())))
def test_arbitrary_maps_only_raise_protocol_errors(wire: dict[str, Any], type_name: str) -> None:
    wire["type"] = type_name
    with contextlib.suppress(ProtocolError):
        m.parse_message(wire)
