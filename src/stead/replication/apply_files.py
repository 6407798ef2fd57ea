"""File-level helpers of the applier (:mod:`stead.replication.applier`): staging names,
unnamed staging files, metadata in the right order, and the errors an apply raises."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import resource
import time

from stead.errors import ApplyError
from stead.fsutil import name_unnamed, open_unnamed
from stead.replication.entries import Entry
from stead.replication.pathsafe import lstat_at

log = logging.getLogger(__name__)

TMP_PREFIX = "tmp-"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def unnamed_works(key: str, staging_fd: int) -> bool:
    """Whether an unnamed file made in staging can be given a name: ``O_TMPFILE`` may be
    missing (the file system), and naming one needs ``CAP_DAC_READ_SEARCH`` or ``/proc``.
    Tried once per root: a file that could not be named later would be lost."""
    try:
        fd = open_unnamed(staging_fd)
    except OSError as exc:
        log.info("no O_TMPFILE in %s (%s): whole files are staged by name", key, exc)
        return False
    try:
        name = tmp_name()
        name_unnamed(fd, staging_fd, name)
        os.unlink(name, dir_fd=staging_fd)
        return True
    except OSError as exc:
        log.info("cannot name an unnamed file in %s (%s): staged by name", key, exc)
        return False
    finally:
        os.close(fd)


def unnamed_cap() -> int:
    """How many unnamed staged files a segment may hold open: a share of the open-file
    limit, so that sockets, journals and databases keep the rest."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 4096
    return max(0, min(4096, soft // 2 - 64))


def staging_name(entry: Entry) -> str:
    raw = entry.root.encode("utf-8", "surrogateescape") + b"\0"
    raw += entry.path.encode("utf-8", "surrogateescape")
    return hashlib.sha256(raw).hexdigest()


def staged_exists(entry: Entry, staging_fd: int) -> bool:
    return lstat_at(staging_fd, staging_name(entry)) is not None


def tmp_name() -> str:
    return TMP_PREFIX + os.urandom(12).hex()


def unlink_quiet(name: str, dir_fd: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=dir_fd)


def set_meta_fd(
    fd: int, entry: Entry, default_mode: int | None, born: tuple[int, int] | None = None
) -> None:
    """Owner, then mode (chown clears set-id bits), then mtime (last: anything changes it).

    ``born``: the owner a new file has already; no chown when the entry names it (the
    agent's own files, as root: most of a system's). A new file has no set-id bits to
    clear, and its mode is set below all the same."""
    if (entry.uid is not None or entry.gid is not None) and not (
        born is not None
        and (entry.uid is None or entry.uid == born[0])
        and (entry.gid is None or entry.gid == born[1])
    ):
        os.fchown(fd, owner_id(entry.uid), owner_id(entry.gid))
    mode = entry.mode if entry.mode is not None else default_mode
    if mode is not None:
        os.fchmod(fd, mode)
    if entry.mtime_ns is not None:
        os.utime(fd, ns=(time.time_ns(), entry.mtime_ns))


def set_link_meta(name: str, dir_fd: int, entry: Entry) -> None:
    """Owner and mtime of a symlink itself; Linux has no mode on symlinks, so none is set."""
    if entry.uid is not None or entry.gid is not None:
        os.chown(
            name, owner_id(entry.uid), owner_id(entry.gid), dir_fd=dir_fd, follow_symlinks=False
        )
    if entry.mtime_ns is not None:
        times = (time.time_ns(), entry.mtime_ns)
        os.utime(name, ns=times, dir_fd=dir_fd, follow_symlinks=False)


def owner_id(value: int | None) -> int:
    return -1 if value is None else value


def apply_error(seq: int, entry: Entry, exc: OSError) -> ApplyError:
    if exc.errno in _NO_SPACE:
        return ApplyError(f"no space left for {entry.path!r}: {exc}", seq=seq)
    return ApplyError(f"{entry.op} {entry.path!r} in {entry.root!r}: {exc}", seq=seq)
