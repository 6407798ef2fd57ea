"""Durability helpers: atomic replacement of small files (keys, configuration), and
``syncfs(2)`` for writers that flush whole file systems (the applier, reclone swaps)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def load_syncfs() -> Callable[[int], int] | None:
    """``syncfs(2)`` from libc (one flush per file system), or None where it is missing: the
    caller falls back to ``fsync`` and ``sync`` and says so."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        syncfs = libc.syncfs
    except (OSError, AttributeError):
        log.warning("syncfs is not available: falling back to fsync and sync")
        return None
    syncfs.argtypes = [ctypes.c_int]
    syncfs.restype = ctypes.c_int
    return syncfs


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: a temp file in the same directory (created 0600, then
    given ``mode``), fsync, rename, fsync of the directory. A crash leaves the old file or
    the new one, never half of each."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
