"""The applier: journal entries become files on a passive, in order, durably, inside a root.

Every path is resolved with :mod:`stead.replication.pathsafe` (directory descriptors, no
symlink followed on the way); an entry that would touch anything outside its root is refused
with :class:`~stead.errors.UnsafePath`, reported through ``on_refused`` and skipped, so that one
bad entry from a peer neither escapes nor blocks the queue.

Atomicity. A ``FILE`` entry's parts are written into a staging file in
``<root>/.stead/staging`` (same file system as the root), whose name is a hash of the root key
and path, so that parts spanning batches, and parts replayed after a crash, continue the same
file. The part flagged ``last`` truncates it to ``size``, sets owner, mode and mtime (in that
order: ``chown`` clears set-id bits, and anything written after the mtime would change it), and
renames it over the target: a reader sees the old file or the new one, never a mix (Borg's
``SaveFile``). ``SYMLINK`` and ``LINK`` are made under a temporary name in the staging
directory and renamed into place the same way. ``DELTA`` writes in place, by design.

A whole file in one entry (every small file) is staged without a name instead
(``O_TMPFILE`` in the staging directory, held open from phase 1 to phase 2) and linked
straight to its path when nothing stands there: one directory operation instead of three
(a staging name created, looked up, moved). On the passive of 30,000 new 4 KiB files that
cut the applier's CPU by a quarter: directory lookups and inserts were most of its kernel
time. If something stands at the path, the file takes its staging name and replaces it as
above. A crash loses the unnamed files; the replay writes them again from the entries.
Where ``O_TMPFILE`` is missing, or an unnamed file cannot be named (no
``CAP_DAC_READ_SEARCH`` and no ``/proc``), found out once per root, files are staged by name.

Timing: group commit. One ``fsync`` per small file caps a disk at about 2,000 files/s, so a
batch is applied in segments of two phases: phase 1 writes the data of every ``FILE`` part of
the segment into staging files; one durability pass (``syncfs`` on each touched file system)
makes all of it durable; phase 2 applies the entries in order (renames, directories, deltas,
deletes). Before the caller is told a sequence number is applied, a second durability pass
makes the renames and directory entries durable too. ENOSPC or any I/O error raises
:class:`~stead.errors.ApplyError` (retryable) before that commit, and since every rename is
atomic no half-renamed file is left.

Replay. The caller stores the applied mark that ``commit(seq)`` hands it; after a crash the
receive queue is replayed from that mark, so every entry after it may be applied twice. All
entry kinds converge when replayed in order, except those that read *another* path's current
state: ``RENAME`` (replaying ``[delete B, rename A->B]`` would delete the renamed data) and
``LINK`` (replaying ``[link B->A, file A]`` would link B to the new A). A ``LINK`` is
therefore committed on its own: ``commit`` runs immediately before it (if anything is pending)
and immediately after it. A ``RENAME`` is committed before only when what came since the last
commit could collide with it in a replay, and whatever collides with a name it moved away
waits for a commit too (:mod:`~stead.replication.commit_order`); a replayed ``RENAME``
whose source is gone is a no-op. So a stream of atomic saves (write a temporary name, rename
it over the real one) shares group commits instead of costing two durability passes per save.

Two more duties make the rest idempotent:

* A placed file keeps a second name in staging (a hard link) until the commit that covers it,
  so that replaying its non-first parts finds the same data. ``first=True`` unlinks the
  staging name and starts a fresh file: it never truncates an inode that may already be live.
* Before phase 2 of every segment the applier writes the segment's last sequence number to
  ``<root>/.stead/applying`` (made durable by the phase-1 pass). :meth:`Applier.recover`
  reads it back: up to that number, an entry whose path has gone (``DELTA``, ``META``,
  ``LINK`` source, a non-directory on the way) is a replay of something a later entry already
  undid, and is skipped instead of raising :class:`~stead.errors.OutOfSync`.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import logging
import os
import shutil
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from stead.errors import ApplyError, OutOfSync, UnsafePath
from stead.fsutil import (
    WRITEBACK_FROM,
    DirectWriter,
    copy_range,
    load_syncfs,
    name_unnamed,
    open_unnamed,
    pwrite_all,
    start_writeback,
)
from stead.replication import quarantine
from stead.replication.apply_files import (
    TMP_PREFIX,
    apply_error,
    set_link_meta,
    set_meta_fd,
    staged_exists,
    staging_name,
    tmp_name,
    unlink_quiet,
    unnamed_cap,
    unnamed_works,
)
from stead.replication.commit_order import Record, segments
from stead.replication.entries import Entry, Op
from stead.replication.pathsafe import RootDir, lstat_at, open_child_dir, split_relative

log = logging.getLogger(__name__)

CommitFn = Callable[[int], None]
RefusedFn = Callable[[int, Entry, Exception], None]

STAGING_DIR = "staging"
INTENT_FILE = "applying"
DEFAULT_FILE_MODE = 0o644


@dataclass
class ApplierStats:
    files_written: int = 0  # FILE entries renamed into place
    bytes_written: int = 0  # FILE data and DELTA blocks
    entries_applied: int = 0
    refused: int = 0
    durability_passes: int = 0
    commits: int = 0


@dataclass
class _Root:
    key: str
    dir: RootDir
    staging_fd: int
    intent_fd: int
    dev: int
    unnamed: bool = True  # O_TMPFILE works here (set False on the first refusal)
    # Owner (uid, gid) a file made in staging gets, seen on the first: a file whose entry
    # names that owner needs no chown.
    born: tuple[int, int] | None = None


class Applier:
    """Applies entries to the local copies of the protected roots.

    ``roots`` maps an entry's ``root`` (the configured protected path, the same on every node)
    to the local directory that holds it. One applier per process, used from one thread.
    """

    def __init__(self, roots: Mapping[str, Path], staging_name: str = ".stead") -> None:
        if "/" in staging_name or staging_name in ("", ".", ".."):
            raise UnsafePath("staging name must be one component", path=staging_name)
        self._paths = {key: Path(path) for key, path in roots.items()}
        self._reserved = staging_name
        self._roots: dict[str, _Root] = {}
        self._syncfs = load_syncfs()
        self._replay_until = -1
        self._recovered = False
        # Staging names of placed files, by (root key, staging name) -> seq. They are unlinked
        # once a commit covers seq; until then a replay may need their data.
        self._finalized: dict[tuple[str, str], int] = {}
        self._returned_seq: int | None = None  # apply() without commit: stored by the caller
        self._dirty: set[str] = set()
        # Whole files staged without a name (O_TMPFILE), by seq -> open descriptor, from
        # phase 1 to their link in phase 2 of the same segment; at most _unnamed_cap open.
        self._unnamed: dict[int, int] = {}
        self._unnamed_cap = unnamed_cap()
        self._checked: set[int] = set()  # seqs of this segment phase 1 found safe
        # Staging names of multi-part files begun and not yet placed (and, after a start,
        # whatever staging held): a whole file of the same path must remove that name.
        self._partial: set[tuple[str, str]] = set()
        self._writer = DirectWriter()  # large file data bypasses the page cache
        self.stats = ApplierStats()
        # Set while this node, a former active, is repaired after a fork: every path about
        # to be replaced is kept first (see quarantine.py).
        self.quarantine: str | None = None
        self.quarantine_dir: Path | None = None

    # -- public ----------------------------------------------------------------------------

    def recover(self) -> int:
        """Prepare after a start: remove orphan temporary names, read the replay bound.

        Staging files are kept: a multi-part ``FILE`` may be in progress, and the rest of its
        parts will be replayed. Returns the highest sequence number whose phase 2 may have
        started before the last stop (-1 if none); entries up to it are treated as a replay.
        """
        self._finalized.clear()
        self._returned_seq = None
        bound = -1
        for key in self._paths:
            root = self._root(key)
            for name in os.listdir(root.staging_fd):
                if name.startswith(TMP_PREFIX):
                    os.unlink(name, dir_fd=root.staging_fd)
                else:
                    self._partial.add((key, name))
            raw = os.pread(root.intent_fd, 64, 0).strip()
            if raw.isdigit():
                bound = max(bound, int(raw))
        self._replay_until = bound
        self._recovered = True
        return bound

    def apply(
        self,
        records: Sequence[Record],
        commit: CommitFn | None = None,
        on_refused: RefusedFn | None = None,
    ) -> int:
        """Apply ``records`` (strictly increasing seq) in order; return the last seq.

        ``commit(seq)`` must make ``seq`` the durable applied mark before it returns; it is
        called at the end, immediately before and after each ``LINK``, and between entries
        that a replay could make undo each other (see :mod:`~stead.replication.commit_order`).
        Without ``commit``, the caller must store the returned seq before the next call (the
        applier then cleans up what that seq covers) and gives up replay safety for renames.
        ``on_refused(seq, entry, exc)`` receives every refused entry (:class:`UnsafePath`)
        and every entry skipped as :class:`OutOfSync` (the passive needs a check); without
        it they are raised. :class:`ApplyError` (retry later) propagates, with nothing past
        the last commit stored.
        An empty batch returns -1.
        """
        if not self._recovered:
            self.recover()
        if self._returned_seq is not None:
            self._cleanup(self._returned_seq)
            self._returned_seq = None
        seqs = [seq for seq, _ in records]
        if any(b <= a for a, b in itertools.pairwise(seqs)):
            raise ValueError("records must have strictly increasing sequence numbers")
        if not records:
            return -1
        pending: int | None = None
        try:
            for segment, before, after in segments(records):
                if before and pending is not None and commit is not None:
                    self._commit(pending, commit)
                    pending = None
                self._apply_segment(segment, on_refused)
                pending = segment[-1][0]
                if after and commit is not None:
                    self._commit(pending, commit)
                    pending = None
            if pending is not None:
                if commit is not None:
                    self._commit(pending, commit)
                else:
                    self._durable(set(self._dirty))
                    self._returned_seq = pending
        finally:
            for root in self._roots.values():
                root.dir.invalidate()
        return seqs[-1]

    def apply_batch(self, records: Sequence[Record]) -> int:
        """:meth:`apply` without a commit callback: the caller stores the returned seq."""
        return self.apply(records)

    def close(self) -> None:
        self._writer.close()
        for root in self._roots.values():
            for fd in (root.staging_fd, root.intent_fd):
                os.close(fd)
            root.dir.close()
        self._roots.clear()

    # -- segments --------------------------------------------------------------------------

    def _apply_segment(self, segment: list[Record], on_refused: RefusedFn | None) -> None:
        try:
            self._two_phases(segment, on_refused)
        finally:
            self._checked.clear()
            for fd in self._unnamed.values():  # refused or failed: never named
                os.close(fd)
            self._unnamed.clear()

    def _two_phases(self, segment: list[Record], on_refused: RefusedFn | None) -> None:
        touched = self._phase1(segment)
        last = segment[-1][0]
        for key in touched:
            os.pwrite(self._roots[key].intent_fd, f"{last:>20}\n".encode(), 0)
        if any(entry.op is Op.FILE for _, entry in segment):
            self._durable(touched)
        done = -1
        try:
            for seq, entry in segment:
                self._apply_one(seq, entry, on_refused)
                done = seq
        except BaseException:
            # What phase 2 did before the failure is on disk but not committed: retrying it
            # is a replay. The failing entry itself had no effect and stays strict.
            self._replay_until = max(self._replay_until, done)
            raise

    def _phase1(self, segment: list[Record]) -> set[str]:
        """Write every FILE part's data into its staging file; return the roots touched."""
        touched: set[str] = set()
        created: list[tuple[int, str]] = []
        checked = self._checked
        for seq, entry in segment:
            try:
                root = self._check(entry)
            except UnsafePath:
                continue  # refused, in order, by phase 2
            checked.add(seq)
            touched.add(root.key)
            if entry.op is not Op.FILE:
                continue
            try:
                fd = self._open_unnamed(seq, entry, root)
                named = fd is None
                if fd is None:
                    fd = self._open_staging(entry, root, created)
                    if fd is None:
                        continue  # phase 2 reports it in order
                try:
                    self._fill(fd, entry, None if named else root.born)
                finally:
                    if named:
                        os.close(fd)
            except OSError as exc:
                # Free what this segment took: a retry replays it from the last commit.
                for dir_fd, staged in created:
                    unlink_quiet(staged, dir_fd)
                raise apply_error(seq, entry, exc) from exc
            self.stats.bytes_written += len(entry.data)
        self._dirty |= touched
        return touched

    def _open_unnamed(self, seq: int, entry: Entry, root: _Root) -> int | None:
        """A whole file in one entry is staged without a name and linked straight into
        place in phase 2: one directory operation instead of three (a staging name made,
        looked up, moved). None where that does not apply: parts, linked files, too many
        open, or a file system without ``O_TMPFILE``."""
        if (
            not (entry.first and entry.last)
            or entry.linked
            or not root.unnamed
            or len(self._unnamed) >= self._unnamed_cap
        ):
            return None
        if self._partial:
            name = staging_name(entry)
            if (root.key, name) in self._partial:  # an unfinished earlier file: gone
                self._partial.discard((root.key, name))
                unlink_quiet(name, root.staging_fd)
        try:
            fd = open_unnamed(root.staging_fd)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
            log.info("no O_TMPFILE in %s (%s): whole files are staged by name", root.key, exc)
            root.unnamed = False
            return None
        self._unnamed[seq] = fd
        if root.born is None:
            st = os.fstat(fd)
            root.born = (st.st_uid, st.st_gid)
        return fd

    def _open_staging(
        self, entry: Entry, root: _Root, created: list[tuple[int, str]]
    ) -> int | None:
        """The staging file of ``entry``'s path, opened for its part (created on ``first``);
        None if a later part finds none."""
        name = staging_name(entry)
        if entry.first:
            self._finalized.pop((root.key, name), None)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
            try:
                fd = os.open(name, flags, 0o600, dir_fd=root.staging_fd)
            except FileExistsError:  # a replay's, or a finished file's link: anew
                unlink_quiet(name, root.staging_fd)
                fd = os.open(name, flags, 0o600, dir_fd=root.staging_fd)
            created.append((root.staging_fd, name))
            if not entry.last:
                self._partial.add((root.key, name))
            return fd
        try:
            return os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=root.staging_fd)
        except FileNotFoundError:
            return None

    def _fill(self, fd: int, entry: Entry, born: tuple[int, int] | None = None) -> None:
        """Write one part's data; a whole file gets its size and metadata too (``born``:
        the owner the file was made with, when known)."""
        self._writer.pwrite(fd, entry.data, entry.offset)
        if entry.first and entry.last:
            # A whole file in one entry: finish it here, while it is open, so that phase 2
            # only puts it into place. Created empty: written whole, it has its size
            # already (a trailing hole needs a truncate).
            if entry.offset + len(entry.data) != entry.size:
                os.ftruncate(fd, entry.size)
            set_meta_fd(fd, entry, DEFAULT_FILE_MODE, born)
        if self._syncfs is None:
            os.fsync(fd)
        elif len(entry.data) >= WRITEBACK_FROM:
            # The disk starts on it now; the batch's syncfs finds less to do. Small parts
            # are left to that syncfs, in one sweep: starting each alone cost about 100 us
            # of a 4 KiB file's 200.
            start_writeback(fd, entry.offset, len(entry.data))

    def _commit(self, seq: int, commit: CommitFn) -> None:
        self._durable(set(self._dirty))
        commit(seq)
        self.stats.commits += 1
        self._cleanup(seq)

    def _cleanup(self, committed: int) -> None:
        if committed >= self._replay_until:
            self._replay_until = -1
        for (key, name), seq in list(self._finalized.items()):
            if seq <= committed:
                del self._finalized[(key, name)]
                unlink_quiet(name, self._roots[key].staging_fd)

    def _durable(self, keys: set[str]) -> None:
        """One durability pass: ``syncfs`` once per file system among ``keys``."""
        if not keys:
            return
        seen: set[int] = set()
        try:
            if self._syncfs is None:
                os.sync()
            else:
                for key in sorted(keys):
                    root = self._roots[key]
                    if root.dev in seen:
                        continue
                    seen.add(root.dev)
                    if self._syncfs(root.dir.fd) != 0:
                        code = ctypes.get_errno()
                        raise OSError(code, os.strerror(code))
        except OSError as exc:
            raise ApplyError(f"durability pass failed: {exc}", seq="(batch)") from exc
        self._dirty -= keys
        self.stats.durability_passes += 1

    # -- one entry -------------------------------------------------------------------------

    def _apply_one(self, seq: int, entry: Entry, on_refused: RefusedFn | None) -> None:
        try:
            # Checked in phase 1 already (its paths do not change in between).
            root = self._roots[entry.root] if seq in self._checked else self._check(entry)
            root.dir.trim()
            if self.quarantine and self.quarantine_dir is not None:
                self._keep(entry, root)
            handler = self._handlers[entry.op]
            handler(self, seq, entry, root)
        except UnsafePath as exc:
            if exc.symlink and seq <= self._replay_until:
                # The original run found a directory here; a later entry of the replayed
                # window put a symlink in its place. Nothing is followed, nothing is done.
                log.info("replay: skipping entry %d (%s %r): %s", seq, entry.op, entry.path, exc)
                return
            self.stats.refused += 1
            log.warning("refused entry %d (%s in %r): %s", seq, entry.op, entry.root, exc)
            if entry.op is Op.FILE and entry.last and entry.root in self._roots:
                unlink_quiet(staging_name(entry), self._roots[entry.root].staging_fd)
            if on_refused is None:
                raise
            on_refused(seq, entry, exc)
            return
        except (FileNotFoundError, NotADirectoryError) as exc:
            try:
                self._missing(seq, entry, str(exc))
            except OutOfSync as missing:
                if on_refused is None:
                    raise
                on_refused(seq, entry, missing)
                return
        except OutOfSync as exc:
            # The passive is not what the active assumed. With ``on_refused`` the entry is
            # skipped and reported (the agent asks for a check); without, it is raised.
            if on_refused is None:
                raise
            on_refused(seq, entry, exc)
            return
        except OSError as exc:
            raise apply_error(seq, entry, exc) from exc
        self.stats.entries_applied += 1

    def _keep(self, entry: Entry, root: _Root) -> None:
        assert self.quarantine is not None and self.quarantine_dir is not None
        if entry.op is Op.META:
            return
        # A rename replaces its target; everything else replaces (or removes) its path.
        for path in [entry.target] if entry.op is Op.RENAME else [entry.path]:
            try:
                parent_fd, name = root.dir.open_parent(path)
            except (FileNotFoundError, NotADirectoryError):
                continue
            quarantine.keep(
                self.quarantine_dir,
                self.quarantine,
                root.key,
                path,
                parent_fd,
                name,
                f"{entry.op.name.lower()} after the fork",
            )

    def _check(self, entry: Entry) -> _Root:
        """Refuse an entry whose root is unknown or whose paths are unsafe or reserved."""
        if entry.root not in self._paths:
            raise UnsafePath(f"root {entry.root!r} is not protected here", path=entry.path)
        paths = [entry.path]
        if entry.op in (Op.RENAME, Op.LINK):
            paths.append(entry.target)
        for path in paths:
            if split_relative(path)[0] == self._reserved:
                raise UnsafePath(f"{self._reserved!r} is reserved for Stead", path=path)
        return self._root(entry.root)

    def _missing(self, seq: int, entry: Entry, why: str) -> None:
        if seq <= self._replay_until:
            log.info("replay: skipping entry %d (%s %r): %s", seq, entry.op, entry.path, why)
            return
        raise OutOfSync(f"entry {seq} ({entry.op} {entry.path!r} in {entry.root!r}): {why}")

    def _file(self, seq: int, entry: Entry, root: _Root) -> None:
        if entry.first and entry.last:
            self._whole_file(seq, entry, root)
            return
        if not entry.last:
            if not staged_exists(entry, root.staging_fd):
                raise OutOfSync(f"entry {seq}: no staging file for part of {entry.path!r}")
            return
        name = staging_name(entry)
        try:
            fd = os.open(name, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=root.staging_fd)
        except FileNotFoundError:
            # Never replay-tolerant: without the earlier parts the file would be wrong.
            raise OutOfSync(f"entry {seq}: no staging file for {entry.path!r}") from None
        try:
            os.ftruncate(fd, entry.size)  # only shortens or extends: holes stay holes
            set_meta_fd(fd, entry, DEFAULT_FILE_MODE)
            staged = os.fstat(fd)
        finally:
            os.close(fd)
        parent_fd, final = root.dir.open_parent(entry.path, create_missing=True)
        current = lstat_at(parent_fd, final)
        if current is not None and os.path.samestat(current, staged):
            pass  # a replay: this very file is already in place
        elif self._into_linked(entry, root, name, parent_fd, final, current):
            pass  # the staging file stays until the commit: a replay copies it again
        else:
            self._clear_dir(root, parent_fd, final, entry.path, current)
            tmp = tmp_name()
            os.link(name, tmp, src_dir_fd=root.staging_fd, dst_dir_fd=root.staging_fd)
            os.rename(tmp, final, src_dir_fd=root.staging_fd, dst_dir_fd=parent_fd)
        self._finalized[(root.key, name)] = seq
        self._partial.discard((root.key, name))
        self.stats.files_written += 1

    def _whole_file(self, seq: int, entry: Entry, root: _Root) -> None:
        """A file whose data travelled in this one entry: rename its staging file in.

        No staging link is kept for replay: replaying the entry writes the staging file
        again from the entry's own data (phase 1), so the rename is safe to repeat.
        """
        unnamed = self._unnamed.pop(seq, None)
        try:
            parent_fd, final = root.dir.open_parent(entry.path, create_missing=True)
            if unnamed is not None:
                try:
                    name_unnamed(unnamed, parent_fd, final)  # nothing there: done
                    self.stats.files_written += 1
                    return
                except FileExistsError:
                    pass
                # Something stands there: the file takes its staging name and replaces it
                # below as a staged file would (atomically, a directory cleared first).
                name = staging_name(entry)
                unlink_quiet(name, root.staging_fd)
                name_unnamed(unnamed, root.staging_fd, name)
        finally:
            if unnamed is not None:
                os.close(unnamed)
        name = staging_name(entry)
        if entry.linked and self._into_linked(
            entry, root, name, parent_fd, final, lstat_at(parent_fd, final)
        ):
            unlink_quiet(name, root.staging_fd)
            self.stats.files_written += 1
            return
        try:
            try:
                # Over nothing or over a non-directory (replaced atomically): done at once.
                os.rename(name, final, src_dir_fd=root.staging_fd, dst_dir_fd=parent_fd)
            except OSError as exc:
                if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
                    raise
                # A directory stands there: it goes first (never followed if a symlink).
                self._clear_dir(root, parent_fd, final, entry.path, lstat_at(parent_fd, final))
                os.rename(name, final, src_dir_fd=root.staging_fd, dst_dir_fd=parent_fd)
        except FileNotFoundError:
            raise OutOfSync(f"entry {seq}: no staging file for {entry.path!r}") from None
        self.stats.files_written += 1

    def _into_linked(
        self,
        entry: Entry,
        root: _Root,
        name: str,
        parent_fd: int,
        final: str,
        current: os.stat_result | None,
    ) -> bool:
        """Copy a staged file into the inode at ``final`` when both sides hold it under
        further names (``entry.linked``): renaming over one name would split the inode.

        In place, like a ``DELTA``: a reader may see the change half made. Returns False
        (nothing done) when the passive's file is not a regular file with further names.
        """
        if (
            not entry.linked
            or current is None
            or not stat.S_ISREG(current.st_mode)
            or current.st_nlink < 2
        ):
            return False
        src = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW, dir_fd=root.staging_fd)
        try:
            flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
            dst = os.open(final, flags, dir_fd=parent_fd)
            try:
                copy_range(src, dst, entry.size)
                os.ftruncate(dst, entry.size)
                set_meta_fd(dst, entry, None)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        self._dirty.add(root.key)
        self.stats.bytes_written += entry.size
        return True

    def _delta(self, seq: int, entry: Entry, root: _Root) -> None:
        parent_fd, name = root.dir.open_parent(entry.path)
        flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(name, flags, dir_fd=parent_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
                return self._missing(seq, entry, "not a regular file here")
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return self._missing(seq, entry, "not a regular file here")
            for offset, block in entry.blocks:
                pwrite_all(fd, block, offset)
                self.stats.bytes_written += len(block)
            os.ftruncate(fd, entry.size)
            set_meta_fd(fd, entry, None)
        finally:
            os.close(fd)
        self._dirty.add(root.key)

    def _mkdir(self, seq: int, entry: Entry, root: _Root) -> None:
        parent_fd, name = root.dir.open_parent(entry.path, create_missing=True)
        current = lstat_at(parent_fd, name)
        if current is not None and not stat.S_ISDIR(current.st_mode):
            os.unlink(name, dir_fd=parent_fd)  # the active says it is a directory now
            current = None
        if current is None:
            os.mkdir(name, 0o700, dir_fd=parent_fd)  # opened up below, once owned right
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent_fd)
        try:
            set_meta_fd(fd, entry, 0o755 if current is None else None)
        finally:
            os.close(fd)

    def _symlink(self, seq: int, entry: Entry, root: _Root) -> None:
        if not entry.target or "\x00" in entry.target:
            raise UnsafePath("symlink target is empty or holds NUL", path=entry.path)
        parent_fd, name = root.dir.open_parent(entry.path, create_missing=True)
        current = lstat_at(parent_fd, name)
        if (
            current is not None
            and stat.S_ISLNK(current.st_mode)
            and os.readlink(name, dir_fd=parent_fd) == entry.target
        ):
            set_link_meta(name, parent_fd, entry)
            return
        tmp = tmp_name()
        os.symlink(entry.target, tmp, dir_fd=root.staging_fd)
        set_link_meta(tmp, root.staging_fd, entry)
        self._clear_dir(root, parent_fd, name, entry.path, current)
        os.rename(tmp, name, src_dir_fd=root.staging_fd, dst_dir_fd=parent_fd)

    def _link(self, seq: int, entry: Entry, root: _Root) -> None:
        src_fd, src_name = root.dir.open_parent(entry.target)
        source = lstat_at(src_fd, src_name)
        if source is None:
            return self._missing(seq, entry, f"link source {entry.target!r} is missing")
        if stat.S_ISDIR(source.st_mode):
            raise OutOfSync(f"entry {seq}: link source {entry.target!r} is a directory")
        parent_fd, name = root.dir.open_parent(entry.path, create_missing=True)
        current = lstat_at(parent_fd, name)
        if current is not None and os.path.samestat(current, source):
            return
        tmp = tmp_name()
        os.link(src_name, tmp, src_dir_fd=src_fd, dst_dir_fd=root.staging_fd, follow_symlinks=False)
        self._clear_dir(root, parent_fd, name, entry.path, current)
        os.rename(tmp, name, src_dir_fd=root.staging_fd, dst_dir_fd=parent_fd)

    def _delete(self, seq: int, entry: Entry, root: _Root) -> None:
        try:
            parent_fd, name = root.dir.open_parent(entry.path)
        except (FileNotFoundError, NotADirectoryError):
            return  # already gone: deleting is idempotent
        current = lstat_at(parent_fd, name)
        if current is None:
            return
        if not self._clear_dir(root, parent_fd, name, entry.path, current):
            unlink_quiet(name, parent_fd)

    def _rename(self, seq: int, entry: Entry, root: _Root) -> None:
        try:
            src_fd, src_name = root.dir.open_parent(entry.path)
        except (FileNotFoundError, NotADirectoryError):
            return  # source gone: a replay, or a later entry will re-send it
        source = lstat_at(src_fd, src_name)
        if source is None:
            return
        if entry.path.startswith(entry.target + "/") or entry.target.startswith(entry.path + "/"):
            raise OutOfSync(f"entry {seq}: cannot rename {entry.path!r} to {entry.target!r}")
        dst_fd, dst_name = root.dir.open_parent(entry.target, create_missing=True)
        current = lstat_at(dst_fd, dst_name)
        if current is not None and not os.path.samestat(current, source):
            if stat.S_ISDIR(current.st_mode):
                self._clear_dir(root, dst_fd, dst_name, entry.target, current)
            elif stat.S_ISDIR(source.st_mode):
                os.unlink(dst_name, dir_fd=dst_fd)
        os.rename(src_name, dst_name, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
        if stat.S_ISDIR(source.st_mode):
            root.dir.invalidate(under=entry.path)
            root.dir.invalidate(under=entry.target)

    def _meta(self, seq: int, entry: Entry, root: _Root) -> None:
        parent_fd, name = root.dir.open_parent(entry.path)
        current = lstat_at(parent_fd, name)
        if current is None:
            return self._missing(seq, entry, "path is missing")
        if stat.S_ISLNK(current.st_mode):
            set_link_meta(name, parent_fd, entry)
            return
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=parent_fd)
        try:
            set_meta_fd(fd, entry, None)
        finally:
            os.close(fd)

    _handlers: ClassVar[dict[Op, Callable[[Applier, int, Entry, _Root], None]]] = {
        Op.FILE: _file,
        Op.DELTA: _delta,
        Op.MKDIR: _mkdir,
        Op.SYMLINK: _symlink,
        Op.LINK: _link,
        Op.DELETE: _delete,
        Op.RENAME: _rename,
        Op.META: _meta,
    }

    # -- helpers ---------------------------------------------------------------------------

    def _clear_dir(
        self, root: _Root, parent_fd: int, name: str, relpath: str, current: os.stat_result | None
    ) -> bool:
        """Remove the directory tree at ``name`` if there is one; never follow a symlink."""
        if current is None or not stat.S_ISDIR(current.st_mode):
            return False
        # rmtree with dir_fd walks by descriptors and checks each directory it enters is the
        # one it examined, so a symlink planted inside the tree is unlinked, not followed.
        shutil.rmtree(name, dir_fd=parent_fd)
        root.dir.invalidate(under=relpath)
        return True

    def _root(self, key: str) -> _Root:
        root = self._roots.get(key)
        if root is not None:
            return root
        rootdir = RootDir(self._paths[key])
        try:
            stead_fd = open_child_dir(rootdir.fd, self._reserved, self._reserved, True)
            try:
                os.fchmod(stead_fd, 0o700)
                staging_fd = open_child_dir(stead_fd, STAGING_DIR, self._reserved, True)
                intent_fd = os.open(
                    INTENT_FILE,
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=stead_fd,
                )
            finally:
                os.close(stead_fd)
        except BaseException:
            rootdir.close()
            raise
        root = _Root(key, rootdir, staging_fd, intent_fd, os.fstat(rootdir.fd).st_dev)
        root.unnamed = unnamed_works(key, staging_fd)
        self._roots[key] = root
        return root
