"""The channel's vocabulary: versioned, typed messages.

Every message is a frozen dataclass. ``to_wire()`` gives the map that framing packs (with a
``"type"`` key); ``from_wire()`` builds the message back from what a peer sent and checks
every field, raising :class:`ProtocolError` with a sentence that names the message and the
field on anything malformed. Nothing a peer sends is trusted.

Versioning: :data:`PROTOCOL_VERSION` travels in :class:`Hello`; a node refuses a peer whose
version it does not speak (that decision belongs to the caller, see
:func:`check_protocol`). Unknown keys in a known message are ignored, so a later version may
add optional fields without breaking older peers; a new message type is a new class under
``@register``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from stead.channel.framing import TAIL_KEY
from stead.errors import ProtocolError

PROTOCOL_VERSION = 1
ROLES = frozenset({"active", "passive"})
MAX_TEXT = 64 * 1024  # no legitimate name, kind or error text comes close

_REGISTRY: dict[str, type[Message]] = {}
M = TypeVar("M", bound="type[Message]")


class Message:
    """Base of every channel message; subclasses are frozen dataclasses under ``@register``."""

    __slots__ = ()
    TYPE: ClassVar[str] = ""

    def to_wire(self) -> dict[str, Any]:
        raise NotImplementedError

    def tail(self) -> list[Any]:
        """Raw parts sent after the map (see :mod:`stead.channel.framing`); none here."""
        return []

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Message:
        raise NotImplementedError


def register(type_name: str) -> Callable[[M], M]:
    """Class decorator: make a message type known to :func:`parse_message`."""

    def decorate(cls: M) -> M:
        if type_name in _REGISTRY:
            raise ValueError(f"message type {type_name!r} registered twice")
        cls.TYPE = type_name
        _REGISTRY[type_name] = cls
        return cls

    return decorate


def message_types() -> dict[str, type[Message]]:
    """Every registered message type by wire name."""
    return dict(_REGISTRY)


def parse_message(wire: Any) -> Message:
    """Build the typed message that a decoded frame holds."""
    if not isinstance(wire, dict):
        raise ProtocolError("message is not a map")
    type_name = wire.get("type")
    if not isinstance(type_name, str):
        raise ProtocolError("message without a type")
    cls = _REGISTRY.get(type_name)
    if cls is None:
        raise ProtocolError(f"unknown message type {type_name[:64]!r}")
    return cls.from_wire(wire)


def check_protocol(hello: Hello) -> None:
    """Refuse a peer that does not speak our protocol version."""
    if hello.protocol != PROTOCOL_VERSION:
        raise ProtocolError(
            f"peer {hello.node!r} speaks protocol {hello.protocol}, we speak {PROTOCOL_VERSION}"
        )


@register("hello")
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Sent by both sides first on every connection: who I am and where I stand."""

    protocol: int
    cluster_id: str
    node: str
    epoch: int
    role: str
    applied_seq: int
    persisted_seq: int
    journal_head: int
    # "replication" (the active's stream to a passive), "heartbeat" (membership link) or
    # "reclone" (a passive pulling the reclone scope from the active).
    purpose: str = "replication"
    # The epoch whose history the node's position (applied/persisted) belongs to; -1: the
    # same as ``epoch`` (older peers do not send it).
    lineage: int = -1
    # A passive that takes :class:`Records` with the payloads as the frame's raw tail says
    # so; an active sends that form only to such a passive (older ones get the list form).
    tail_records: bool = False

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "purpose": self.purpose,
            "lineage": self.lineage,
            "tail_records": self.tail_records,
            "protocol": self.protocol,
            "cluster_id": self.cluster_id,
            "node": self.node,
            "epoch": self.epoch,
            "role": self.role,
            "applied_seq": self.applied_seq,
            "persisted_seq": self.persisted_seq,
            "journal_head": self.journal_head,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Hello:
        f = _Fields(cls.TYPE, wire)
        protocol = f.uint("protocol")
        if protocol < 1:
            raise ProtocolError("hello: protocol must be at least 1")
        return cls(
            protocol=protocol,
            cluster_id=f.text("cluster_id", required=True),
            node=f.text("node", required=True),
            epoch=f.uint("epoch"),
            role=f.role("role"),
            applied_seq=f.uint("applied_seq"),
            persisted_seq=f.uint("persisted_seq"),
            journal_head=f.uint("journal_head"),
            purpose=f.choice("purpose", PURPOSES, default="replication"),
            lineage=f.optional_int("lineage", default=-1, minimum=-1),
            tail_records=f.flag("tail_records", default=False),
        )


PURPOSES = frozenset({"replication", "heartbeat", "reclone"})


@register("records")
@dataclass(frozen=True, slots=True)
class Records(Message):
    """A batch of journal records ``(seq, payload)`` with strictly increasing seqs.

    With ``as_tail`` the payloads travel as the frame's raw tail and only their seqs in the
    map: neither side copies them through msgpack (the receiver gets views of the frame).
    Sent so only to a passive whose hello asked for it; both forms are accepted.
    """

    epoch: int
    records: list[tuple[int, Any]]  # payloads: bytes, or views of the received frame
    as_tail: bool = False

    def tail(self) -> list[Any]:
        return [payload for _, payload in self.records] if self.as_tail else []

    def to_wire(self) -> dict[str, Any]:
        if self.as_tail and self.records:
            return {"type": self.TYPE, "epoch": self.epoch, "seqs": [s for s, _ in self.records]}
        return {
            "type": self.TYPE,
            "epoch": self.epoch,
            "records": [[seq, payload] for seq, payload in self.records],
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Records:
        f = _Fields(cls.TYPE, wire)
        epoch = f.uint("epoch")
        if TAIL_KEY in wire:
            return cls(epoch=epoch, records=_tail_records(wire), as_tail=True)
        raw = f.get("records", list)
        records: list[tuple[int, Any]] = []
        previous = -1
        for index, item in enumerate(raw):
            if not isinstance(item, list) or len(item) != 2:
                raise ProtocolError(f"records: record {index} is not a [seq, payload] pair")
            seq, payload = item
            if not _is_int(seq) or seq < 0:
                raise ProtocolError(f"records: record {index} has an invalid seq {seq!r}")
            if not isinstance(payload, bytes):
                raise ProtocolError(f"records: record {index} payload is not bytes")
            if seq <= previous:
                raise ProtocolError(f"records: seq {seq} does not follow {previous}")
            previous = seq
            records.append((seq, payload))
        return cls(epoch=epoch, records=records)


def _tail_records(wire: dict[str, Any]) -> list[tuple[int, Any]]:
    """The records of the tail form: ``seqs`` in the map, one tail part per seq."""
    seqs, parts = wire.get("seqs"), wire[TAIL_KEY]
    if not isinstance(seqs, list):
        raise ProtocolError("records: the tail form needs a list of seqs")
    if not isinstance(parts, list) or len(parts) != len(seqs):
        raise ProtocolError(f"records: {len(seqs)} seqs but a tail of {len(parts)} parts")
    previous = -1
    for index, seq in enumerate(seqs):
        if not _is_int(seq) or seq < 0:
            raise ProtocolError(f"records: record {index} has an invalid seq {seq!r}")
        if seq <= previous:
            raise ProtocolError(f"records: seq {seq} does not follow {previous}")
        previous = seq
    return list(zip(seqs, parts, strict=True))


@register("ack")
@dataclass(frozen=True, slots=True)
class Ack(Message):
    """A passive's three marks; ``applied <= persisted <= received`` always holds."""

    received: int
    persisted: int
    applied: int
    out_of_sync: bool = False  # the passive skipped an entry it could not apply: check it

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "received": self.received,
            "persisted": self.persisted,
            "applied": self.applied,
            "out_of_sync": self.out_of_sync,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Ack:
        f = _Fields(cls.TYPE, wire)
        received, persisted, applied = f.uint("received"), f.uint("persisted"), f.uint("applied")
        if not applied <= persisted <= received:
            raise ProtocolError(
                f"ack: marks out of order (received {received}, persisted {persisted}, "
                f"applied {applied})"
            )
        out_of_sync = wire.get("out_of_sync", False)
        if not isinstance(out_of_sync, bool):
            raise ProtocolError("ack: out_of_sync is not a boolean")
        return cls(received=received, persisted=persisted, applied=applied, out_of_sync=out_of_sync)


@register("heartbeat")
@dataclass(frozen=True, slots=True)
class Heartbeat(Message):
    """Periodic liveness and position; ``sent_at`` is the sender's wall clock (seconds).

    On membership links it also carries what the decision cycle of the receiving node needs
    to know of the sender (optional fields: older peers do not send them).
    """

    epoch: int
    role: str
    sent_at: float
    journal_head: int
    applied_seq: int
    in_sync: bool = True
    sees_active: bool = True  # heard an active within the failover timeout
    witnesses_ok: bool | None = None  # None: no witnesses configured
    maintenance: bool = False
    lineage: int = -1
    active: str = ""  # the node the sender follows (or itself, when active)

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "epoch": self.epoch,
            "role": self.role,
            "sent_at": float(self.sent_at),
            "journal_head": self.journal_head,
            "applied_seq": self.applied_seq,
            "in_sync": self.in_sync,
            "sees_active": self.sees_active,
            "witnesses_ok": self.witnesses_ok,
            "maintenance": self.maintenance,
            "lineage": self.lineage,
            "active": self.active,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Heartbeat:
        f = _Fields(cls.TYPE, wire)
        return cls(
            epoch=f.uint("epoch"),
            role=f.role("role"),
            sent_at=f.number("sent_at"),
            journal_head=f.uint("journal_head"),
            applied_seq=f.uint("applied_seq"),
            in_sync=f.flag("in_sync", default=True),
            sees_active=f.flag("sees_active", default=True),
            witnesses_ok=f.optional_flag("witnesses_ok"),
            maintenance=f.flag("maintenance", default=False),
            lineage=f.optional_int("lineage", default=-1, minimum=-1),
            active=f.text("active") if "active" in wire else "",
        )


@register("request")
@dataclass(frozen=True, slots=True)
class Request(Message):
    """A generic request; the receiver answers with a :class:`Reply` of the same ``id``."""

    id: int
    kind: str
    body: dict[str, Any]

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "id": self.id, "kind": self.kind, "body": self.body}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Request:
        f = _Fields(cls.TYPE, wire)
        return cls(id=f.uint("id"), kind=f.text("kind", required=True), body=f.body("body"))


@register("reply")
@dataclass(frozen=True, slots=True)
class Reply(Message):
    """The answer to a :class:`Request`; ``error`` is empty when ``ok``. ``data``: bulk
    bytes sent raw after the map (received as views of the frame), for a request that asked
    for them so."""

    id: int
    ok: bool
    body: dict[str, Any]
    error: str = ""
    data: tuple[Any, ...] = ()  # bytes-like

    def tail(self) -> list[Any]:
        return list(self.data)

    def to_wire(self) -> dict[str, Any]:
        return {
            "type": self.TYPE,
            "id": self.id,
            "ok": self.ok,
            "body": self.body,
            "error": self.error,
        }

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Reply:
        f = _Fields(cls.TYPE, wire)
        ok = f.get("ok", bool)
        error = f.text("error")
        if not ok and not error:
            raise ProtocolError("reply: a failed reply must say why")
        data = wire.get(TAIL_KEY, [])
        if not isinstance(data, list) or not all(isinstance(d, bytes | memoryview) for d in data):
            raise ProtocolError("reply: the tail is not a list of bytes")
        return cls(id=f.uint("id"), ok=ok, body=f.body("body"), error=error, data=tuple(data))


@register("error")
@dataclass(frozen=True, slots=True)
class Error(Message):
    """Sent just before closing a connection, to say why."""

    code: str
    message: str

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.TYPE, "code": self.code, "message": self.message}

    @classmethod
    def from_wire(cls, wire: dict[str, Any]) -> Error:
        f = _Fields(cls.TYPE, wire)
        return cls(code=f.text("code", required=True), message=f.text("message"))


T = TypeVar("T")


class _Fields:
    """Field access that names the message and the field in every complaint."""

    __slots__ = ("name", "wire")

    def __init__(self, name: str, wire: dict[str, Any]) -> None:
        self.name = name
        self.wire = wire

    def get(self, key: str, kind: type[T]) -> T:
        if key not in self.wire:
            raise ProtocolError(f"{self.name}: missing field {key!r}")
        value = self.wire[key]
        # bool is an int in Python: an int field must not accept True.
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ProtocolError(
                f"{self.name}: field {key!r} is a {type(value).__name__}, not {kind.__name__}"
            )
        return value

    def uint(self, key: str) -> int:
        value = self.get(key, int)
        if value < 0:
            raise ProtocolError(f"{self.name}: field {key!r} is negative ({value})")
        return value

    def text(self, key: str, *, required: bool = False) -> str:
        value = self.get(key, str)
        if required and not value:
            raise ProtocolError(f"{self.name}: field {key!r} is empty")
        if len(value) > MAX_TEXT:
            raise ProtocolError(f"{self.name}: field {key!r} is too long")
        return value

    def role(self, key: str) -> str:
        value = self.get(key, str)
        if value not in ROLES:
            raise ProtocolError(f"{self.name}: unknown role {value[:32]!r}")
        return value

    def number(self, key: str) -> float:
        if key not in self.wire:
            raise ProtocolError(f"{self.name}: missing field {key!r}")
        value = self.wire[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(f"{self.name}: field {key!r} is not a number")
        result = float(value)
        if not math.isfinite(result):
            raise ProtocolError(f"{self.name}: field {key!r} is not finite")
        return result

    def flag(self, key: str, *, default: bool) -> bool:
        if key not in self.wire:
            return default
        return self.get(key, bool)

    def optional_flag(self, key: str) -> bool | None:
        if self.wire.get(key) is None:
            return None
        return self.get(key, bool)

    def optional_int(self, key: str, *, default: int, minimum: int) -> int:
        if key not in self.wire:
            return default
        value = self.get(key, int)
        if value < minimum:
            raise ProtocolError(f"{self.name}: field {key!r} is below {minimum} ({value})")
        return value

    def choice(self, key: str, allowed: frozenset[str], *, default: str) -> str:
        if key not in self.wire:
            return default
        value = self.get(key, str)
        if value not in allowed:
            raise ProtocolError(f"{self.name}: field {key!r} is not one of {sorted(allowed)}")
        return value

    def body(self, key: str) -> dict[str, Any]:
        value = self.get(key, dict)
        # strict_map_key lets bytes keys through; bodies are keyed by text only.
        if not all(isinstance(k, str) for k in value):
            raise ProtocolError(f"{self.name}: field {key!r} has a non-text key")
        return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
