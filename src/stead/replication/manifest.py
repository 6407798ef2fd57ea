"""The block manifest: what the passives were last sent for each large file.

For every protected file of at least two blocks, the manifest keeps the size, mtime, inode
and the BLAKE3 digest (16 bytes) of each block *as last sent*. When the file changes again,
capture hashes it block by block and sends only the blocks whose digest differs, as a
``DELTA`` (a 1-byte change to a 1 GiB file sends one 64 KiB block). Smaller files always go
whole and have no record.

Duties:

- **Truth**: a record must never claim a state the passives have not been sent, or a later
  delta would be computed against the wrong base and corrupt the passive copy. Capture
  therefore updates the record only as it emits the entries, keeps it in step with every
  ``RENAME``/``DELETE``/``LINK`` it emits, and calls :meth:`Manifest.commit` after ``emit``
  has returned (the journal holds the entries). Commits use ``synchronous=FULL``.
- **Memory**: nothing per file is held in memory; records live in SQLite (WAL mode) and
  writes are batched into one transaction per capture flush, so a million protected files
  cost disk, not RAM. Forgets (one per small file sent whole, nearly always of a path that
  has no record) wait in a set of at most :data:`FORGET_BATCH` keys and go in one
  ``executemany``; every other query sees them first. A Bloom filter of the keys that may
  have a record (1 MiB, filled from the table at open and on every record or rename) lets
  the forget of a path that surely has none do nothing: that ``DELETE`` was about 2 us of
  the active's CPU for every small file.
- **Threads**: one connection, usable from worker threads (capture reads files in threads),
  but callers serialise access; capture never runs two flushes at once.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from blake3 import blake3

HASH_SIZE = 16
DEFAULT_BLOCK_SIZE = 65536
FORGET_BATCH = 4096
MAYBE_BITS = 1 << 23  # the Bloom filter's size: 1 MiB


def block_hash(data: bytes) -> bytes:
    """The 16-byte BLAKE3 digest that identifies one block's content."""
    return blake3(data).digest(length=HASH_SIZE)


def read_blocks(fd: int, size: int, block_size: int) -> Iterator[tuple[int, bytes | None]]:
    """Yield ``(offset, data)`` for every block of the first ``size`` bytes of ``fd``.

    ``data`` is ``None`` for a block that lies wholly in a hole (it reads as zeros), found
    with ``SEEK_DATA``/``SEEK_HOLE`` so that sparse files are neither read nor sent in full.
    A file that shrinks under us yields short blocks; the caller's stat check catches that.
    """
    seg_start, seg_end = 0, -1  # the data segment known to cover offsets >= seg_start
    offset = 0
    while offset < size:
        length = min(block_size, size - offset)
        if offset >= seg_end:
            try:
                seg_start = os.lseek(fd, offset, os.SEEK_DATA)
                seg_end = os.lseek(fd, seg_start, os.SEEK_HOLE)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from here to the end
                    seg_start = seg_end = size
                elif exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # no hole support
                    seg_start, seg_end = offset, size
                else:
                    raise
        if seg_start < offset + length:
            yield offset, os.pread(fd, length, offset)
        else:
            yield offset, None
        offset += length


@dataclass(frozen=True, slots=True)
class Record:
    size: int
    mtime_ns: int
    ino: int
    hashes: bytes  # concatenated HASH_SIZE-byte digests, one per block

    def block(self, index: int) -> bytes | None:
        start = index * HASH_SIZE
        if start >= len(self.hashes):
            return None
        return self.hashes[start : start + HASH_SIZE]


class _Maybe:
    """A Bloom filter of (root, path) keys that may have a record: never a false "no"
    (every key recorded or renamed in is added); a false "maybe" costs one ``DELETE`` that
    finds nothing. Keys are never removed: a forgotten key stays a "maybe". Python's
    ``hash`` is per process, and so is the filter (rebuilt from the table at open)."""

    def __init__(self, bits: int = MAYBE_BITS) -> None:
        self._bits = bytearray(bits // 8)
        self._mask = bits - 1
        self._shift = bits.bit_length() - 1

    def add(self, key: tuple[str, bytes]) -> None:
        h = hash(key)
        for i in (h & self._mask, (h >> self._shift) & self._mask):
            self._bits[i >> 3] |= 1 << (i & 7)

    def __contains__(self, key: tuple[str, bytes]) -> bool:
        h = hash(key)
        i, j = h & self._mask, (h >> self._shift) & self._mask
        return bool(self._bits[i >> 3] & (1 << (i & 7)) and self._bits[j >> 3] & (1 << (j & 7)))


def _key(relpath: str) -> bytes:
    # Paths are stored as their file-system bytes: names that are not UTF-8 survive, and
    # byte order makes every subtree one contiguous range of the primary key.
    return os.fsencode(relpath)


def _subtree_range(reldir: str) -> tuple[bytes, bytes]:
    prefix = _key(reldir)
    return prefix + b"/", prefix + b"0"  # "0" is the byte right after "/"


class Manifest:
    """Per-root, per-path block digests of large files, in SQLite."""

    def __init__(self, db_path: Path, block_size: int = DEFAULT_BLOCK_SIZE) -> None:
        if block_size < 4096 or block_size & (block_size - 1):
            raise ValueError("block_size must be a power of two of at least 4096")
        self.block_size = block_size
        self.db_path = db_path
        self._db = sqlite3.connect(db_path, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS blocks (root TEXT NOT NULL, path BLOB NOT NULL,"
            " size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ino INTEGER NOT NULL,"
            " hashes BLOB NOT NULL, PRIMARY KEY (root, path)) WITHOUT ROWID"
        )
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS settings (name TEXT PRIMARY KEY, value INTEGER)"
        )
        row = self._db.execute("SELECT value FROM settings WHERE name='block_size'").fetchone()
        if row is None or row[0] != block_size:
            # Digests of another block size describe nothing we can diff against.
            self._db.execute("DELETE FROM blocks")
            self._db.execute(
                "INSERT OR REPLACE INTO settings VALUES ('block_size', ?)", (block_size,)
            )
        self._db.commit()
        self._dirty = False
        self._zero_hash = block_hash(bytes(block_size))
        self._forgotten: set[tuple[str, bytes]] = set()  # deletes not yet executed
        self._maybe = _Maybe()
        for key in self._db.execute("SELECT root, path FROM blocks"):
            self._maybe.add(key)

    def close(self) -> None:
        self.commit()
        self._db.close()

    def needs_record(self, size: int) -> bool:
        """Only files of at least two blocks are diffed; smaller ones always go whole."""
        return size >= 2 * self.block_size

    def zero_hash(self, length: int) -> bytes:
        """Digest of a block of ``length`` zero bytes (a hole)."""
        if length == self.block_size:
            return self._zero_hash
        return block_hash(bytes(length))

    def lookup(self, root: str, relpath: str) -> Record | None:
        if (root, _key(relpath)) in self._forgotten:
            return None
        row = self._db.execute(
            "SELECT size, mtime_ns, ino, hashes FROM blocks WHERE root=? AND path=?",
            (root, _key(relpath)),
        ).fetchone()
        return None if row is None else Record(row[0], row[1], row[2], row[3])

    def diff_blocks(
        self, root: str, relpath: str, source: int | Path, st: os.stat_result
    ) -> tuple[list[tuple[int, bytes]], bytes] | None:
        """Changed blocks of a file against its record, and the file's new digests.

        ``None`` when there is no record (send the whole file). Holds every changed block in
        memory: for streaming, :class:`stead.replication.capture.base.FileReader` walks
        :func:`read_blocks` itself. Does not update the record; call :meth:`record`.
        """
        old = self.lookup(root, relpath)
        if old is None:
            return None
        fd = source if isinstance(source, int) else os.open(source, os.O_RDONLY | os.O_NOFOLLOW)
        try:
            changed: list[tuple[int, bytes]] = []
            hashes = bytearray()
            for offset, data in read_blocks(fd, st.st_size, self.block_size):
                length = min(self.block_size, st.st_size - offset)
                digest = self.zero_hash(length) if data is None else block_hash(data)
                hashes += digest
                if old.block(offset // self.block_size) != digest:
                    changed.append((offset, data if data is not None else bytes(length)))
            return changed, bytes(hashes)
        finally:
            if not isinstance(source, int):
                os.close(fd)

    def record(self, root: str, relpath: str, st: os.stat_result, hashes: bytes) -> None:
        """Remember that the passives were sent this file state (effective at commit)."""
        key = (root, _key(relpath))
        self._forgotten.discard(key)  # replaced below all the same
        self._maybe.add(key)
        self._db.execute(
            "INSERT OR REPLACE INTO blocks VALUES (?, ?, ?, ?, ?, ?)",
            (root, key[1], st.st_size, st.st_mtime_ns, st.st_ino, hashes),
        )
        self._dirty = True

    def forget(self, root: str, relpath: str) -> None:
        key = (root, _key(relpath))
        if key not in self._maybe:
            return  # surely no record: nothing to delete
        self._forgotten.add(key)
        if len(self._forgotten) >= FORGET_BATCH:
            self._forget_now()

    def _forget_now(self) -> None:
        """Execute the forgets that wait (before any query that could see their rows)."""
        if not self._forgotten:
            return
        keys, self._forgotten = self._forgotten, set()
        cursor = self._db.executemany("DELETE FROM blocks WHERE root=? AND path=?", keys)
        self._dirty |= cursor.rowcount > 0

    def forget_tree(self, root: str, reldir: str) -> None:
        """Forget ``reldir`` and everything under it."""
        self.forget(root, reldir)
        self._forget_now()
        low, high = _subtree_range(reldir)
        cursor = self._db.execute(
            "DELETE FROM blocks WHERE root=? AND path>=? AND path<?", (root, low, high)
        )
        self._dirty |= cursor.rowcount > 0

    def rename(self, root: str, old: str, new: str) -> None:
        """Follow a rename of a file or a whole directory tree (replacing what was at new)."""
        if old == new:
            return
        self.forget_tree(root, new)  # executes the forgets that wait, too
        old_key, new_key = _key(old), _key(new)
        cursor = self._db.execute(
            "UPDATE blocks SET path=? WHERE root=? AND path=?", (new_key, root, old_key)
        )
        if cursor.rowcount > 0:
            self._maybe.add((root, new_key))
            self._dirty = True
        low, high = _subtree_range(old)
        moved = self._db.execute(
            "SELECT path FROM blocks WHERE root=? AND path>=? AND path<?", (root, low, high)
        ).fetchall()
        for (path,) in moved:
            renamed = new_key + path[len(old_key) :]
            self._maybe.add((root, renamed))
            self._db.execute(
                "UPDATE blocks SET path=? WHERE root=? AND path=?", (renamed, root, path)
            )
            self._dirty = True

    def clear(self) -> None:
        """Forget everything: the next change of every file goes whole (after a reclone)."""
        self._forgotten.clear()
        self._db.execute("DELETE FROM blocks")
        self._dirty = True

    def commit(self) -> None:
        """Make the records since the last commit durable; a no-op when nothing changed."""
        self._forget_now()
        if self._dirty or self._db.in_transaction:
            self._db.commit()
            self._dirty = False

    def count(self) -> int:
        self._forget_now()
        return int(self._db.execute("SELECT count(*) FROM blocks").fetchone()[0])
