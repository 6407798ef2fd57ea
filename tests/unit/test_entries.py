"""Entries from a peer: every malformed or out-of-range field is refused before use."""

from __future__ import annotations

from typing import Any

import pytest

from stead.errors import ProtocolError
from stead.replication.entries import Entry, Op

GOOD: dict[str, Any] = {"o": "file", "r": "/srv", "p": "a/b", "d": b"x", "s": 1}


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"o": "explode"}, "unknown entry op"),
        ({"p": "../etc/passwd"}, "'..'"),
        ({"p": "/etc/passwd"}, "absolute"),
        ({"p": "a//b"}, "empty"),
        ({"p": "a\x00b"}, "NUL"),
        ({"p": "x" * 300}, "too long"),
        ({"r": 7}, "not text"),
        ({"d": "text"}, "not bytes"),
        ({"s": -1}, "non-negative"),
        ({"off": 2**62}, "largest file"),
        ({"u": 2**40}, "uid out of range"),
        ({"g": -1}, "gid out of range"),
        ({"m": 0o17777}, "mode out of range"),
        ({"t_ns": 2**70}, "mtime out of range"),
        ({"f": "yes"}, "boolean"),
        ({"k": 1}, "boolean"),
    ],
)
def test_malformed_entries_are_refused(change: dict[str, Any], text: str) -> None:
    with pytest.raises(ProtocolError, match=text):
        Entry.from_wire({**GOOD, **change})


def test_delta_blocks_are_checked() -> None:
    base = {"o": "delta", "r": "/srv", "p": "f", "s": 10}
    for blocks in ([[0]], [[-1, b"x"]], [["0", b"x"]], [[2**62, b"x"]], "nope"):
        with pytest.raises(ProtocolError):
            Entry.from_wire({**base, "b": blocks})
    ok = Entry.from_wire({**base, "b": [[4, b"abc"]]})
    assert ok.blocks == ((4, b"abc"),)


def test_rename_target_must_be_safe() -> None:
    with pytest.raises(ProtocolError, match=r"'\.\.'"):
        Entry.from_wire({"o": "rename", "r": "/srv", "p": "a", "t": "../b"})
    entry = Entry.from_wire({"o": "symlink", "r": "/srv", "p": "l", "t": "/anywhere"})
    assert entry.op is Op.SYMLINK  # a symlink's target is opaque text, never followed


def test_round_trip() -> None:
    entry = Entry(Op.FILE, "/srv", "a/\udcffb", data=b"x", size=1, mode=0o644, uid=1, gid=2)
    assert Entry.from_wire(entry.to_wire()) == entry


def test_linked_flag_travels_only_when_set() -> None:
    linked = Entry(Op.FILE, "/srv", "a", data=b"x", size=1, linked=True)
    assert linked.to_wire()["k"] is True
    assert Entry.from_wire(linked.to_wire()) == linked
    plain = Entry(Op.FILE, "/srv", "a", data=b"x", size=1)
    assert "k" not in plain.to_wire()  # what an older peer sends: not linked
    assert Entry.from_wire(plain.to_wire()).linked is False
