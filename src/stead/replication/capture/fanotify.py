"""Capture with fanotify: one filesystem mark per file system, events named by file handle.

The event source for :class:`~stead.replication.capture.core.EventCapture` (which keeps the
ordering, coalescing, race, flush and drain duties of the capture seam), through ctypes:
``fanotify_init(FAN_CLASS_NOTIF | FAN_REPORT_DFID_NAME | FAN_REPORT_FID |
FAN_REPORT_TARGET_FID)``, ``fanotify_mark(FAN_MARK_FILESYSTEM)``, ``name_to_handle_at`` and
``open_by_handle_at``. Linux 5.17 or later (``FAN_RENAME``), ``CAP_SYS_ADMIN`` (filesystem
marks) and ``CAP_DAC_READ_SEARCH`` (``open_by_handle_at``); see :func:`probe`.

Why a filesystem mark: mount marks do not report directory entry events (create, delete,
rename), and inode marks would need one per directory like inotify. A filesystem mark sees
the whole file system, so events about directories outside the protected roots are dropped
by one dict lookup (and, the first time, one ``open_by_handle_at``; see ``_resolve``). A
protected tree that spans several file systems gets one mark per file system, added when a
directory on a new mount is first keyed.

How events map to changes:

- **Keys.** A directory is keyed by ``(fsid, file handle)``. Keys are bound to paths when a
  directory is listed (``name_to_handle_at`` before listing) and, better, when its ``CREATE``
  or ``RENAME`` event is processed (``FAN_REPORT_TARGET_FID`` reports the child's handle),
  so a path is the one the directory had when the event happened. A handle nobody bound
  (an event racing the start walk) is resolved with ``open_by_handle_at`` + ``readlink``;
  handles outside the roots are remembered in a bounded negative cache.
- **Renames.** ``FAN_RENAME`` reports the old and the new directory and name in one event:
  no cookie pairing, and a move out of or into the roots is known at once.
- **Merged events.** fanotify merges a new event into any queued event about the same
  object (same directory, name, child handle and process), not only the last one. Content
  and attribute bits merged that way are harmless (files are read at flush time). A merged
  ``DELETE`` with anything else has lost its order: the path becomes a state check (send
  what is there, or ``DELETE``). An identical rename repeated while the first is queued
  (``a->c``, ``c->a``, ``a->c``) is merged away too: when one object is renamed twice
  before the queue runs empty, every name it took is state-checked once it does.
- **Completeness.** ``FAN_Q_OVERFLOW`` triggers a rescan of everything and ``on_overflow``.
  The queue is bounded (``fs.fanotify.max_queued_events``); unrelated activity elsewhere on a
  marked file system counts against it.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import struct
from collections import OrderedDict
from typing import ClassVar

from stead.replication.capture.core import EventCapture, join, under

log = logging.getLogger(__name__)

__all__ = ["FanotifyCapture", "probe"]

# <linux/fanotify.h>
FAN_MODIFY = 0x2
FAN_ATTRIB = 0x4
FAN_CLOSE_WRITE = 0x8
FAN_CREATE = 0x100
FAN_DELETE = 0x200
FAN_DELETE_SELF = 0x400
FAN_Q_OVERFLOW = 0x4000
FAN_RENAME = 0x10000000
FAN_ONDIR = 0x40000000
FAN_CLOEXEC = 0x1
FAN_NONBLOCK = 0x2
FAN_CLASS_NOTIF = 0x0
FAN_REPORT_FID = 0x200
FAN_REPORT_DIR_FID = 0x400
FAN_REPORT_NAME = 0x800
FAN_REPORT_TARGET_FID = 0x1000
FAN_REPORT_DFID_NAME = FAN_REPORT_DIR_FID | FAN_REPORT_NAME
FAN_MARK_ADD = 0x1
FAN_MARK_FILESYSTEM = 0x100
FAN_EVENT_INFO_TYPE_FID = 1
FAN_EVENT_INFO_TYPE_DFID_NAME = 2
FAN_EVENT_INFO_TYPE_OLD_DFID_NAME = 10
FAN_EVENT_INFO_TYPE_NEW_DFID_NAME = 12
FANOTIFY_METADATA_VERSION = 3
AT_FDCWD = -100
AT_SYMLINK_FOLLOW = 0x400
MAX_HANDLE_SZ = 128

INIT_FLAGS = (
    FAN_CLASS_NOTIF
    | FAN_CLOEXEC
    | FAN_NONBLOCK
    | FAN_REPORT_DFID_NAME
    | FAN_REPORT_FID
    | FAN_REPORT_TARGET_FID
)
MARK_MASK = (
    FAN_CREATE
    | FAN_DELETE
    | FAN_RENAME
    | FAN_MODIFY
    | FAN_CLOSE_WRITE
    | FAN_ATTRIB
    | FAN_DELETE_SELF
    | FAN_ONDIR
)
READ_SIZE = 256 * 1024
OUTSIDE_CACHE = 4096
_METADATA = struct.Struct("=IBBHQii")
_STATFS_FSID_OFFSET = 56  # struct statfs on 64-bit Linux: seven longs, then f_fsid

Key = tuple[bytes, bytes]  # (fsid, handle type + handle bytes)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_libc.fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]
_libc.name_to_handle_at.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_int,
]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_char_p]


def _ok(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def fanotify_init() -> int:
    return _ok(_libc.fanotify_init(INIT_FLAGS, os.O_RDONLY | os.O_LARGEFILE), "fanotify_init")


def mark_filesystem(fd: int, path: str) -> None:
    flags = FAN_MARK_ADD | FAN_MARK_FILESYSTEM
    _ok(_libc.fanotify_mark(fd, flags, MARK_MASK, AT_FDCWD, os.fsencode(path)), "fanotify_mark")


def fsid_of(path: str) -> bytes:
    buf = ctypes.create_string_buffer(256)
    _ok(_libc.statfs(os.fsencode(path), buf), "statfs")
    return buf.raw[_STATFS_FSID_OFFSET : _STATFS_FSID_OFFSET + 8]


def handle_of(path: str, *, follow: bool = False) -> tuple[int, bytes]:
    """``(mount id, handle type + handle bytes)`` of ``path`` (name_to_handle_at)."""
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    struct.pack_into("=I", buf, 0, MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    flags = AT_SYMLINK_FOLLOW if follow else 0
    _ok(
        _libc.name_to_handle_at(AT_FDCWD, os.fsencode(path), buf, ctypes.byref(mount_id), flags),
        "name_to_handle_at",
    )
    (size,) = struct.unpack_from("=I", buf, 0)
    return mount_id.value, buf.raw[4 : 8 + size]


def path_of(mount_fd: int, handle: bytes) -> str | None:
    """The current path of a directory handle, or None if it is gone (open_by_handle_at)."""
    buf = ctypes.create_string_buffer(struct.pack("=I", len(handle) - 4) + handle)
    flags = os.O_PATH | os.O_CLOEXEC
    try:
        fd = _ok(_libc.open_by_handle_at(mount_fd, buf, flags), "open_by_handle_at")
    except OSError as exc:
        if exc.errno in (errno.ESTALE, errno.ENOENT):
            return None
        raise
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    return None if path.endswith(" (deleted)") else path


def _open_dir(path: str) -> int:
    # Not O_PATH: open_by_handle_at refuses an O_PATH mount fd (EBADF).
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def probe(paths: list[str]) -> str | None:
    """Why fanotify cannot watch ``paths`` here, or None if it can (marks nothing lasting)."""
    try:
        fd = fanotify_init()
    except OSError as exc:
        return f"fanotify_init: {errno.errorcode.get(exc.errno or 0, exc.errno)} ({exc.strerror})"
    try:
        for path in paths:
            try:
                mark_filesystem(fd, path)
                _, handle = handle_of(path, follow=True)
                mount_fd = _open_dir(path)
                try:
                    path_of(mount_fd, handle)
                finally:
                    os.close(mount_fd)
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                return f"{path}: {exc.strerror.split(':')[0] if exc.strerror else ''} {name}"
    finally:
        os.close(fd)
    return None


class FanotifyCapture(EventCapture[Key]):
    """The fanotify capture backend for a set of named protected roots."""

    source: ClassVar[str] = "fanotify"
    attach_hint: ClassVar[str] = ""
    # A new directory's contents are reported by their own events (the mark covers the
    # whole file system and its handle is bound at its CREATE): send just the directory.
    scan_created_dirs: ClassVar[bool] = False

    _fd: int = -1
    _mounts: dict[int, bytes]
    _mount_fds: dict[bytes, int]
    _outside: OrderedDict[Key, None]
    _renames: dict[Key, list[tuple[tuple[str, str] | None, tuple[str, str] | None, bool]]]

    # -- the event-source hooks (see EventCapture) --------------------------------------

    def _open(self) -> int:
        self._fd = fanotify_init()
        self._mounts, self._mount_fds = {}, {}
        self._outside, self._renames = OrderedDict(), {}
        self._bases = [(name, os.path.realpath(path)) for name, path in self.roots.items()]
        return self._fd

    def _close(self) -> None:
        for fd in self._mount_fds.values():
            os.close(fd)
        self._mount_fds.clear()
        os.close(self._fd)
        self._fd = -1

    def _attach(self, root: str, reldir: str, path: str) -> Key:
        mount_id, handle = handle_of(path, follow=not reldir)
        fsid = self._mounts.get(mount_id)
        if fsid is None:
            fsid = fsid_of(path)
            if fsid not in self._mount_fds:
                mark_filesystem(self._fd, path)
                self._mount_fds[fsid] = _open_dir(path)
                log.debug("fanotify marks the file system of %s", path)
            self._mounts[mount_id] = fsid
        return (fsid, handle)

    def _settled(self) -> None:
        renames, self._renames = self._renames, {}
        for moves in renames.values():
            if len(moves) < 2:
                continue
            # A repeat of one of these renames may have been merged into the first.
            for src, dst, is_dir in moves:
                for place in (src, dst):
                    if place is not None:
                        self._check(place[0], place[1], is_dir)

    def _read(self) -> bool:
        try:
            data = os.read(self._fd, READ_SIZE)
        except BlockingIOError:
            return False
        if not data:
            return False
        view = memoryview(data)
        offset = 0
        while offset + _METADATA.size <= len(data):
            length, version, _, meta_len, mask, fd, _pid = _METADATA.unpack_from(view, offset)
            if version != FANOTIFY_METADATA_VERSION or length < meta_len:
                raise OSError(errno.EPROTO, f"fanotify metadata version {version}")
            if fd >= 0:
                os.close(fd)  # not expected with file-handle reporting
            self.stats.events += 1
            self._event(mask, self._records(data, offset + meta_len, offset + length))
            offset += length
        return True

    # -- events (loop thread, lock held) --------------------------------------------------

    @staticmethod
    def _records(data: bytes, start: int, end: int) -> dict[int, tuple[Key, str]]:
        """Info records by type: ``(directory or object key, name)``."""
        records: dict[int, tuple[Key, str]] = {}
        while start + 4 <= end:
            kind, _, size = struct.unpack_from("=BBH", data, start)
            if size < 4:
                break
            if kind in (
                FAN_EVENT_INFO_TYPE_FID,
                FAN_EVENT_INFO_TYPE_DFID_NAME,
                FAN_EVENT_INFO_TYPE_OLD_DFID_NAME,
                FAN_EVENT_INFO_TYPE_NEW_DFID_NAME,
            ):
                fsid = data[start + 4 : start + 12]
                (handle_bytes,) = struct.unpack_from("=I", data, start + 12)
                handle_end = start + 20 + handle_bytes
                name = data[handle_end : start + size].split(b"\0", 1)[0]
                records[kind] = ((fsid, data[start + 16 : handle_end]), os.fsdecode(name))
            start += size
        return records

    def _place(self, record: tuple[Key, str] | None) -> tuple[str, str] | None:
        if record is None:
            return None
        where = self._resolve(record[0])
        if where is None:
            return None
        return where[0], join(where[1], record[1])

    def _event(self, mask: int, records: dict[int, tuple[Key, str]]) -> None:
        if mask & FAN_Q_OVERFLOW:
            self._overflow("fanotify queue overflowed")
            return
        is_dir = bool(mask & FAN_ONDIR)
        child = records.get(FAN_EVENT_INFO_TYPE_FID)
        if mask & FAN_RENAME:
            src = self._place(records.get(FAN_EVENT_INFO_TYPE_OLD_DFID_NAME))
            dst = self._place(records.get(FAN_EVENT_INFO_TYPE_NEW_DFID_NAME))
            if src is None and dst is None:
                return
            self._move(src, dst, is_dir)
            if child is not None:
                if is_dir and dst is not None and self.filters[dst[0]].protected(dst[1], True):
                    self._bind(child[0], *dst)
                self._renames.setdefault(child[0], []).append((src, dst, is_dir))
            return
        record = records.get(FAN_EVENT_INFO_TYPE_DFID_NAME)
        if record is None:
            return  # e.g. DELETE_SELF of a file: its parent reports the DELETE
        key, name = record
        where = self._resolve(key)
        if where is None:
            return
        root, reldir = where
        if name == ".":  # about a directory itself: only its attributes and its end matter
            if mask & FAN_DELETE_SELF:
                self._forget_key(key)
            elif mask & FAN_ATTRIB and reldir:
                self._changed(root, reldir, True, meta=True)
            return
        relpath = join(reldir, name)
        created, deleted = bool(mask & FAN_CREATE), bool(mask & FAN_DELETE)
        if created and not deleted and is_dir:
            if child is None:
                # Unexpected without FAN_REPORT_TARGET_FID: list it like inotify would.
                self._move(None, (root, relpath), True)
                return
            if self.filters[root].protected(relpath, True):
                self._bind(child[0], root, relpath)
        self._changed(
            root,
            relpath,
            is_dir,
            created=created,
            deleted=deleted,
            content=bool(mask & (FAN_MODIFY | FAN_CLOSE_WRITE)),
            meta=bool(mask & FAN_ATTRIB),
        )

    def _resolve(self, key: Key) -> tuple[str, str] | None:
        """Where a directory was when the event happened; None outside the roots."""
        where = self._where.get(key)
        if where is not None:
            return where
        if key in self._outside:
            self._outside.move_to_end(key)
            return None
        mount_fd = self._mount_fds.get(key[0])
        path = None
        if mount_fd is not None:
            try:
                path = path_of(mount_fd, key[1])
            except OSError as exc:
                log.debug("cannot resolve a directory handle: %s", exc)
        if path is not None:
            for name, base in self._bases:
                if under(path, base):
                    reldir = path[len(base) + 1 :]
                    if reldir and not self.filters[name].protected(reldir, True):
                        break
                    # Not bound yet (an event racing the start walk): its path now.
                    log.debug("fanotify: bound unseen directory %s late", path)
                    self._bind(key, name, reldir)
                    return name, reldir
        elif mount_fd is not None:
            return None  # gone: not worth remembering, its handle will not come back
        self._outside[key] = None
        if len(self._outside) > OUTSIDE_CACHE:
            self._outside.popitem(last=False)
        return None
