"""Capture with inotify: every protected directory watched, events turned into entries.

How the duties of :mod:`stead.replication.capture.base` are kept here:

- **Order.** Events are read from the inotify fd in the loop thread (``add_reader``, no
  thread per event) and processed in kernel order. Structural changes (delete, rename,
  directory arrival) become work items in that order. Content and attribute changes are
  coalesced per path for ``coalesce`` seconds; a structural change that touches a path with
  a pending change, or a directory above it, first settles it: pending changes under a
  deleted or replaced path are dropped (the data is gone), and those under a renamed path
  move with it and are read under the new name after the ``RENAME``. A file is always read
  at flush time, so what is sent is its latest state.
- **Latency.** A flush runs as soon as a structural change is queued or the oldest pending
  content change is ``coalesce`` old (5 ms by default).
- **Races.** A new directory is watched before it is listed, so a file created in it
  meanwhile is seen by the listing or by an event (perhaps both: entries are idempotent).
  A moved directory keeps its watches, so the paths of all watches under it are rewritten
  by prefix. ``MOVED_FROM``/``MOVED_TO`` are paired by cookie; an unpaired ``MOVED_FROM`` is
  a move out of the tree (a ``DELETE``), an unpaired ``MOVED_TO`` a move in (a scan).
- **Completeness.** ``IN_Q_OVERFLOW`` (or a failed watch) triggers a rescan of everything
  and the ``on_overflow`` hook. What changed while no capture ran is the caller's to find:
  the agent runs the initial scan on first start and a check after a restart; with
  ``scan_on_start=True``, ``run`` itself begins by emitting the whole current state.
- **drain.** Reads every event already queued on the fd (the kernel queues them before the
  system call that caused them returns), flushes them and returns. Nothing is written into
  the protected trees.

Blocking work (reading and hashing files, SQLite) runs in a worker thread, one flush at a
time; the watch maps are only touched by whoever holds the flush lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inotify_simple import INotify, flags

from stead.replication.capture.base import CaptureBackend, CaptureStats, Emit, FileReader, meta_of
from stead.replication.capture.scan import BATCH_BYTES, BATCH_ENTRIES, scan_entries
from stead.replication.entries import Entry, Op
from stead.replication.filters import Filter
from stead.replication.manifest import Manifest

log = logging.getLogger(__name__)

WATCH_MASK = (
    flags.CREATE
    | flags.CLOSE_WRITE
    | flags.MODIFY
    | flags.ATTRIB
    | flags.DELETE
    | flags.DELETE_SELF
    | flags.MOVED_FROM
    | flags.MOVED_TO
    | flags.ONLYDIR
    | flags.DONT_FOLLOW
    | flags.EXCL_UNLINK
)
_CONTENT_EVENTS = flags.MODIFY | flags.CLOSE_WRITE
META, CONTENT = 1, 2
READS_PER_PUMP = 64


@dataclass(frozen=True, slots=True)
class _Scan:
    """Watch and send a directory tree that arrived (at flush time, watch before list)."""

    root: str
    relpath: str


_Work = Entry | _Scan


def _join(reldir: str, name: str) -> str:
    return f"{reldir}/{name}" if reldir else name


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


def _moved(path: str, old: str, new: str) -> str:
    return new + path[len(old) :]


class InotifyCapture(CaptureBackend):
    """The inotify capture backend for a set of named protected roots."""

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
        self._inotify: Any = None
        self._emit: Emit | None = None
        self._lock = asyncio.Lock()
        self._started = asyncio.Event()
        self._wd: dict[int, tuple[str, str]] = {}
        self._dirs: dict[tuple[str, str], int] = {}
        self._out: list[_Work] = []
        self._pending: dict[tuple[str, str], int] = {}
        self._deadline: float | None = None
        self._moves: dict[int, tuple[str, str, bool]] = {}
        self._rescan = False
        # Paths a flush found gone, and directories it scanned, since the queue was last
        # seen empty: if a rename queued behind them moved them, they are redone under the
        # new name (a read races with renames that the queue has not reported yet).
        self._vanished: set[tuple[str, str]] = set()
        self._scanned: set[tuple[str, str]] = set()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Watch every protected directory, emitting nothing; ``run`` calls it if needed.

        Call it before an initial scan made by someone else: a change made during that scan
        is then seen by the watches (and perhaps sent twice, which is harmless).
        """
        if self._inotify is not None:
            return
        self._inotify = INotify(nonblocking=True)
        async with self._lock:
            await asyncio.to_thread(self._watch_everything)

    async def run(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        self._emit = emit
        await self.start()
        readable = asyncio.Event()
        loop.add_reader(self._inotify.fileno(), readable.set)
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
                    self._pump()
                    if self._due(loop.time()):
                        await self._flush()
        finally:
            self._started.clear()
            loop.remove_reader(self._inotify.fileno())
            self._inotify.close()
            self._inotify = None
            self._wd.clear()
            self._dirs.clear()

    async def started(self) -> None:
        """Return once every protected directory is watched (and the start scan emitted)."""
        await self._started.wait()

    async def drain(self) -> None:
        await self._started.wait()
        async with self._lock:
            while True:
                exhausted = self._pump()
                await self._flush()
                if exhausted:
                    return

    async def reconcile(self, root: str, items: list[tuple[str, bytes | None]]) -> int:
        """Send the current state of paths that a check found different on a passive.

        ``items`` pairs a path with the passive's block digests of that file (``None``: the
        passive lacks it or holds something else). The manifest is first told what the
        passive really holds, so a large file that differs in a few blocks travels as a
        DELTA of exactly those blocks. Runs under the flush lock, in order with captured
        changes; returns the number of entries emitted.
        """
        if not items:
            return 0
        emit = self._emit
        assert emit is not None, "reconcile needs a running capture"
        base = self.roots[root]

        def produce() -> Iterator[Entry]:
            for relpath, hashes in items:
                abspath = os.path.join(base, relpath)
                if self.manifest is not None:
                    try:
                        st = os.lstat(abspath)
                    except OSError:
                        continue
                    if hashes is not None and self.manifest.needs_record(st.st_size):
                        self.manifest.record(root, relpath, st, hashes)
                    else:
                        self.manifest.forget(root, relpath)
                self.reader.forget_path(root, relpath)
                yield from self.reader.entries(root, relpath, abspath)

        count = 0
        async with self._lock:
            items_iter = produce()
            while True:
                batch = await asyncio.to_thread(_take, items_iter)
                if not batch:
                    break
                await emit(batch)
                self.stats.count(batch)
                count += len(batch)
            if self.manifest is not None:
                await asyncio.to_thread(self.manifest.commit)
        return count

    def _due(self, now: float) -> bool:
        if self._out or self._rescan:
            return True
        return self._deadline is not None and now >= self._deadline

    # -- reading events (loop thread, lock held) ----------------------------------------

    def _pump(self) -> bool:
        """Read and process queued events; True when the queue was found empty."""
        for _ in range(READS_PER_PUMP):
            events = self._inotify.read(timeout=0)
            if not events:
                if self._moves:
                    self._moves_out()
                self._vanished.clear()
                self._scanned.clear()
                return True
            self.stats.events += len(events)
            for event in events:
                self._event(event.wd, event.mask, event.cookie, event.name)
        return False

    def _event(self, wd: int, mask: int, cookie: int, name: str) -> None:
        if mask & flags.Q_OVERFLOW:
            self._rescan = True
            self.stats.overflows += 1
            log.warning("inotify queue overflowed: rescanning every protected root")
            if self.on_overflow is not None:
                self.on_overflow()
            return
        where = self._wd.get(wd)
        if mask & flags.IGNORED:
            if where is not None:
                del self._wd[wd]
                if self._dirs.get(where) == wd:
                    del self._dirs[where]
            return
        if where is None or not name:
            return  # an event about a watched directory itself: its parent reports it
        root, reldir = where
        relpath = _join(reldir, name)
        is_dir = bool(mask & flags.ISDIR)
        if mask & flags.MOVED_FROM:
            self._moves[cookie] = (root, relpath, is_dir)
            return
        if mask & flags.MOVED_TO:
            self._move(self._moves.pop(cookie, None), root, relpath, is_dir)
            return
        if not self.filters[root].protected(relpath, is_dir):
            return
        if mask & flags.DELETE:
            self._delete(root, relpath)
        elif mask & flags.CREATE:
            if is_dir:
                self._out.append(_Scan(root, relpath))
            else:
                self._touch(root, relpath, CONTENT)
        elif mask & _CONTENT_EVENTS:
            self._touch(root, relpath, CONTENT)
        elif mask & flags.ATTRIB:
            self._touch(root, relpath, META)

    def _touch(self, root: str, relpath: str, kind: int) -> None:
        key = (root, relpath)
        if self._pending.get(key, 0) < kind:
            self._pending[key] = kind
        if self._deadline is None:
            self._deadline = asyncio.get_running_loop().time() + self.coalesce

    def _drop_pending(self, root: str, top: str) -> None:
        for key in [k for k in self._pending if k[0] == root and _under(k[1], top)]:
            del self._pending[key]

    def _delete(self, root: str, relpath: str) -> None:
        self._drop_pending(root, relpath)
        self._out.append(Entry(Op.DELETE, root, relpath))

    def _move(
        self, src: tuple[str, str, bool] | None, root: str, relpath: str, is_dir: bool
    ) -> None:
        dst_ok = self.filters[root].protected(relpath, is_dir)
        if src is not None:
            src_root, src_path, _ = src
            src_ok = self.filters[src_root].protected(src_path, is_dir)
            if src_ok and dst_ok and src_root == root:
                self._rename(root, src_path, relpath, is_dir)
                return
            if src_ok:
                self._moved_out(src_root, src_path, is_dir)
        if dst_ok:
            self._arrived(root, relpath, is_dir)

    def _arrived(self, root: str, relpath: str, is_dir: bool) -> None:
        if is_dir:
            self._out.append(_Scan(root, relpath))
        else:
            self._drop_pending(root, relpath)
            self._touch(root, relpath, CONTENT)

    def _moved_out(self, root: str, relpath: str, is_dir: bool) -> None:
        self._delete(root, relpath)
        if is_dir:
            # Its watches moved with it, out of the tree: stop listening there.
            for key in [k for k in self._dirs if k[0] == root and _under(k[1], relpath)]:
                wd = self._dirs.pop(key)
                self._wd.pop(wd, None)
                with contextlib.suppress(OSError):  # already gone with its directory
                    self._inotify.rm_watch(wd)

    def _moves_out(self) -> None:
        # A MOVED_FROM whose MOVED_TO is not queued by now went out of the tree.
        for root, relpath, is_dir in self._moves.values():
            if self.filters[root].protected(relpath, is_dir):
                self._moved_out(root, relpath, is_dir)
        self._moves.clear()

    def _rename(self, root: str, old: str, new: str, is_dir: bool) -> None:
        self._drop_pending(root, new)  # what was at the target is replaced
        moved = {}
        for key in [k for k in self._pending if k[0] == root and _under(k[1], old)]:
            moved[(root, _moved(key[1], old, new))] = self._pending.pop(key)
        # Reads and scans queued for the old name may find nothing there now: redo them
        # under the new name once the rename has reached the passives.
        redo: list[_Work] = [
            _Scan(root, _moved(item.relpath, old, new))
            for item in self._out
            if isinstance(item, _Scan) and item.root == root and _under(item.relpath, old)
        ]
        raced = [
            key for key in self._vanished | self._scanned if key[0] == root and _under(key[1], old)
        ]
        for key in raced:
            self._vanished.discard(key)
            self._scanned.discard(key)
        if raced and is_dir:
            redo.append(_Scan(root, new))
        elif raced:
            moved[(root, new)] = CONTENT
        self._out.append(Entry(Op.RENAME, root, old, target=new))
        self._out.extend(redo)
        for key, kind in moved.items():
            self._touch(*key, kind)
        if is_dir:
            for key in [k for k in self._dirs if k[0] == root and _under(k[1], old)]:
                wd = self._dirs.pop(key)
                where = (root, _moved(key[1], old, new))
                self._dirs[where] = wd
                self._wd[wd] = where
        else:
            # The content under the new name may not have been sent yet.
            self._touch(root, new, CONTENT)

    # -- watching (lock held; may run in the flush thread) --------------------------------

    def _watch(self, root: str, reldir: str) -> None:
        path = os.path.join(self.roots[root], reldir) if reldir else os.fspath(self.roots[root])
        try:
            wd = self._inotify.add_watch(path, WATCH_MASK)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return  # gone already; its parent reports that
            # Out of watches (ENOSPC) or similar: changes there would go unseen.
            log.error("cannot watch %s: %s; raise fs.inotify.max_user_watches", path, exc)
            self.stats.overflows += 1
            if self.on_overflow is not None:
                self.on_overflow()
            return
        old = self._wd.get(wd)
        if old is not None and self._dirs.get(old) == wd:
            del self._dirs[old]
        self._wd[wd] = (root, reldir)
        self._dirs[(root, reldir)] = wd

    def _watch_everything(self) -> None:
        for name in sorted(self.roots):
            self._watch(name, "")
            for relpath, st in self.filters[name].walk(self.roots[name]):
                if stat.S_ISDIR(st.st_mode):
                    self._watch(name, relpath)

    # -- flushing (lock held) --------------------------------------------------------------

    async def _flush(self) -> None:
        rescan, self._rescan = self._rescan, False
        work, self._out = self._out, []
        pending, self._pending = self._pending, {}
        self._deadline = None
        if rescan:
            pending = {}
        items = self._entries(work, pending, rescan)
        emit = self._emit
        assert emit is not None
        while True:
            batch = await asyncio.to_thread(_take, items)
            if not batch:
                break
            await emit(batch)
            self.stats.count(batch)
        if self.manifest is not None:
            # Only now are the entries the records describe in the journal.
            await asyncio.to_thread(self.manifest.commit)

    def _entries(
        self, work: list[_Work], pending: dict[tuple[str, str], int], rescan: bool
    ) -> Iterator[Entry]:
        """Turn work items into entries; runs in the flush thread."""
        for item in work:
            if isinstance(item, Entry):
                self._account(item)
                yield item
            else:
                self._scanned.add((item.root, item.relpath))
                if not os.path.lexists(os.path.join(self.roots[item.root], item.relpath)):
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


def _take(
    items: Iterator[Entry], max_entries: int = BATCH_ENTRIES, max_bytes: int = BATCH_BYTES
) -> list[Entry]:
    batch: list[Entry] = []
    size = 0
    for entry in items:
        batch.append(entry)
        size += entry.payload_bytes()
        if len(batch) >= max_entries or size >= max_bytes:
            break
    return batch
