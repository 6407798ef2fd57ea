"""Entries from a peer: every malformed or out-of-range field is refused before use."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, 1, 0o644, 0o7777, 0o10000, 2**32 - 2, 2**32 - 1, 2**62, 2**63]),
    st.text(max_size=5),
    st.sampled_from(["a/b", "../x", "/abs", "a//b", "ok", "", "file", "delta"]),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=2),
)
_KEYS = ["o", "r", "p", "t", "d", "off", "f", "l", "s", "k", "m", "u", "g", "t_ns", "x"]


@settings(max_examples=500)
@given(
    st.dictionaries(st.sampled_from(_KEYS), _VALUES, max_size=14),
    st.booleans(),
)
def test_the_shortcut_for_whole_files_accepts_only_what_the_full_checks_accept(
    extra: dict[str, Any], start_valid: bool
) -> None:
    """Any map: where the shortcut builds an entry, the full checks build the same one."""
    wire: dict[str, Any] = (
        {"o": "file", "r": "/srv", "p": "d/f", "d": b"x", "off": 0, "f": True, "l": True, "s": 1}
        if start_valid
        else {}
    )
    wire.update(extra)
    try:
        checked: Entry | None = Entry.checked_from_wire(wire)
    except ProtocolError:
        checked = None
    try:
        fast = Entry.from_wire(wire)
    except ProtocolError:
        fast = None
    assert fast == checked
