"""Capture with inotify: every protected directory watched, events turned into entries.

The event source for :class:`~stead.replication.capture.core.EventCapture`, which keeps the
ordering, coalescing, race, flush and drain duties of the capture seam. What is inotify's
own here:

- **Keys.** A directory is keyed by its watch descriptor. A watch is added before the
  directory is listed (``_attach``), so a file created in it meanwhile is seen by the listing
  or by an event. A moved directory keeps its watches; the core rewrites their paths.
- **Renames.** ``MOVED_FROM``/``MOVED_TO`` are paired by cookie; an unpaired ``MOVED_FROM``
  (its ``MOVED_TO`` not queued by the time the queue is found empty) is a move out of the
  tree (a ``DELETE``), an unpaired ``MOVED_TO`` a move in (a scan).
- **Completeness.** ``IN_Q_OVERFLOW`` (or a failed watch, e.g. ``fs.inotify.max_user_watches``
  reached) triggers a rescan of everything and the ``on_overflow`` hook.
- **Order.** inotify never merges events of one object out of order (only identical
  consecutive ones), so every event maps to one change in the order it happened.
"""

from __future__ import annotations

import contextlib
from typing import Any, ClassVar

from inotify_simple import INotify, flags

from stead.replication.capture.core import EventCapture, join

__all__ = ["WATCH_MASK", "InotifyCapture"]

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


class InotifyCapture(EventCapture[int]):
    """The inotify capture backend for a set of named protected roots."""

    source: ClassVar[str] = "inotify"
    attach_hint: ClassVar[str] = "; raise fs.inotify.max_user_watches"

    _inotify: Any = None
    _moves: dict[int, tuple[str, str, bool]]

    # -- the event-source hooks (see EventCapture) --------------------------------------

    def _open(self) -> int:
        self._inotify = INotify(nonblocking=True)
        self._moves = {}
        return int(self._inotify.fileno())

    def _close(self) -> None:
        self._inotify.close()
        self._inotify = None

    def _attach(self, root: str, reldir: str, path: str) -> int:
        return int(self._inotify.add_watch(path, WATCH_MASK))

    def _detach(self, key: int) -> None:
        with contextlib.suppress(OSError):  # already gone with its directory
            self._inotify.rm_watch(key)

    def _settled(self) -> None:
        # A MOVED_FROM whose MOVED_TO is not queued by now went out of the tree.
        moves, self._moves = self._moves, {}
        for root, relpath, is_dir in moves.values():
            self._move((root, relpath), None, is_dir)

    def _read(self) -> bool:
        events = self._inotify.read(timeout=0)
        if not events:
            return False
        self.stats.events += len(events)
        for event in events:
            self._event(event.wd, event.mask, event.cookie, event.name)
        return True

    # -- events (loop thread, lock held) --------------------------------------------------

    def _event(self, wd: int, mask: int, cookie: int, name: str) -> None:
        if mask & flags.Q_OVERFLOW:
            self._overflow("inotify queue overflowed")
            return
        if mask & flags.IGNORED:
            self._forget_key(wd)
            return
        where = self._where.get(wd)
        if where is None or not name:
            return  # an event about a watched directory itself: its parent reports it
        root, reldir = where
        relpath = join(reldir, name)
        is_dir = bool(mask & flags.ISDIR)
        if mask & flags.MOVED_FROM:
            self._moves[cookie] = (root, relpath, is_dir)
        elif mask & flags.MOVED_TO:
            src = self._moves.pop(cookie, None)
            self._move(src[:2] if src is not None else None, (root, relpath), is_dir)
        else:
            self._changed(
                root,
                relpath,
                is_dir,
                deleted=bool(mask & flags.DELETE),
                created=bool(mask & flags.CREATE),
                content=bool(mask & _CONTENT_EVENTS),
                meta=bool(mask & flags.ATTRIB),
            )
