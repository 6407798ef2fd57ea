"""The event-driven capture core shared by the inotify and fanotify backends.

An event source (a subclass) owns one kernel notification fd and turns what it reads into
calls of this core: a path changed (created, deleted, written, attributes), a rename, a
directory forgotten, a lost queue. The core keeps the duties of
:mod:`stead.replication.capture.base`:

- **Order.** Events are read in the loop thread (``add_reader``, no thread per event) and
  processed in the order the source reports them. Structural changes (delete, rename,
  directory arrival, state checks) become work items in that order. Content and attribute
  changes are coalesced per path for ``coalesce`` seconds; a structural change that touches
  a path with a pending change, or a directory above it, first settles it: pending changes
  under a deleted or replaced path are dropped (the data is gone), and those under a
  renamed path move with it and are read under the new name after the ``RENAME``. A file is
  always read at flush time, so what is sent is its latest state.
- **Latency.** A flush runs as soon as a structural change is queued or the oldest pending
  content change is ``coalesce`` old (5 ms by default).
- **Directory keys.** A source names directories by a key (an inotify watch descriptor, a
  fanotify file handle). The core keeps ``key -> (root, reldir)`` in step with the events
  it has processed (a directory rename rewrites every key under it by prefix), so a path
  is always the one the directory had *when the event happened*, never one from the future.
  A directory is keyed (``_attach``) before it is listed, so a file created in it meanwhile
  is seen by the listing or by an event (perhaps both: entries are idempotent).
- **Races.** Reads happen at flush time and can run ahead of events still queued. Paths a
  flush found gone, and directories it scanned, are remembered until the queue is next
  found empty: a rename reported afterwards that moved them redoes them under the new name.
  Scans and checks still queued for a renamed path move behind the ``RENAME`` under the new
  name (they must read the object that was renamed, not whatever took its old name).
- **Completeness.** A lost queue (``_overflow``) triggers a rescan of everything and the
  ``on_overflow`` hook. With ``scan_on_start=True``, ``run`` begins by emitting the whole
  current state.
- **drain.** Reads every event already queued on the fd (the kernel queues them before the
  system call that caused them returns), flushes them and returns. Nothing is written into
  the protected trees.

Blocking work (reading and hashing files, SQLite) runs in a worker thread, one flush at a
time; the directory maps are only touched by whoever holds the flush lock.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from abc import abstractmethod
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

from stead.replication.capture.base import CaptureBackend, CaptureStats, Emit, FileReader, meta_of
from stead.replication.capture.scan import scan_entries, take_batch
from stead.replication.entries import Entry, Op
from stead.replication.filters import Filter
from stead.replication.manifest import Manifest

log = logging.getLogger(__name__)

META, CONTENT = 1, 2
READS_PER_PUMP = 64

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class _Scan:
    """Key and send a directory tree that arrived (at flush time, key before list)."""

    root: str
    relpath: str


@dataclass(frozen=True, slots=True)
class _Check:
    """Send whatever is at a path now, or a ``DELETE`` if nothing is.

    For events whose order is lost (fanotify merges events about one object): the state at
    flush time decides, and every entry kind is idempotent.
    """

    root: str
    relpath: str


_Work = Entry | _Scan | _Check


def join(reldir: str, name: str) -> str:
    return f"{reldir}/{name}" if reldir else name


def under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def _inside(item: _Scan | _Check, root: str, top: str) -> bool:
    return item.root == root and under(item.relpath, top)


def _parents(root: str, path: str) -> list[tuple[str, str]]:
    """``path`` and each directory above it (the root itself aside), as keys."""
    parts = path.split("/")
    return [(root, "/".join(parts[:depth])) for depth in range(len(parts), 0, -1)]


def _moved(path: str, old: str, new: str) -> str:
    return new + path[len(old) :]


class EventCapture(CaptureBackend, Generic[K]):
    """Pending changes, coalescing, renames, flush and drain for one event source.

    Subclasses implement the four event-source hooks (``_open``, ``_close``, ``_read``,
    ``_attach``) and may override ``_detach`` and ``_settled``. All hooks but ``_attach``
    run in the loop thread with the flush lock held; ``_attach`` may run in the flush thread.
    """

    source: ClassVar[str] = "events"
    attach_hint: ClassVar[str] = ""
    # Whether a created directory is listed (inotify: its watch came after the CREATE, so
    # what was made in it meanwhile has no event) or just sent (its events are complete).
    scan_created_dirs: ClassVar[bool] = True

    def __init__(
        self,
        roots: dict[str, Path],
        filters: dict[str, Filter],
        manifest: Manifest | None,
        *,
        coalesce: float = 0.005,
        scan_on_start: bool = False,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self.roots = {name: Path(path) for name, path in roots.items()}
        self.filters = {name: filters.get(name) or Filter() for name in roots}
        self.manifest = manifest
        self.coalesce = coalesce
        self.scan_on_start = scan_on_start
        self.on_overflow = on_overflow
        self.stats = CaptureStats()
        self.reader = FileReader(manifest, stats=self.stats)
        self._fileno: int | None = None
        self._emit: Emit | None = None
        self._lock = asyncio.Lock()
        self._started = asyncio.Event()
        self._where: dict[K, tuple[str, str]] = {}
        self._dirs: dict[tuple[str, str], K] = {}
        self._out: list[_Work] = []
        self._walks = 0  # _Scan and _Check items in _out: a rename must move them
        self._pending: dict[tuple[str, str], int] = {}
        self._deadline: float | None = None
        self._rescan = False
        # Paths a flush found gone, and directories it scanned, since the queue was last
        # seen empty: if a rename queued behind them moved them, they are redone under the
        # new name (a read races with renames that the queue has not reported yet).
        self._vanished: set[tuple[str, str]] = set()
        self._scanned: set[tuple[str, str]] = set()

    # -- the event-source hooks ----------------------------------------------------------

    @abstractmethod
    def _open(self) -> int:
        """Create the notification fd (non-blocking) and return it; nothing keyed yet."""

    @abstractmethod
    def _close(self) -> None:
        """Release the notification fd and everything the source holds."""

    @abstractmethod
    def _read(self) -> bool:
        """Read one chunk of events and process it; False when none was queued."""

    @abstractmethod
    def _attach(self, root: str, reldir: str, path: str) -> K:
        """Start observing a directory and return its key (raise OSError if impossible)."""

    def _detach(self, key: K) -> None:
        """Stop observing a directory that left the protected trees."""

    def _settled(self) -> None:
        """The queue was found empty: everything that happened so far has been read."""

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Observe every protected directory, emitting nothing; ``run`` calls it if needed.

        Call it before an initial scan made by someone else: a change made during that scan
        is then seen by the source (and perhaps sent twice, which is harmless).
        """
        if self._fileno is not None:
            return
        self._fileno = self._open()
        async with self._lock:
            await asyncio.to_thread(self._watch_everything)

    async def run(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        self._emit = emit
        await self.start()
        assert self._fileno is not None
        fileno = self._fileno
        readable = asyncio.Event()
        loop.add_reader(fileno, readable.set)
        try:
            if self.scan_on_start:
                async with self._lock:
                    self._rescan = True
                    await self._flush()
            self._started.set()
            while True:
                if self._deadline is None:
                    await readable.wait()
                else:
                    try:
                        async with asyncio.timeout_at(self._deadline):
                            await readable.wait()
                    except TimeoutError:
                        pass
                readable.clear()
                async with self._lock:
                    await self._pump()
                    if self._due(loop.time()):
                        await self._flush()
        finally:
            self._started.clear()
            loop.remove_reader(fileno)
            self._close()
            self._fileno = None
            self._where.clear()
            self._dirs.clear()

    async def started(self) -> None:
        """Return once every protected directory is observed (and the start scan emitted)."""
        await self._started.wait()

    async def drain(self) -> None:
        await self._started.wait()
        async with self._lock:
            while True:
                exhausted = await self._pump()
                await self._flush()
                if exhausted:
                    return

    async def reconcile(
        self,
        root: str,
        items: list[tuple[str, bytes | None]],
        groups: Sequence[Sequence[str]] = (),
    ) -> int:
        """Send the current state of paths that a check found different on a passive.

        ``items`` pairs a path with the passive's block digests of that file (``None``: the
        passive lacks it or holds something else). The manifest is first told what the
        passive really holds, so a large file that differs in a few blocks travels as a
        DELTA of exactly those blocks. ``groups`` are the names of hard-linked inodes to
        send again as one file: the first name as a whole new file, every other name as a
        ``LINK`` to it (a copy sent under one name alone would split the passive's inode,
        and a passive whose names are split or wrongly joined is mended the same way).
        Runs under the flush lock, in order with captured changes; returns the number of
        entries emitted.
        """
        if not items and not groups:
            return 0
        emit = self._emit
        assert emit is not None, "reconcile needs a running capture"
        base = self.roots[root]
        manifest, reader = self.manifest, self.reader

        def produce() -> Iterator[Entry]:
            for relpath, hashes in items:
                abspath = os.path.join(base, relpath)
                if manifest is not None:
                    try:
                        st = os.lstat(abspath)
                    except OSError:
                        continue
                    if hashes is not None and manifest.needs_record(st.st_size):
                        manifest.record(root, relpath, st, hashes)
                    else:
                        manifest.forget(root, relpath)
                reader.forget_path(root, relpath)
                yield from reader.entries(root, relpath, abspath)
            for names in groups:
                for relpath in names:  # unknown names: the first travels as a new file
                    reader.forget_path(root, relpath)
                    if manifest is not None:
                        manifest.forget(root, relpath)
                for index, relpath in enumerate(names):
                    abspath = os.path.join(base, relpath)
                    yield from reader.entries(root, relpath, abspath, resend_linked=index == 0)

        async with self._lock:
            return await self._emit_all(produce(), emit)

    async def _emit_all(self, items: Iterator[Entry], emit: Emit) -> int:
        """Read and emit ``items`` batch by batch (reading in a worker thread), then commit
        the manifest records they describe; lock held by the caller."""
        count = 0
        while batch := await asyncio.to_thread(take_batch, items):
            await emit(batch)
            self.stats.count(batch)
            count += len(batch)
        if self.manifest is not None:
            # Only now has the agent taken the entries the records describe.
            await asyncio.to_thread(self.manifest.commit)
        return count

    def _due(self, now: float) -> bool:
        if self._out or self._rescan:
            return True
        return self._deadline is not None and now >= self._deadline

    async def _pump(self) -> bool:
        """Read and process queued events; True when the queue was found empty.

        Yields to the event loop after each read: heartbeats and the API must never wait
        for a burst of events to be worked through.
        """
        for _ in range(READS_PER_PUMP):
            await asyncio.sleep(0)
            if not self._read():
                self._settled()
                self._vanished.clear()
                self._scanned.clear()
                return True
        return False

    # -- what sources report (loop thread, lock held) -------------------------------------

    def _overflow(self, why: str) -> None:
        """Events were lost: rescan everything and tell the agent."""
        self._rescan = True
        self.stats.overflows += 1
        log.warning("%s: rescanning every protected root", why)
        if self.on_overflow is not None:
            self.on_overflow()

    def _forget_key(self, key: K) -> None:
        """The directory behind ``key`` is gone (its parent reported the delete)."""
        where = self._where.pop(key, None)
        if where is not None and self._dirs.get(where) == key:
            del self._dirs[where]

    def _bind(self, key: K, root: str, reldir: str) -> None:
        """Name the directory behind ``key``; a path names one directory at a time."""
        old = self._where.get(key)
        if old is not None and self._dirs.get(old) == key:
            del self._dirs[old]
        replaced = self._dirs.get((root, reldir))
        if replaced is not None and replaced != key:
            self._where.pop(replaced, None)
        self._where[key] = (root, reldir)
        self._dirs[(root, reldir)] = key

    def _changed(
        self,
        root: str,
        relpath: str,
        is_dir: bool,
        *,
        created: bool = False,
        deleted: bool = False,
        content: bool = False,
        meta: bool = False,
    ) -> None:
        """A directory entry changed; several flags at once mean their order is unknown."""
        if not self.filters[root].protected(relpath, is_dir):
            return
        if deleted and (created or content or meta):
            self._drop_pending(root, relpath, is_dir)
            if content or meta:
                self._lost_change(root, relpath, CONTENT if content else META)
            self._queue_walk(_Check(root, relpath))
        elif deleted:
            self._delete(root, relpath, is_dir)
        elif created:
            if is_dir and self.scan_created_dirs:
                self._queue_walk(_Scan(root, relpath))
            else:
                self._touch(root, relpath, CONTENT)
        elif content:
            self._touch(root, relpath, CONTENT)
        elif meta:
            self._touch(root, relpath, META)

    def _check(self, root: str, relpath: str, is_dir: bool) -> None:
        """Queue a state check of a path (see :class:`_Check`)."""
        if self.filters[root].protected(relpath, is_dir):
            self._drop_pending(root, relpath, is_dir)
            self._queue_walk(_Check(root, relpath))

    def _move(self, src: tuple[str, str] | None, dst: tuple[str, str] | None, is_dir: bool) -> None:
        """A rename from ``src`` to ``dst``; ``None`` is a place outside the protected trees."""
        dst_ok = dst is not None and self.filters[dst[0]].protected(dst[1], is_dir)
        if src is not None:
            src_root, src_path = src
            src_ok = self.filters[src_root].protected(src_path, is_dir)
            if src_ok and dst_ok and dst is not None and src_root == dst[0]:
                self._rename(src_root, src_path, dst[1], is_dir)
                return
            if src_ok:
                self._moved_out(src_root, src_path, is_dir)
        if dst_ok and dst is not None:
            self._arrived(dst[0], dst[1], is_dir)

    def _touch(self, root: str, relpath: str, kind: int) -> None:
        key = (root, relpath)
        if self._pending.get(key, 0) < kind:
            self._pending[key] = kind
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().time() + self.coalesce

    def _queue_walk(self, item: _Scan | _Check) -> None:
        self._out.append(item)
        self._walks += 1

    def _drop_pending(self, root: str, top: str, is_dir: bool = True) -> None:
        """Forget changes under a path that is deleted or replaced (its data is gone).

        Only a directory can have changes below it: for anything else this is one lookup,
        so that a stream of file events costs the same however many changes are pending.
        """
        if is_dir:
            keys = [k for k in self._pending if k[0] == root and under(k[1], top)]
        else:
            keys = [(root, top)] if (root, top) in self._pending else []
        for key in keys:
            self._lost_change(root, key[1], self._pending.pop(key), top)

    def _lost_change(self, root: str, relpath: str, kind: int, top: str = "") -> None:
        # A change made through a name that is gone before it was read is still visible
        # through the inode's other names (hard links): read those instead.
        for other in self.reader.other_names(root, relpath):
            if not (top and under(other, top)):
                self._touch(root, other, kind)

    def _delete(self, root: str, relpath: str, is_dir: bool = True) -> None:
        self._drop_pending(root, relpath, is_dir)
        self._out.append(Entry(Op.DELETE, root, relpath))

    def _arrived(self, root: str, relpath: str, is_dir: bool) -> None:
        if is_dir:
            self._queue_walk(_Scan(root, relpath))
        else:
            self._drop_pending(root, relpath, is_dir=False)
            self._touch(root, relpath, CONTENT)

    def _moved_out(self, root: str, relpath: str, is_dir: bool) -> None:
        self._delete(root, relpath, is_dir)
        if is_dir:
            # Its keys moved with it, out of the tree: stop listening there.
            for where in [k for k in self._dirs if k[0] == root and under(k[1], relpath)]:
                key = self._dirs.pop(where)
                self._where.pop(key, None)
                self._detach(key)

    def _rename(self, root: str, old: str, new: str, is_dir: bool) -> None:
        # What was at the target is replaced. A file has nothing below it, and a file can
        # only replace a file: for files every step below is a lookup, not a scan, so that
        # a stream of renames (atomic saves) costs the same however much is queued.
        self._drop_pending(root, new, is_dir)
        moved = {}
        if is_dir:
            below = [k for k in self._pending if k[0] == root and under(k[1], old)]
        else:
            below = [(root, old)] if (root, old) in self._pending else []
        for key in below:
            moved[(root, _moved(key[1], old, new))] = self._pending.pop(key)
        # Scans and checks queued for the old name must read the renamed object, not what
        # may take the old name meanwhile: they move behind the rename, under the new name.
        redo: list[_Work] = []
        if self._walks:
            kept: list[_Work] = []
            for item in self._out:
                if isinstance(item, _Scan | _Check) and _inside(item, root, old):
                    redo.append(type(item)(root, _moved(item.relpath, old, new)))
                else:
                    kept.append(item)
            self._out = kept
            self._walks -= len(redo)
        # Reads and scans done for the old name may have found nothing there: redo them
        # under the new name once the rename has reached the passives. A scan of a
        # directory above the old name counts too: it may have run after the renamed
        # object had already left it, and then the passive never got it.
        done = self._vanished, self._scanned
        if is_dir:
            raced = [key for key in set().union(*done) if key[0] == root and under(key[1], old)]
        else:
            raced = [(root, old)] if any((root, old) in one for one in done) else []
        for key in raced:
            self._vanished.discard(key)
            self._scanned.discard(key)
        if not raced:
            # A scan above the old name, done or still queued, reads the tree without it.
            queued = (
                {(i.root, i.relpath) for i in self._out if isinstance(i, _Scan | _Check)}
                if self._walks
                else set()
            )
            if is_dir:
                holders: Iterable[tuple[str, str]] = set().union(*done, queued)
            else:
                holders = [
                    k for k in _parents(root, old) if any(k in one for one in (*done, queued))
                ]
            raced = [key for key in holders if key[0] == root and under(old, key[1])]
        if raced and is_dir:
            redo.append(_Scan(root, new))
        elif raced:
            moved[(root, new)] = CONTENT
        self._out.append(Entry(Op.RENAME, root, old, target=new))
        self._out.extend(redo)
        self._walks += len(redo)
        for key, kind in moved.items():
            self._touch(*key, kind)
        if is_dir:
            for where in [k for k in self._dirs if k[0] == root and under(k[1], old)]:
                self._bind(self._dirs[where], root, _moved(where[1], old, new))
        else:
            # The content under the new name may not have been sent yet.
            self._touch(root, new, CONTENT)

    # -- keying directories (lock held; may run in the flush thread) -----------------------

    def _watch(self, root: str, reldir: str) -> None:
        path = os.path.join(self.roots[root], reldir) if reldir else os.fspath(self.roots[root])
        try:
            key = self._attach(root, reldir, path)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ESTALE):
                return  # gone already; its parent reports that
            # Out of watches (ENOSPC) or similar: changes there would go unseen.
            log.error("cannot observe %s with %s: %s%s", path, self.source, exc, self.attach_hint)
            self.stats.overflows += 1
            if self.on_overflow is not None:
                self.on_overflow()
            return
        self._bind(key, root, reldir)

    def _watch_everything(self) -> None:
        for name in sorted(self.roots):
            self._watch(name, "")
            for relpath, st in self.filters[name].walk(self.roots[name]):
                if stat.S_ISDIR(st.st_mode):
                    self._watch(name, relpath)

    # -- flushing (lock held) --------------------------------------------------------------

    async def _flush(self) -> None:
        rescan, self._rescan = self._rescan, False
        work, self._out, self._walks = self._out, [], 0
        pending, self._pending = self._pending, {}
        self._deadline = None
        if rescan:
            pending = {}
        emit = self._emit
        assert emit is not None
        await self._emit_all(self._entries(work, pending, rescan), emit)

    def _entries(
        self, work: list[_Work], pending: dict[tuple[str, str], int], rescan: bool
    ) -> Iterator[Entry]:
        """Turn work items into entries; runs in the flush thread."""
        for item in work:
            if isinstance(item, Entry):
                self._account(item)
                yield item
                continue
            abspath = os.path.join(self.roots[item.root], item.relpath)
            if isinstance(item, _Check) and not os.path.lexists(abspath):
                self._vanished.add((item.root, item.relpath))
                gone = Entry(Op.DELETE, item.root, item.relpath)
                self._account(gone)
                yield gone
                continue
            self._scanned.add((item.root, item.relpath))
            if not os.path.lexists(abspath):
                self._vanished.add((item.root, item.relpath))
            yield from scan_entries(
                self.roots,
                self.filters,
                self.reader,
                on_dir=self._watch,
                under=(item.root, item.relpath),
            )
        if rescan:
            self.stats.rescans += 1
            self.reader.forget_links()
            yield from scan_entries(self.roots, self.filters, self.reader, on_dir=self._watch)
        for (root, relpath), kind in pending.items():
            abspath = os.path.join(self.roots[root], relpath)
            if kind == CONTENT:
                produced = False
                for entry in self.reader.entries(root, relpath, abspath):
                    produced = True
                    yield entry
                if not produced and not os.path.lexists(abspath):
                    self._vanished.add((root, relpath))
                continue
            try:
                st = os.lstat(abspath)
            except OSError:
                self._vanished.add((root, relpath))
                continue
            yield Entry(Op.META, root, relpath, **meta_of(st))

    def _account(self, entry: Entry) -> None:
        """Keep the manifest and the hard-link map in step with a structural entry."""
        if entry.op is Op.DELETE:
            self.reader.forget_path(entry.root, entry.path)
            if self.manifest is not None:
                self.manifest.forget_tree(entry.root, entry.path)
        elif entry.op is Op.RENAME:
            self.reader.rename(entry.root, entry.path, entry.target)
            if self.manifest is not None:
                self.manifest.rename(entry.root, entry.path, entry.target)


QUEUE_SYSCTLS = {
    "inotify": "/proc/sys/fs/inotify/max_queued_events",
    "fanotify": "/proc/sys/fs/fanotify/max_queued_events",
}
QUEUE_EVENTS = 262_144  # a burst of ~100,000 new files fits; a few tens of MiB at worst


def raise_queue_limit(source: str, wanted: int = QUEUE_EVENTS) -> int | None:
    """Raise the kernel's event queue limit for new queues of ``source``, never lower it.

    The default (16,384) overflows on a burst of a few thousand new files, and an overflow
    costs a rescan and a check. The limit is read when a queue is created, so the agent
    calls this before it creates its capture. Without the right to change it, the current
    limit stays (and is logged).
    Returns the limit in force, or None when the kernel has no such setting.
    """
    path = QUEUE_SYSCTLS.get(source)
    if path is None or not os.path.exists(path):
        return None
    try:
        with open(path) as handle:
            current = int(handle.read().strip())
        if current >= wanted:
            return current
        with open(path, "w") as handle:
            handle.write(str(wanted))
        log.info("raised %s from %d to %d", path, current, wanted)
        return wanted
    except (OSError, ValueError) as exc:
        log.warning("cannot raise %s (%s): bursts may overflow the event queue", path, exc)
        return None
