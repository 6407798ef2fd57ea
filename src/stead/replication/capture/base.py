"""The capture seam: how changes under the protected roots become journal entries.

A backend watches the protected roots on the active node and hands batches of
:class:`~stead.replication.entries.Entry` to ``emit`` (which appends them to the journal).
Its duties, in the manner of a contract every backend (fakes included) must keep:

Critical in their timing
    - Entries are emitted in the order their changes are observed. Structural changes
      (delete, rename, mkdir, symlink, link) keep their exact order. Content and attribute
      changes of one path may be coalesced over a short window (milliseconds), but never
      across a structural change of that path or of a directory above it.
    - Latency: a change is emitted well under 50 ms after it happens under ordinary load.
    - :meth:`CaptureBackend.drain` returns only once every change made before the call has
      been emitted (``stead wait-sync`` and switchover rely on it). It must not write
      anything into the protected trees to find out.

Completeness
    - A lost notification (queue overflow) or a restart never silently loses a change: it
      triggers a rescan that emits the current state of everything protected, and calls
      ``on_overflow`` so that the agent can schedule a full system check (a rescan cannot
      see what was deleted while notifications were lost).

Consistency (per file, not across files)
    - A file is read so that what is sent is a state the file really had: its size, mtime
      and inode are checked before and after the read, and the read is retried (a bounded
      number of times) when they changed. If a writer keeps changing it, the last read is
      sent anyway: that writer's next change event causes another read, so the passive
      converges as soon as the file settles.
    - Whole files travel as ``FILE`` parts (the last part renames the staging file into
      place on the passive); a restarted read starts again with a ``first`` part.

:class:`FileReader` is the shared helper that turns one path into entries; both the inotify
backend and the scanner use it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypedDict

from stead.replication.entries import Entry, Op
from stead.replication.manifest import DEFAULT_BLOCK_SIZE, Manifest, block_hash, read_blocks

log = logging.getLogger(__name__)

PART_SIZE = 4 * 1024 * 1024
MAX_READ_TRIES = 4
LINK_MAP_SIZE = 65536

Emit = Callable[[list[Entry]], Awaitable[None]]


@dataclass(slots=True)
class CaptureStats:
    """Counters for metrics: events seen, entries and payload bytes emitted, overflows."""

    events: int = 0
    entries: int = 0
    bytes: int = 0
    overflows: int = 0
    rescans: int = 0
    retried_reads: int = 0

    def count(self, batch: list[Entry]) -> None:
        self.entries += len(batch)
        self.bytes += sum(entry.payload_bytes() for entry in batch)


class CaptureBackend(ABC):
    """One way of observing changes: inotify, fanotify, a database's write log.

    ``run`` owns the backend's resources and runs until cancelled; ``drain`` may be awaited
    from another task while ``run`` is running. ``emit`` is awaited in order, one batch at a
    time: a backend never has two ``emit`` calls in flight.
    """

    __slots__ = ()

    on_overflow: Callable[[], None] | None = None
    stats: CaptureStats

    @abstractmethod
    async def run(self, emit: Emit) -> None:
        """Watch and emit until cancelled."""

    @abstractmethod
    async def drain(self) -> None:
        """Return once every change made before this call has been emitted."""


class Meta(TypedDict):
    mode: int
    uid: int
    gid: int
    mtime_ns: int


def meta_of(st: os.stat_result) -> Meta:
    """Owner, permission bits and mtime: carried by every entry."""
    return {
        "mode": stat.S_IMODE(st.st_mode),
        "uid": st.st_uid,
        "gid": st.st_gid,
        "mtime_ns": st.st_mtime_ns,
    }


def _same_state(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_size, a.st_mtime_ns, a.st_ino, a.st_dev) == (
        b.st_size,
        b.st_mtime_ns,
        b.st_ino,
        b.st_dev,
    )


class _Torn(Exception):
    """The file changed while it was being read."""


class FileReader:
    """Turns a path under a root into the entries that recreate it on a passive.

    Blocking (reads files, hashes, touches the manifest): call it from a worker thread.
    Keeps a bounded map of hard-linked inodes already sent, per root, so that a second name
    of an inode travels as a ``LINK`` instead of a second copy.
    """

    def __init__(
        self,
        manifest: Manifest | None,
        *,
        part_size: int = PART_SIZE,
        max_tries: int = MAX_READ_TRIES,
        link_map_size: int = LINK_MAP_SIZE,
        stats: CaptureStats | None = None,
    ) -> None:
        self.manifest = manifest
        self.part_size = part_size
        self.max_tries = max_tries
        self.link_map_size = link_map_size
        self.stats = stats or CaptureStats()
        self._links: OrderedDict[tuple[str, int, int], str] = OrderedDict()
        self._names: dict[tuple[str, str], tuple[str, int, int]] = {}
        # Further names sent as LINK, so that a change seen through a name deleted before
        # it was read can be read through another (see ``other_names``).
        self._aliases: OrderedDict[tuple[str, str], tuple[str, int, int]] = OrderedDict()

    def entries(
        self, root: str, relpath: str, abspath: str, *, resend_linked: bool = True
    ) -> Iterator[Entry]:
        """Entries for the current state of ``abspath`` (nothing if it is gone).

        Hard links: the first name of an inode seen travels as a file, every further name
        as a ``LINK`` to it. A file copy on a passive is replaced through a staging file,
        which would split a linked inode there, so a linked inode already sent gets its new
        content as ``DELTA`` writes in place under its first name. ``resend_linked``: send
        that content before the ``LINK`` (a change seen through a further name); the scanner
        passes ``False`` because the first name was sent moments before in the same scan.
        """
        try:
            st = os.lstat(abspath)
        except (FileNotFoundError, NotADirectoryError):
            return
        if stat.S_ISDIR(st.st_mode):
            yield Entry(Op.MKDIR, root, relpath, **meta_of(st))
        elif stat.S_ISLNK(st.st_mode):
            try:
                target = os.readlink(abspath)
            except OSError:
                return
            if self.manifest is not None:
                self.manifest.forget(root, relpath)
            yield Entry(Op.SYMLINK, root, relpath, target=target, **meta_of(st))
        elif stat.S_ISREG(st.st_mode):
            if st.st_nlink < 2:
                # Remembered even alone: a link() made later finds its first name here.
                self._remember((root, st.st_dev, st.st_ino), relpath)
                yield from self._file(root, relpath, abspath, in_place=False)
                return
            root_abs = abspath[: len(abspath) - len(relpath)]
            first_name, known = self._first_name(root, relpath, root_abs, st)
            if first_name == relpath:
                yield from self._file(root, relpath, abspath, in_place=known)
                return
            if resend_linked:
                yield from self._file(root, first_name, root_abs + first_name, in_place=True)
            if self.manifest is not None:
                self.manifest.forget(root, relpath)
            self._aliases[(root, relpath)] = (root, st.st_dev, st.st_ino)
            self._aliases.move_to_end((root, relpath))
            while len(self._aliases) > self.link_map_size:
                self._aliases.popitem(last=False)
            yield Entry(Op.LINK, root, relpath, target=first_name, **meta_of(st))
        else:
            log.debug("not replicating special file %s", abspath)

    def forget_path(self, root: str, relpath: str) -> None:
        """A path was deleted or renamed away: it no longer names the inode we sent."""
        self._aliases.pop((root, relpath), None)
        key = self._names.pop((root, relpath), None)
        if key is not None:
            self._links.pop(key, None)

    def other_names(self, root: str, relpath: str) -> list[str]:
        """Other names under which the inode last sent as ``relpath`` was sent (hard links)."""
        key = self._names.get((root, relpath)) or self._aliases.get((root, relpath))
        if key is None:
            return []
        names = [name for (r, name), k in self._aliases.items() if k == key and r == root]
        first = self._links.get(key)
        if first is not None:
            names.append(first)
        return [name for name in names if name != relpath]

    def rename(self, root: str, old: str, new: str) -> None:
        """Follow a rename of a file or a whole directory tree in the hard-link map.

        Without this, a linked file re-read under its new name after its directory moved
        would look unsent and travel as a copy, splitting the link on the passive.
        """
        self.forget_path(root, new)
        prefix = old + "/"
        moved = [
            (name, key)
            for (key_root, name), key in self._names.items()
            if key_root == root and (name == old or name.startswith(prefix))
        ]
        for name, key in moved:
            renamed = new + name[len(old) :]
            del self._names[(root, name)]
            self._names[(root, renamed)] = key
            self._links[key] = renamed
        aliases = [
            (name, key)
            for (key_root, name), key in self._aliases.items()
            if key_root == root and (name == old or name.startswith(prefix))
        ]
        for name, key in aliases:
            del self._aliases[(root, name)]
            self._aliases[(root, new + name[len(old) :])] = key

    def forget_links(self) -> None:
        self._links.clear()
        self._names.clear()
        self._aliases.clear()

    def _first_name(
        self, root: str, relpath: str, root_abs: str, st: os.stat_result
    ) -> tuple[str, bool]:
        """The name under which this inode was first sent, and whether it was sent before."""
        key = (root, st.st_dev, st.st_ino)
        first = self._links.get(key)
        if first is not None:
            try:
                still = os.lstat(root_abs + first)
            except OSError:
                still = None
            if still is not None and (still.st_dev, still.st_ino) == (st.st_dev, st.st_ino):
                self._links.move_to_end(key)
                return first, True
            self._names.pop((root, first), None)
        self._remember(key, relpath)
        return relpath, False

    def _remember(self, key: tuple[str, int, int], relpath: str) -> None:
        old_name = self._links.get(key)
        if old_name is not None and old_name != relpath:
            self._names.pop((key[0], old_name), None)
        self._links[key] = relpath
        self._links.move_to_end(key)
        old_key = self._names.get((key[0], relpath))
        if old_key is not None and old_key != key:
            self._links.pop(old_key, None)
        self._names[(key[0], relpath)] = key
        while len(self._links) > self.link_map_size:
            evicted_key, evicted_name = self._links.popitem(last=False)
            self._names.pop((evicted_key[0], evicted_name), None)

    def _file(self, root: str, relpath: str, abspath: str, *, in_place: bool) -> Iterator[Entry]:
        try:
            fd = os.open(abspath, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENXIO):
                log.warning("cannot read %s: %s", abspath, exc)
            return
        try:
            yield from self._read_consistent(root, relpath, fd, in_place)
        finally:
            os.close(fd)

    def _read_consistent(self, root: str, relpath: str, fd: int, in_place: bool) -> Iterator[Entry]:
        manifest = self.manifest
        # The base a delta is computed against: what the passives hold. It changes as the
        # delta blocks of a torn attempt are emitted. Looked up only for a file that may
        # go as a delta (a small new file, the common case, costs no query).
        sent: bytearray | None = None
        looked_up = False
        for attempt in range(1, self.max_tries + 1):
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return
            final = attempt == self.max_tries
            large = manifest is not None and manifest.needs_record(before.st_size)
            if (large or in_place) and not looked_up:
                looked_up = True
                record = manifest.lookup(root, relpath) if manifest is not None else None
                sent = bytearray(record.hashes) if record is not None else None
                if in_place and sent is None:
                    sent = bytearray()  # nothing known: every block differs
            try:
                if sent is not None and (large or in_place):
                    yield from self._delta(root, relpath, fd, before, sent, final)
                else:
                    yield from self._whole(root, relpath, fd, before, final)
                return
            except _Torn:
                self.stats.retried_reads += 1
                log.debug("%s/%s changed while read (attempt %d)", root, relpath, attempt)

    def _check(self, fd: int, before: os.stat_result, final: bool) -> None:
        if not final and not _same_state(before, os.fstat(fd)):
            raise _Torn

    def _whole(
        self, root: str, relpath: str, fd: int, st: os.stat_result, final: bool
    ) -> Iterator[Entry]:
        manifest = self.manifest
        meta = meta_of(st)
        size = st.st_size
        block_size = manifest.block_size if manifest is not None else DEFAULT_BLOCK_SIZE
        large = size >= 2 * block_size
        if not large:
            content = os.pread(fd, size, 0) if size else b""
            self._check(fd, st, final)
            if manifest is not None:
                manifest.forget(root, relpath)
            yield Entry(
                Op.FILE, root, relpath, data=content, size=size, linked=st.st_nlink > 1, **meta
            )
            return
        hashes = bytearray()
        first = True
        run_offset, run = 0, bytearray()
        for offset, data in read_blocks(fd, size, block_size):
            if manifest is not None:
                length = min(block_size, size - offset)
                hashes += manifest.zero_hash(length) if data is None else block_hash(data)
            if run and (data is None or len(run) + len(data) > self.part_size):
                # A hole ends the part so that the passive's staging file keeps it sparse.
                yield Entry(
                    Op.FILE, root, relpath, data=bytes(run), offset=run_offset,
                    first=first, last=False, size=size, **meta,
                )  # fmt: skip
                first, run = False, bytearray()
            if data is not None:
                if not run:
                    run_offset = offset
                run += data
        # The final part (which renames the staging file into place) is held back until the
        # read is known to be consistent.
        self._check(fd, st, final)
        end_offset = run_offset if run else size
        if manifest is not None:
            manifest.record(root, relpath, st, bytes(hashes))
        yield Entry(
            Op.FILE, root, relpath, data=bytes(run), offset=end_offset,
            first=first, last=True, size=size, linked=st.st_nlink > 1, **meta,
        )  # fmt: skip

    def _delta(
        self,
        root: str,
        relpath: str,
        fd: int,
        st: os.stat_result,
        sent: bytearray,
        final: bool,
    ) -> Iterator[Entry]:
        manifest = self.manifest
        meta = meta_of(st)
        size = st.st_size
        block_size = manifest.block_size if manifest is not None else DEFAULT_BLOCK_SIZE
        zero_hash = block_hash(bytes(block_size))
        hashes = bytearray()
        blocks: list[tuple[int, bytes]] = []
        carried = 0
        for offset, data in read_blocks(fd, size, block_size):
            length = min(block_size, size - offset)
            if data is None:
                digest = zero_hash if length == block_size else block_hash(bytes(length))
            else:
                digest = block_hash(data)
            hashes += digest
            start = (offset // block_size) * len(digest)
            if sent[start : start + len(digest)] == digest:
                continue
            blocks.append((offset, data if data is not None else bytes(length)))
            carried += length
            if carried >= self.part_size:
                # Every delta carries the final size: the applier truncates to it.
                yield Entry(Op.DELTA, root, relpath, blocks=tuple(blocks), size=size, **meta)
                self._note_sent(sent, blocks, block_size)
                blocks, carried = [], 0
        self._check(fd, st, final)
        if manifest is not None:
            if manifest.needs_record(size):
                manifest.record(root, relpath, st, bytes(hashes))
            else:
                manifest.forget(root, relpath)
        yield Entry(Op.DELTA, root, relpath, blocks=tuple(blocks), size=size, **meta)

    @staticmethod
    def _note_sent(sent: bytearray, blocks: list[tuple[int, bytes]], block_size: int) -> None:
        for offset, data in blocks:
            start = (offset // block_size) * 16
            digest = block_hash(data)
            if start > len(sent):
                sent.extend(bytes(start - len(sent)))
            sent[start : start + 16] = digest
