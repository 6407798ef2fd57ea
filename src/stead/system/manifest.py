"""A node's system trees as data: one :class:`PathEntry` per path, walked without following.

:func:`build_manifest` walks the trees of a :class:`Scope` (from ``[system]`` and the
protected paths) and records, per path, its type, permission bits, owner, and for a regular
file its size and BLAKE3 digest, for a symlink its target, for a device its number. What
it leaves out, and why:

- excluded paths (``system.exclude``): not recorded at all, nor anything under them;
- preserved paths (``system.preserve``): each node's own; listed in
  :attr:`SystemManifest.preserved`, not descended into, never compared;
- protected subtrees inside a tree: replicated already; listed in
  :attr:`SystemManifest.skipped`;
- mount points of virtual file systems (``proc``, ``sysfs``, ...): listed as skipped too.

Symlinks are recorded, never followed (a tree's root included). A file that cannot be read
or a directory that cannot be listed is recorded with its ``error``; the walk goes on.
Paths are ``str`` from :func:`os.fsdecode`: a name that is not valid UTF-8 holds surrogate
escapes and maps back to its bytes exactly.

The walk is bounded (:data:`MAX_ENTRIES`) and blocking: run it in a thread from asyncio.
It reads every regular file once (a few thousand files of ``/etc`` take well under a
second), or only the changed ones given a :class:`~stead.system.hashcache.HashCache`; the
trees are never written.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import blake3

from stead.config.system import PathSet
from stead.errors import ProtocolError, UsageError
from stead.system.hashcache import HashCache

if TYPE_CHECKING:
    from stead.config.schema import ClusterConfig

MAX_ENTRIES = 2_000_000
READ_CHUNK = 1024**2
BIG_FILE = 16 * 1024**2
DIGEST_SIZE = 32
KINDS = ("file", "dir", "symlink", "fifo", "socket", "char", "block")
# File systems whose content is the kernel's view, not configuration: never walked.
VIRTUAL_FS = frozenset(
    {
        "autofs",
        "binfmt_misc",
        "bpf",
        "cgroup",
        "cgroup2",
        "configfs",
        "debugfs",
        "devpts",
        "devtmpfs",
        "efivarfs",
        "fusectl",
        "hugetlbfs",
        "mqueue",
        "nsfs",
        "proc",
        "pstore",
        "rpc_pipefs",
        "securityfs",
        "selinuxfs",
        "sysfs",
        "tracefs",
    }
)

HashFile = Callable[[str], tuple[bytes, int]]
# Whether a regular file's content must be read now, given its path and size: a file it
# declines is recorded with its size and an empty digest (unless the cache knows it).
HashWanted = Callable[[str, int], bool]
# Called during a walk with the manifest so far and the paths recorded since the last call
# (in walk order: a directory before what it holds), each entry final.
Emit = Callable[["SystemManifest", list[str]], None]
PART_FIRST = 1_000  # paths in the first part a walk emits (the copy can start early)
PART_MOST = 16_384  # parts double up to this many paths
PART_SECONDS = 0.5  # or go out after this long (a walk that hashes big files)


class PathEntry(NamedTuple):
    """One path of a system tree, as :func:`build_manifest` found it (a named tuple: a walk
    makes one per path, and a frozen dataclass costs several times as much to build)."""

    path: str
    kind: str  # one of KINDS
    mode: int  # permission bits, setuid, setgid and sticky included
    uid: int
    gid: int
    size: int = 0  # regular files: bytes hashed
    target: str = ""  # symlinks
    digest: bytes = b""  # regular files: BLAKE3 of the content
    rdev: int = 0  # character and block devices
    error: str = ""  # why the content (file, symlink) or the listing (dir) is unknown

    def to_wire(self) -> list[Any]:
        return [
            self.path,
            self.kind,
            self.mode,
            self.uid,
            self.gid,
            self.size,
            self.target,
            self.digest,
            self.rdev,
            self.error,
        ]

    @classmethod
    def from_wire(cls, wire: Any) -> PathEntry:
        if not isinstance(wire, list | tuple) or len(wire) != 10:
            raise ProtocolError("manifest entry is not a list of 10 fields")
        path, kind, mode, uid, gid, size, target, digest, rdev, error = wire
        ints = (mode, uid, gid, size, rdev)
        if (
            not isinstance(path, str)
            or not path.startswith("/")
            or kind not in KINDS
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in ints)
            or not isinstance(target, str)
            or not isinstance(digest, bytes)
            or len(digest) not in (0, DIGEST_SIZE)
            or not isinstance(error, str)
        ):
            raise ProtocolError(f"malformed manifest entry for {str(path)[:200]!r}")
        return cls(path, kind, mode, uid, gid, size, target, digest, rdev, error)


@dataclass(frozen=True)
class Scope:
    """What to walk: the trees, and the paths in them that are left out or kept apart.

    ``exclude`` and ``preserve`` are absolute globs as in ``[system]``; ``skip`` lists
    directories walked by something else (the protected paths): they and everything under
    them are left out and listed as skipped.
    """

    trees: tuple[str, ...]
    exclude: tuple[str, ...] = ()
    preserve: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cluster: ClusterConfig) -> Scope:
        system = cluster.system
        return cls(
            trees=tuple(system.trees),
            exclude=tuple(system.exclude),
            preserve=tuple(system.preserve),
            skip=tuple(p.path for p in cluster.protected),
        )

    def describe(self) -> dict[str, list[str]]:
        """The scope as plain data: two nodes compare what they walked by it."""
        return {
            "trees": list(self.trees),
            "exclude": list(self.exclude),
            "preserve": list(self.preserve),
            "skip": list(self.skip),
        }


@dataclass
class SystemManifest:
    """Every recorded path of the trees by path, and what the walk left out."""

    entries: dict[str, PathEntry] = field(default_factory=dict)
    preserved: list[str] = field(default_factory=list)  # each node's own: not compared
    skipped: list[str] = field(default_factory=list)  # protected or virtual: not walked
    missing: list[str] = field(default_factory=list)  # configured trees that do not exist
    # The mtime of each entry as walked (local use, e.g. the reclone's plan; not on the wire).
    mtimes: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def to_wire(self) -> dict[str, Any]:
        return {
            "entries": [self.entries[p].to_wire() for p in sorted(self.entries)],
            "preserved": sorted(self.preserved),
            "skipped": sorted(self.skipped),
            "missing": sorted(self.missing),
        }

    @classmethod
    def from_wire(cls, wire: Any) -> SystemManifest:
        if not isinstance(wire, dict):
            raise ProtocolError("manifest is not a map")
        entries = wire.get("entries")
        if not isinstance(entries, list):
            raise ProtocolError("manifest without entries")
        manifest = cls()
        for item in entries:
            entry = PathEntry.from_wire(item)
            manifest.entries[entry.path] = entry
        for key in ("preserved", "skipped", "missing"):
            values = wire.get(key, [])
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ProtocolError(f"manifest field {key!r} is not a list of paths")
            setattr(manifest, key, list(values))
        return manifest


def hash_file(path: str) -> tuple[bytes, int]:
    """BLAKE3 digest and length of a regular file's content, opened without following.

    Raises :class:`OSError` when it cannot be read, or when it is no longer a regular file
    (replaced since it was listed).
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | os.O_NOATIME)  # a drift run leaves atimes alone
    except PermissionError:  # O_NOATIME needs the file's owner or CAP_FOWNER
        fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError("replaced by something else than a file while being read")
        big = st.st_size >= BIG_FILE  # BLAKE3 hashes one large buffer on several cores
        hasher = blake3.blake3(max_threads=blake3.blake3.AUTO if big else 1)
        size = 0
        while chunk := os.read(fd, BIG_FILE if big else READ_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
        return hasher.digest(), size
    finally:
        os.close(fd)


def _unescape(field_bytes: bytes) -> str:
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m[1], 8)]), field_bytes))


def virtual_mounts(mountinfo: str = "/proc/self/mountinfo") -> frozenset[str]:
    """Mount points of virtual file systems (:data:`VIRTUAL_FS`) in this mount namespace."""
    found = set()
    try:
        with open(mountinfo, "rb") as file:
            lines = file.read().splitlines()
    except OSError:
        return frozenset()
    for line in lines:
        fields = line.split(b" ")
        try:
            separator = fields.index(b"-")
            fstype = fields[separator + 1].decode("ascii", "replace")
        except (ValueError, IndexError):
            continue
        if fstype in VIRTUAL_FS:
            found.add(_unescape(fields[4]))
    return frozenset(found)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "char"
    return "block"


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


class _Walk:
    def __init__(
        self,
        scope: Scope,
        hash_file: HashFile,
        max_entries: int,
        virtual: frozenset[str],
        cache: HashCache | None,
        hash_wanted: HashWanted | None = None,
        emit: Emit | None = None,
    ) -> None:
        self.emit = emit
        self.fresh: list[str] = []  # recorded since the last emit
        self.part = PART_FIRST
        self.emitted = time.monotonic()
        self.cache = cache
        self.hash_wanted = hash_wanted
        self.excluded = PathSet(list(scope.exclude))
        self.preserved = PathSet(list(scope.preserve))
        skip = [os.path.normpath(p) for p in scope.skip]
        # Once per path of the trees: a set and one startswith over prefixes made once.
        self.skip = frozenset(skip)
        self.skip_below = tuple(p.rstrip("/") + "/" for p in skip)
        # Most paths are neither excluded nor preserved: one match says so for both.
        either = [p for p in (self.excluded.pattern, self.preserved.pattern) if p is not None]
        self.maybe_apart = (
            re.compile("|".join(f"(?:{p})" for p in either), re.DOTALL).fullmatch
            if either
            else None
        )
        self.hash_file = hash_file
        self.max_entries = max_entries
        self.virtual = virtual
        self.trees = scope.trees
        self.manifest = SystemManifest()

    def run(self) -> SystemManifest:
        for tree in self.trees:
            listed = time.time_ns()
            try:
                st = os.lstat(tree)
            except FileNotFoundError:
                self.manifest.missing.append(tree)
                continue
            except OSError as exc:
                self.manifest.entries[tree] = PathEntry(tree, "dir", 0, 0, 0, error=_reason(exc))
                continue
            self._tree(tree, st, listed)
        if self.emit is not None:
            self._emit()
        return self.manifest

    def _emit(self) -> None:
        assert self.emit is not None
        fresh, self.fresh = self.fresh, []
        self.part = min(self.part * 2, PART_MOST)
        self.emitted = time.monotonic()
        self.emit(self.manifest, fresh)

    def _tree(self, tree: str, st: os.stat_result, listed: int) -> None:
        # Each path with its lstat and when it was listed (for the hash cache's settling).
        pending: list[tuple[str, os.stat_result, int]] = [(tree, st, listed)]
        while pending:
            if self.fresh and (  # every entry recorded so far is final here
                len(self.fresh) >= self.part or time.monotonic() - self.emitted >= PART_SECONDS
            ):
                self._emit()
            path, st, listed = pending.pop()
            if not self._keep(path):
                continue
            entry = self._record(path, st, listed)
            if entry.kind != "dir" or entry.error:
                continue
            children: list[tuple[str, os.stat_result, int]] = []
            listed = time.time_ns()
            try:
                with os.scandir(path) as listing:
                    for child in listing:
                        try:
                            found = child.stat(follow_symlinks=False)
                            children.append((child.path, found, listed))
                        except FileNotFoundError:
                            continue  # gone since it was listed: as if never there
            except OSError as exc:
                error = f"cannot list: {_reason(exc)}"
                self.manifest.entries[path] = entry._replace(error=error)
                continue
            children.sort(reverse=True)  # by path: names are unique, nothing else compared
            pending.extend(children)

    def _keep(self, path: str) -> bool:
        if path in self.skip or path.startswith(self.skip_below) or path in self.virtual:
            self.manifest.skipped.append(path)
            return False
        if self.maybe_apart is None or self.maybe_apart(path.lstrip("/")) is None:
            return True
        if path in self.excluded:
            return False
        if path in self.preserved:
            self.manifest.preserved.append(path)
            return False
        return True

    def _record(self, path: str, st: os.stat_result, listed: int) -> PathEntry:
        if len(self.manifest.entries) >= self.max_entries:
            raise UsageError(
                f"the system trees ({', '.join(self.trees)}) hold more than "
                f"{self.max_entries} paths; exclude some in [system] exclude"
            )
        kind = _kind(st.st_mode)
        mode = stat.S_IMODE(st.st_mode)
        # Built whole (no dataclasses.replace): this runs once per path of the trees.
        try:
            if kind == "file":
                digest, size = self._file(path, st, listed)
                entry = PathEntry(path, kind, mode, st.st_uid, st.st_gid, size, digest=digest)
            elif kind == "symlink":
                entry = PathEntry(path, kind, mode, st.st_uid, st.st_gid, target=os.readlink(path))
            elif kind in ("char", "block"):
                entry = PathEntry(path, kind, mode, st.st_uid, st.st_gid, rdev=st.st_rdev)
            else:
                entry = PathEntry(path, kind, mode, st.st_uid, st.st_gid)
        except OSError as exc:
            entry = PathEntry(
                path, kind, mode, st.st_uid, st.st_gid, st.st_size, error=_reason(exc)
            )
        self.manifest.entries[path] = entry
        self.manifest.mtimes[path] = st.st_mtime_ns
        if self.emit is not None:
            self.fresh.append(path)
        return entry

    def _file(self, path: str, st: os.stat_result, listed: int) -> tuple[bytes, int]:
        cached = self.cache.lookup(path, st) if self.cache is not None else None
        if cached is not None:
            return cached, st.st_size
        if self.hash_wanted is not None and not self.hash_wanted(path, st.st_size):
            return b"", st.st_size
        digest, size = self.hash_file(path)
        if self.cache is None:
            return digest, size
        if size == st.st_size:  # read what was listed (a file still growing is not kept)
            self.cache.store(path, st, digest, listed)
        return digest, size


def build_manifest(
    scope: Scope,
    *,
    hash_file: HashFile = hash_file,
    max_entries: int = MAX_ENTRIES,
    virtual: frozenset[str] | None = None,
    cache: HashCache | None = None,
    hash_wanted: HashWanted | None = None,
    emit: Emit | None = None,
) -> SystemManifest:
    """Walk the trees of ``scope`` into a :class:`SystemManifest` (blocking).

    ``hash_file`` reads one regular file (the default reads it with BLAKE3; tests inject
    faults through it); ``virtual`` lists the mount points never walked (default: this
    mount namespace's virtual file systems). Raises :class:`UsageError` past
    ``max_entries`` paths. With a ``cache`` (:class:`~stead.system.hashcache.HashCache`),
    a file whose size, mtime, ctime, inode and device are those it was hashed with is not
    read again; the cache is saved with what this walk met. With ``hash_wanted``, a regular
    file it declines (by path and size) is not read: its entry has an empty digest, unless
    the cache held one. With ``emit``, the walk hands over its entries in parts as it goes
    (see :data:`Emit`): first :data:`PART_FIRST` paths, then twice as many each time up to
    :data:`PART_MOST`, or what it has after :data:`PART_SECONDS`; the last part at the end.
    """
    if virtual is None:
        virtual = virtual_mounts()
    walk = _Walk(scope, hash_file, max_entries, virtual, cache, hash_wanted, emit)
    manifest = walk.run()
    if cache is not None:
        cache.save()
    return manifest


def manifest_of_paths(
    scope: Scope,
    paths: Iterable[str],
    *,
    hash_file: HashFile = hash_file,
    cache: HashCache | None = None,
) -> SystemManifest:
    """The entries of just ``paths``, each recorded and hashed as a walk would (blocking).

    For paths a walk of ``scope`` listed a moment ago: a path outside the trees, left out by
    the scope, gone since, or reached through a symbolic link (a directory replaced by one)
    is missing from the result. The cache is consulted, not saved.
    """
    walk = _Walk(scope, hash_file, MAX_ENTRIES, virtual_mounts(), cache)
    # Each tree as named, and where it really is (a link above a tree is followed by the
    # walk too; one below it is not).
    trees = [(tree.rstrip("/"), os.path.realpath(tree)) for tree in scope.trees]
    for path in paths:
        if os.path.normpath(path) != path:
            continue
        parent = os.path.dirname(path)
        inside = [
            real + parent[len(tree) :]
            for tree, real in trees
            if path.startswith(tree + "/") and path != tree
        ]
        if not inside or os.path.realpath(parent) != inside[0] or not walk._keep(path):
            continue
        listed = time.time_ns()
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        walk._record(path, st, listed)
    return walk.manifest
