"""Journal entries: the one vocabulary in which every change reaches a passive.

An entry describes one change to one protected root. Paths are relative, POSIX, and never
trusted: :func:`Entry.from_wire` checks the shape of everything a peer sends, and the applier
resolves every path inside its root again before touching anything.

File contents travel as ``FILE`` parts into a staging file that is renamed into place by the
part flagged ``last`` (so a reader sees the old file or the new one, never a mix), or as a
``DELTA`` of absolute block writes applied in place to an existing file (a 1-byte change to a
1 GiB file sends one block). Every entry kind is idempotent when replayed in order from the
last durable applied mark, except ``RENAME`` and ``LINK``, which the applier therefore commits
on their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from stead.errors import ProtocolError

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_FILE_BYTES = 2**62  # beyond any file system; keeps offsets inside off_t


class Op(StrEnum):
    FILE = "file"  # part of a whole-file write through a staging file
    DELTA = "delta"  # absolute block writes into an existing file, then truncate to size
    MKDIR = "mkdir"
    SYMLINK = "symlink"  # path -> target (target is opaque text, never followed)
    LINK = "link"  # hard link: path becomes another name of target (a path in the same root)
    DELETE = "delete"  # file, symlink or whole directory tree
    RENAME = "rename"  # path -> target (both in the same root)
    META = "meta"  # mode, owner, mtime of an existing path


@dataclass(frozen=True, slots=True)
class Entry:
    op: Op
    root: str
    path: str
    target: str = ""
    data: bytes = b""
    offset: int = 0
    first: bool = True
    last: bool = True
    size: int = 0
    blocks: tuple[tuple[int, bytes], ...] = field(default=())
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    mtime_ns: int | None = None
    # FILE: the active's inode has further names. Where the passive's file has further
    # names too, the content goes into that inode in place instead of replacing the name
    # (the passive's link stays whole when the active no longer knew the inode's first name).
    linked: bool = False

    def payload_bytes(self) -> int:
        """Bytes of file data carried: what the lag and queue figures count."""
        if not self.blocks:  # nearly every entry: no generator to build
            return len(self.data)
        return len(self.data) + sum(len(b) for _, b in self.blocks)

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"o": self.op.value, "r": self.root, "p": self.path}
        if self.target:
            wire["t"] = self.target
        if self.op is Op.FILE:
            wire.update(d=self.data, off=self.offset, f=self.first, l=self.last, s=self.size)
            if self.linked:
                wire["k"] = True
        elif self.op is Op.DELTA:
            wire.update(b=[[off, blk] for off, blk in self.blocks], s=self.size)
        for key, value in (("m", self.mode), ("u", self.uid), ("g", self.gid)):
            if value is not None:
                wire[key] = value
        if self.mtime_ns is not None:
            wire["t_ns"] = self.mtime_ns
        return wire

    @classmethod
    def from_wire(cls, wire: Any) -> Entry:
        """Build an entry from what a peer sent, refusing anything malformed."""
        fast = _whole_file(wire)
        return fast if fast is not None else cls.checked_from_wire(wire)

    @classmethod
    def checked_from_wire(cls, wire: Any) -> Entry:
        """:meth:`from_wire` without its shortcut for the common shape: every check, the
        precise error."""
        if not isinstance(wire, dict):
            raise ProtocolError("entry is not a map")
        raw_op = wire.get("o")
        op = _OPS.get(raw_op) if type(raw_op) is str else None
        if op is None:
            raise ProtocolError(f"unknown entry op {raw_op!r}")
        root = _text(wire, "r", required=True)
        path = _text(wire, "p", required=True)
        check_relative_path(path)
        target = _text(wire, "t")
        if op in (Op.RENAME, Op.LINK):
            check_relative_path(target)
        if op is Op.SYMLINK and not target:
            raise ProtocolError("symlink without target")
        kwargs: dict[str, Any] = {}
        if op is Op.FILE:
            data = wire.get("d", b"")
            if not isinstance(data, bytes):
                raise ProtocolError("file data is not bytes")
            kwargs.update(
                data=data,
                offset=_uint(wire, "off"),
                first=_bool(wire, "f"),
                last=_bool(wire, "l"),
                size=_uint(wire, "s"),
                linked=_bool(wire, "k", default=False),
            )
        elif op is Op.DELTA:
            raw = wire.get("b", [])
            if not isinstance(raw, list):
                raise ProtocolError("delta blocks are not a list")
            blocks = []
            for item in raw:
                if (
                    not isinstance(item, list | tuple)
                    or len(item) != 2
                    or not isinstance(item[0], int)
                    or item[0] < 0
                    or not isinstance(item[1], bytes)
                ):
                    raise ProtocolError("malformed delta block")
                blocks.append((item[0], item[1]))
            kwargs.update(blocks=tuple(blocks), size=_uint(wire, "s"))
        for key, name in (("m", "mode"), ("u", "uid"), ("g", "gid"), ("t_ns", "mtime_ns")):
            if key in wire:
                value = wire[key]
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ProtocolError(f"{name} is not an integer")
                kwargs[name] = value
        if kwargs.get("mode") is not None and not 0 <= kwargs["mode"] <= 0o7777:
            raise ProtocolError("mode out of range")
        for name in ("uid", "gid"):
            if kwargs.get(name) is not None and not 0 <= kwargs[name] < 2**32 - 1:
                raise ProtocolError(f"{name} out of range")
        if kwargs.get("mtime_ns") is not None and not -(2**63) <= kwargs["mtime_ns"] < 2**63:
            raise ProtocolError("mtime out of range")
        for name in ("offset", "size"):
            if kwargs.get(name, 0) >= MAX_FILE_BYTES:
                raise ProtocolError(f"{name} beyond the largest file")
        for block_offset, block in kwargs.get("blocks", ()):
            if block_offset + len(block) > MAX_FILE_BYTES:
                raise ProtocolError("delta block beyond the largest file")
        return cls(op=op, root=root, path=path, target=target, **kwargs)


_OPS = {op.value: op for op in Op}  # a dict lookup: Op(text) costs an enum call per entry
_ABSENT: Any = object()
_ID_LIMIT = 2**32 - 1
_MTIME_LOW, _MTIME_HIGH = -(2**63), 2**63


def _whole_file(wire: Any) -> Entry | None:
    """:meth:`Entry.from_wire` for the common shape (a ``FILE`` entry, every field well
    typed and in range), in a few type tests; None for anything else, which the full
    checks then build or refuse with their precise error. Accepts only what they accept
    and builds the same entry: each small file is one such entry on a passive."""
    if type(wire) is not dict or wire.get("o") != "file" or "t" in wire:
        return None
    root, path, data = wire.get("r"), wire.get("p"), wire.get("d", b"")
    offset, size = wire.get("off", 0), wire.get("s", 0)
    first, last, linked = wire.get("f", True), wire.get("l", True), wire.get("k", False)
    mode, uid, gid = wire.get("m", _ABSENT), wire.get("u", _ABSENT), wire.get("g", _ABSENT)
    mtime = wire.get("t_ns", _ABSENT)
    if not (
        type(root) is str
        and root
        and type(path) is str
        and path
        and type(data) is bytes
        and type(offset) is int
        and 0 <= offset < MAX_FILE_BYTES
        and type(size) is int
        and 0 <= size < MAX_FILE_BYTES
        and type(first) is bool
        and type(last) is bool
        and type(linked) is bool
        and (mode is _ABSENT or (type(mode) is int and 0 <= mode <= 0o7777))
        and (uid is _ABSENT or (type(uid) is int and 0 <= uid < _ID_LIMIT))
        and (gid is _ABSENT or (type(gid) is int and 0 <= gid < _ID_LIMIT))
        and (mtime is _ABSENT or (type(mtime) is int and _MTIME_LOW <= mtime < _MTIME_HIGH))
    ):
        return None
    check_relative_path(path)
    return Entry(
        Op.FILE,
        root,
        path,
        "",
        data,
        offset,
        first,
        last,
        size,
        (),
        None if mode is _ABSENT else mode,
        None if uid is _ABSENT else uid,
        None if gid is _ABSENT else gid,
        None if mtime is _ABSENT else mtime,
        linked,
    )


def check_relative_path(path: str) -> None:
    """Refuse a path that is not a plain relative POSIX path (the applier checks again)."""
    if not path:
        raise ProtocolError("empty path")
    if len(path.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise ProtocolError("path too long")
    if path.startswith("/") or "\x00" in path:
        raise ProtocolError(f"path {path!r} is absolute or holds NUL")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ProtocolError(f"path {path!r} has an empty, '.' or '..' component")
        if len(part.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
            raise ProtocolError("file name too long")


def _text(wire: dict[str, Any], key: str, *, required: bool = False) -> str:
    value = wire.get(key, "")
    if not isinstance(value, str):
        raise ProtocolError(f"field {key!r} is not text")
    if required and not value:
        raise ProtocolError(f"field {key!r} missing")
    return value


def _uint(wire: dict[str, Any], key: str) -> int:
    value = wire.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError(f"field {key!r} is not a non-negative integer")
    return value


def _bool(wire: dict[str, Any], key: str, *, default: bool = True) -> bool:
    value = wire.get(key, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"field {key!r} is not a boolean")
    return value
