"""Digests of regular files kept between two walks, so that unchanged files are not re-read.

:func:`~stead.system.manifest.build_manifest` hashes every regular file of the system trees;
with a :class:`HashCache` it reuses the digest of a file whose identity is unchanged since
it was hashed: the same size, ``mtime_ns``, ``ctime_ns``, inode and device, all five. A
write changes ``ctime`` (which, unlike ``mtime``, no program can set back), a replacement
by rename changes the inode, so a cached digest is only ever used for the content it was
computed from.

One race is left to close: a file written in the same clock tick as the ``lstat`` that
keyed it would keep its old ``ctime``. So a walk stores a digest only for a file whose
``ctime`` lies at least :data:`SETTLED_NS` before the moment it was listed; a file that
changed just before the walk is hashed again next time. :meth:`HashCache.remember` is the
one exception: the reclone swap records the files it has just renamed into place, whose
content it verified, while nothing else may write the trees (see :mod:`stead.reclone.swap`).

The cache is a msgpack file in the agent's state directory, replaced atomically; a walk
keeps the entries of the paths it met and drops the rest. Each entry is one byte string
(the five identity fields packed, then the digest): loading 50,000 of them makes no object
the garbage collector must follow, which in a busy agent cost more than the walk's
``lstat`` calls did. A missing or unreadable file is
an empty cache (everything is hashed). Two walks saving at once lose nothing but time:
every entry checks itself.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from pathlib import Path
from typing import Any

import msgpack

from stead.fsutil import write_atomic

log = logging.getLogger(__name__)

VERSION = 2  # 1: [size, mtime_ns, ctime_ns, inode, device, digest] lists
FILE_NAME = "hash-cache.msgpack"  # in the agent's state directory
SETTLED_NS = 2 * 10**9  # a ctime this far before the listing cannot still be moving
MAX_FILE = 1024**3

_KEY = struct.Struct("<QqqQQ")  # size, mtime_ns, ctime_ns, inode, device
_save_lock = threading.Lock()


def key_of(st: os.stat_result) -> bytes:
    return _KEY.pack(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


class HashCache:
    """The digests of one walk's files by path, and those the walk before it left."""

    def __init__(self, path: Path | None = None, *, settled_ns: int = SETTLED_NS) -> None:
        self.path = path
        self.settled_ns = settled_ns
        self.previous: dict[str, Any] = {}  # as loaded: each entry checked when used
        # This walk's entries as they are saved (the identity packed, then the digest); a
        # hit keeps the loaded entry itself.
        self.current: dict[str, bytes] = {}
        self.added = False  # an entry that was not loaded as it is
        self.hits = 0
        self.misses = 0
        if path is not None:
            self.previous = _load(path)

    def lookup(self, path: str, st: os.stat_result) -> bytes | None:
        """The cached digest of ``path`` if its identity (``lstat`` result) is unchanged."""
        cached = self.previous.get(path)
        if type(cached) is bytes and len(cached) > _KEY.size and cached[: _KEY.size] == key_of(st):
            self.current[path] = cached
            self.hits += 1
            return cached[_KEY.size :]
        self.misses += 1
        return None

    def sizes(self) -> dict[str, int]:
        """The size of every file as last hashed: what this node held then, a hint only."""
        size = struct.Struct("<Q")
        return {
            path: size.unpack_from(cached)[0]
            for path, cached in self.previous.items()
            if type(cached) is bytes and len(cached) > _KEY.size
        }

    def store(self, path: str, st: os.stat_result, digest: bytes, listed_ns: int) -> None:
        """Keep a digest just computed; ``st`` was taken at or after ``listed_ns``."""
        if st.st_ctime_ns < listed_ns - self.settled_ns:
            self.remember(path, st, digest)

    def remember(self, path: str, st: os.stat_result, digest: bytes) -> None:
        """Keep the digest of a file verified and placed by us; see the module docstring."""
        self.current[path] = key_of(st) + digest
        self.added = True

    def save(self, *, keep_previous: bool = False) -> None:
        """Write the cache: the entries met by this walk (and the earlier ones if asked)."""
        if self.path is None:
            return
        if not self.added and (keep_previous or len(self.current) == len(self.previous)):
            return  # every entry was loaded as it is, and none is dropped: nothing to write
        entries = {**self.previous, **self.current} if keep_previous else self.current
        if entries == self.previous:
            return
        blob = msgpack.packb({"version": VERSION, "entries": entries}, use_bin_type=True)
        try:
            with _save_lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(self.path, blob, mode=0o600)
        except OSError as exc:  # a cache: the walk's result stands without it
            log.warning("cannot save the hash cache %s: %s", self.path, exc)


def _load(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            blob = file.read(MAX_FILE + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("hash cache %s unreadable, hashing everything: %s", path, exc)
        return {}
    try:
        data = msgpack.unpackb(blob, raw=False, strict_map_key=True)
        if (
            isinstance(data, dict)
            and isinstance(data.get("version"), int)
            and (data["version"] != VERSION)
        ):
            log.info(
                "hash cache %s is of version %s: hashing everything once", path, data["version"]
            )
            return {}
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise ValueError("not a hash cache")
        entries = data["entries"]
        if not isinstance(entries, dict):
            raise ValueError("no map of entries")
        return entries
    except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
        log.warning("hash cache %s is malformed, hashing everything: %s", path, exc)
        return {}
