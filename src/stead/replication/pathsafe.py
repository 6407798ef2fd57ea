"""Resolve a peer's relative path inside a protected root without ever leaving it.

A path from a peer is never trusted and never handed to a path-based system call. The root is
opened once as a directory file descriptor, and every lookup walks the path one component at a
time with ``openat(dir_fd, name, O_DIRECTORY | O_NOFOLLOW)``: a symlink on the way, ``..``,
``.``, an empty component, an absolute path or a NUL byte is refused with
:class:`~stead.errors.UnsafePath` before anything is touched. What the walk returns is the
*parent* directory's descriptor and the final name, so that every operation is an *at-style
call (``dir_fd=...``, ``follow_symlinks=False``) on a name that cannot be swapped for a path
elsewhere.

The final component may itself be a symlink (symlinks are replicated): callers must operate on
it without following it (unlink, rename, ``lchown``, ``utime(follow_symlinks=False)``) and skip
``chmod``, which Linux does not support on symlinks.

Timing and atomicity duties:

* The walk costs one ``openat`` per directory component. :class:`RootDir` caches the
  descriptors of parent directories it has opened; the caller **must** call
  :meth:`RootDir.invalidate` whenever it removes or renames a directory, because a cached
  descriptor keeps pointing at the moved directory, and :meth:`RootDir.trim` between
  operations to bound the number of open descriptors. The applier also invalidates at the end
  of every batch so that nothing outside its own sequence of changes is trusted for long.
* Nothing here is atomic across components; safety comes from never following a symlink, not
  from a snapshot of the tree. A directory created on the way (``create_missing``) is not made
  durable here: the applier's durability pass (``syncfs``) covers it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from pathlib import Path
from types import TracebackType

from stead.errors import UnsafePath

log = logging.getLogger(__name__)

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_CACHE_LIMIT = 256
DEFAULT_DIR_MODE = 0o755


def split_relative(relpath: str) -> list[str]:
    """Return the components of a plain relative path, or raise :class:`UnsafePath`.

    ``relpath`` is text as produced by :func:`os.fsdecode` (non-UTF-8 bytes are surrogate
    escapes); it is encoded back with the file system encoding by every ``os`` call.
    """
    if not isinstance(relpath, str):
        raise UnsafePath("path is not text", path=repr(relpath))
    if not relpath:
        raise UnsafePath("empty path", path=relpath)
    if "\x00" in relpath:
        raise UnsafePath("path holds a NUL byte", path=relpath)
    if relpath.startswith("/"):
        raise UnsafePath("absolute path", path=relpath)
    parts = relpath.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise UnsafePath("empty, '.' or '..' component", path=relpath)
    return parts


class RootDir:
    """One protected root, opened as a directory descriptor, and the walks beneath it.

    The root itself is opened with ``O_NOFOLLOW``: if the configured directory is a symlink it
    is refused, because then the place the files land could change under us. A missing root
    is created (mode 0755), since the active says it exists.
    """

    __slots__ = ("_cache", "_fd", "path")

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if create:
            self.path.mkdir(mode=DEFAULT_DIR_MODE, parents=True, exist_ok=True)
        try:
            self._fd: int = os.open(self.path, _DIR_FLAGS)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                raise UnsafePath("root is not a plain directory", path=str(path)) from exc
            raise
        # Parent directory descriptors by relative directory path ("" is the root itself).
        self._cache: dict[str, int] = {}

    @property
    def fd(self) -> int:
        """The root directory's descriptor (owned by this object; do not close it)."""
        return self._fd

    def open_parent(self, relpath: str, *, create_missing: bool = False) -> tuple[int, str]:
        """Open the directory that holds ``relpath``'s final name, without following symlinks.

        Returns ``(parent_fd, name)``. ``parent_fd`` belongs to this object (it is cached):
        the caller must not close it and must not keep it past :meth:`invalidate`.

        Raises :class:`UnsafePath` for a malformed path or a symlink on the way,
        :class:`FileNotFoundError` for a missing directory when ``create_missing`` is false,
        and :class:`NotADirectoryError` when a non-directory (not a symlink) is on the way.
        Directories created on the way get mode 0755 (less the umask) and root's ownership;
        an entry for them normally precedes and will set their metadata.
        """
        parts = split_relative(relpath)
        return self._walk(relpath, parts[:-1], create_missing), parts[-1]

    def open_dir(self, relpath: str, *, create_missing: bool = False) -> int:
        """Open ``relpath`` itself as a directory, like :meth:`open_parent` for every component.

        The descriptor is cached and owned by this object, like those of :meth:`open_parent`.
        """
        return self._walk(relpath, split_relative(relpath), create_missing)

    def _walk(self, relpath: str, dirs: list[str], create_missing: bool) -> int:
        key = "/".join(dirs)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        fd = self._fd
        opened: list[int] = []
        try:
            for name in dirs:
                fd = open_child_dir(fd, name, relpath, create_missing)
                opened.append(fd)
        except BaseException:
            for each in opened:
                os.close(each)
            raise
        # Only the final directory is kept; the intermediate ones were stepping stones.
        for each in opened[:-1]:
            os.close(each)
        self._cache[key] = fd
        return fd

    def invalidate(self, under: str | None = None) -> None:
        """Forget cached directory descriptors: all of them, or those at and below ``under``.

        Call it after a directory moved or vanished. Descriptors the caller still holds for
        directories outside ``under`` stay valid, so a walk may go on after removing a subtree.
        """
        prefix = None if under is None else under + "/"
        for key in list(self._cache):
            if key and (prefix is None or key == under or key.startswith(prefix)):
                os.close(self._cache.pop(key))
        if under is None:
            self._cache.clear()

    def trim(self) -> None:
        """Bound the cache; call it only while holding no descriptor from this object."""
        if len(self._cache) >= _CACHE_LIMIT:
            self.invalidate()

    def close(self) -> None:
        self.invalidate()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RootDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_child_dir(parent_fd: int, name: str, relpath: str, create_missing: bool) -> int:
    """Open ``name`` under ``parent_fd`` as a directory; never follow a symlink."""
    for _attempt in range(3):  # bounded: only a concurrent create/remove makes us retry
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
        except FileNotFoundError:
            if not create_missing:
                raise
            # Someone may make it between our open and mkdir: then look again.
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, DEFAULT_DIR_MODE, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            kind = _lstat_kind(parent_fd, name)
            if kind == "symlink":
                raise UnsafePath(
                    f"symlink on the way at {name!r}", path=relpath, symlink=True
                ) from None
            if kind == "missing":
                continue
            raise NotADirectoryError(
                errno.ENOTDIR, f"{name!r} on the way to {relpath!r} is not a directory"
            ) from None
    raise FileNotFoundError(errno.ENOENT, f"{name!r} on the way to {relpath!r} keeps changing")


def _lstat_kind(dir_fd: int, name: str) -> str:
    try:
        st = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return "missing"
    if stat.S_ISLNK(st.st_mode):
        return "symlink"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    return "other"


def lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``lstat`` of ``name`` in ``dir_fd``, or None when it does not exist."""
    try:
        return os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
