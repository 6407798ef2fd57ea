"""Swapping a staged copy of the system trees into place, and rolling it back.

A reclone never edits a system tree in place while it copies. It builds every new or
changed file in a staging area inside the tree (``<tree>/.stead-reclone/stage-<run>/``, on
the same mount, so that a rename moves it into place), verifies it, and only then swaps:

1. The plan (every operation, in order) is written to ``<state>/reclone/intent.json`` with
   phase ``swapping`` and made durable. Before that point the node is exactly as it was.
2. Each operation moves the path it replaces into the generation directory
   (``<tree>/.stead-reclone/gen-<run>/``) and renames the staged file over it.
3. Phase ``done``: the intent becomes the rollback generation (``generation.json``).

Every operation is idempotent given the state of the three names it touches (staged file,
destination, original in the generation), so a swap interrupted at any point (kill -9, power
loss) is rolled forward on the next start by :func:`recover`; an interrupted staging phase
is discarded instead. Never half of each.

Timing and atomicity duties:
- :meth:`Swapper.swap` is short (renames and metadata only, no data copied) and must not run
  while anything else writes the trees; the agent runs it in a worker thread.
- The intent is written with ``write_atomic`` and the trees are synced (``syncfs``) before the
  phase changes, so what the file says has happened has happened on disk.

Preserved paths never appear in a plan: the planner leaves them out.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from stead.errors import RecloneError
from stead.fsutil import load_syncfs, write_atomic

log = logging.getLogger(__name__)

AREA = ".stead-reclone"  # reserved name at the top of every system tree
INTENT = "intent.json"
GENERATION = "generation.json"

OpKind = Literal["dir", "file", "symlink", "delete", "meta"]


@dataclass(frozen=True, slots=True)
class Meta:
    mode: int
    uid: int
    gid: int
    mtime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Meta:
        return cls(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns)


@dataclass(slots=True)
class Op:
    """One change to one path of a tree.

    ``dir``: make a directory (replacing a non-directory), or with ``staged``, rename that
    staged directory (a new subtree, built whole) to ``path``; ``file`` / ``symlink``: rename
    the staged entry ``staged`` over ``path``; ``delete``: move ``path`` away; ``meta``: set
    owner, mode and mtime of an unchanged entry. ``saved`` is where the original goes in the
    generation; ``before`` its metadata, for rollback of ``meta``.
    """

    kind: OpKind
    tree: str
    path: str
    staged: str = ""
    saved: str = ""
    meta: Meta | None = None
    before: Meta | None = None
    existed: bool = False

    def to_json(self) -> list[Any]:
        """A flat list: a plan of 50,000 operations serialises in a fraction of a second."""
        meta = self.meta
        before = self.before
        return [
            self.kind,
            self.tree,
            self.path,
            self.staged,
            self.saved,
            None if meta is None else [meta.mode, meta.uid, meta.gid, meta.mtime_ns],
            None if before is None else [before.mode, before.uid, before.gid, before.mtime_ns],
            self.existed,
        ]

    @classmethod
    def from_json(cls, data: list[Any] | dict[str, Any]) -> Op:
        if isinstance(data, dict):  # written by an earlier version: one map per operation
            data = dict(data)
            for key in ("meta", "before"):
                if data.get(key) is not None:
                    data[key] = Meta(**data[key])
            return cls(**data)
        kind, tree, path, staged, saved, meta, before, existed = data
        return cls(
            kind,
            tree,
            path,
            staged,
            saved,
            None if meta is None else Meta(*meta),
            None if before is None else Meta(*before),
            bool(existed),
        )


@dataclass(slots=True)
class Plan:
    """What a swap does. ``dirs``: the directories of new subtrees, built whole in the
    staging area (parents first, with their metadata); each new subtree is one ``dir``
    operation whose ``staged`` directory is renamed into place."""

    run: str
    trees: list[str]
    ops: list[Op] = field(default_factory=list)
    delete_original: bool = False
    dirs: list[tuple[str, Meta]] = field(default_factory=list)

    def to_json(self, phase: str) -> dict[str, Any]:
        return {
            "run": self.run,
            "phase": phase,
            "trees": self.trees,
            "delete_original": self.delete_original,
            "ops": [op.to_json() for op in self.ops],
            "dirs": [[d, [m.mode, m.uid, m.gid, m.mtime_ns]] for d, m in self.dirs],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        return cls(
            run=str(data["run"]),
            trees=[str(t) for t in data["trees"]],
            ops=[Op.from_json(op) for op in data["ops"]],
            delete_original=bool(data.get("delete_original", False)),
            dirs=[(str(d), Meta(*m)) for d, m in data.get("dirs", [])],
        )


def area(tree: str) -> Path:
    return Path(tree) / AREA


def stage_dir(tree: str, run: str) -> Path:
    return area(tree) / f"stage-{run}"


def generation_dir(tree: str, run: str) -> Path:
    return area(tree) / f"gen-{run}"


def _lexists(path: str) -> bool:
    return os.path.lexists(path)


def _remove(path: str) -> None:
    """Remove whatever is at ``path`` (a directory with its contents)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def set_meta(path: str, meta: Meta, *, symlink: bool = False) -> None:
    os.chown(path, meta.uid, meta.gid, follow_symlinks=False)
    if not symlink:
        os.chmod(path, meta.mode)
    os.utime(path, ns=(meta.mtime_ns, meta.mtime_ns), follow_symlinks=False)


def set_meta_fd(fd: int, meta: Meta) -> None:
    """:func:`set_meta` of a file open as ``fd``, after its last write (the owner first:
    a change of owner clears the set-id bits the mode may hold)."""
    os.fchown(fd, meta.uid, meta.gid)
    os.fchmod(fd, meta.mode)
    os.utime(fd, ns=(meta.mtime_ns, meta.mtime_ns))


_SYNCFS = load_syncfs()


def seal_staged_dirs(plan: Plan) -> None:
    """Give the staged directories of new subtrees their metadata, children first (their
    own entries are complete: nothing is added to them before the swap renames them)."""
    for directory, meta in reversed(plan.dirs):
        set_meta(directory, meta)


def sync_paths(paths: Iterable[str]) -> None:
    """Make durable what was written under ``paths``: one ``syncfs`` per file system.

    ``paths`` name a directory on each file system touched (a swap renames within one file
    system, but a tree may hold mount points: meta operations reach them too).
    """
    if _SYNCFS is None:
        os.sync()
        return
    seen: set[int] = set()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            dev = os.fstat(fd).st_dev
            if dev in seen:
                continue
            seen.add(dev)
            if _SYNCFS(fd) != 0:
                code = ctypes.get_errno()
                raise OSError(code, f"syncfs {path}: {os.strerror(code)}")
        finally:
            os.close(fd)


class Swapper:
    """Carries out and undoes plans; keeps the intent and the generation under ``state``."""

    def __init__(self, state: Path) -> None:
        self.state = state

    @property
    def intent_path(self) -> Path:
        return self.state / INTENT

    @property
    def generation_path(self) -> Path:
        return self.state / GENERATION

    def _write(self, path: Path, data: dict[str, Any]) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(data).encode(), mode=0o600)

    # -- staging -------------------------------------------------------------------------

    def begin(self, plan: Plan) -> None:
        """Phase ``staging``: the staging areas may fill; the trees are untouched. A plan
        still being made (its manifest arrives in parts) may begin before it has any
        operation: staging is discarded on recovery whatever it holds."""
        self._write(self.intent_path, plan.to_json("staging"))
        for tree in plan.trees:
            stage_dir(tree, plan.run).mkdir(parents=True, exist_ok=True, mode=0o700)
            generation_dir(tree, plan.run).mkdir(parents=True, exist_ok=True, mode=0o700)
        self.make_dirs(plan.dirs)

    @staticmethod
    def make_dirs(dirs: Iterable[tuple[str, Meta]]) -> None:
        """The staged directories of new subtrees (parents first; all inside the staging
        area, made by :meth:`begin`); their metadata comes at the swap."""
        for directory, _meta in dirs:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, 0o700)

    def abandon(self, plan: Plan) -> None:
        """Give up before the swap: remove what was staged; the node stays as it was."""
        for tree in plan.trees:
            _remove(str(stage_dir(tree, plan.run)))
            gen = generation_dir(tree, plan.run)
            if gen.is_dir() and not any(gen.iterdir()):
                gen.rmdir()
        self.intent_path.unlink(missing_ok=True)

    # -- the swap ------------------------------------------------------------------------

    def swap(self, plan: Plan) -> None:
        """Phase ``swapping``, then ``done``: the staged copy is in place."""
        seal_staged_dirs(plan)
        # Staged data durable before the intent says it may be used (the fetcher started its
        # write-back as each file completed, so little is left to flush here).
        sync_paths(str(stage_dir(tree, plan.run)) for tree in plan.trees)
        self._write(self.intent_path, plan.to_json("swapping"))
        self._roll_forward(plan)

    def _roll_forward(self, plan: Plan) -> None:
        parents = Parents()
        for op in plan.ops:
            _forward(op, parents)
        for op in reversed(plan.ops):  # directories last and deepest first: children touch them
            if op.kind in ("dir", "meta") and op.meta is not None and os.path.isdir(op.path):
                set_meta(op.path, op.meta)
        sync_paths([*plan.trees, *parents.devices.values()])
        previous = self.generation()
        self._write(self.generation_path, plan.to_json("done"))
        self.intent_path.unlink(missing_ok=True)
        for tree in plan.trees:
            _remove(str(stage_dir(tree, plan.run)))
        if previous is not None and previous.run != plan.run:
            self._drop(previous, record=False)  # one rollback generation: the newest
        if plan.delete_original:
            self.delete_generation()

    # -- after a crash -------------------------------------------------------------------

    def recover(self) -> str:
        """On start: finish an interrupted swap or discard an interrupted staging."""
        try:
            data = json.loads(self.intent_path.read_text())
        except FileNotFoundError:
            return ""
        except (OSError, ValueError) as exc:
            raise RecloneError(f"reclone intent {self.intent_path} is unreadable: {exc}") from exc
        plan = Plan.from_json(data)
        if data.get("phase") == "swapping":
            log.warning("reclone %s was interrupted while swapping: finishing it", plan.run)
            self._roll_forward(plan)
            return f"reclone {plan.run}: interrupted swap finished"
        log.warning("reclone %s was interrupted while staging: discarding it", plan.run)
        self.abandon(plan)
        return f"reclone {plan.run}: interrupted before the swap, discarded"

    # -- the rollback generation -----------------------------------------------------------

    def generation(self) -> Plan | None:
        try:
            return Plan.from_json(json.loads(self.generation_path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RecloneError(f"reclone generation {self.generation_path}: {exc}") from exc

    def rollback(self) -> Plan:
        """Put the originals of the last reclone back; the generation is used up."""
        plan = self.generation()
        if plan is None:
            raise RecloneError("there is no reclone generation to roll back to")
        if plan.delete_original:
            raise RecloneError(f"the originals of reclone {plan.run} were deleted")
        for op in reversed(plan.ops):
            _backward(op)
        sync_paths([*plan.trees, *{os.path.dirname(op.path) for op in plan.ops}])
        self._drop(plan)
        return plan

    def delete_generation(self) -> None:
        plan = self.generation()
        if plan is None:
            return
        plan.delete_original = True
        for tree in plan.trees:
            _remove(str(generation_dir(tree, plan.run)))
        self._write(self.generation_path, plan.to_json("done"))

    def _drop(self, plan: Plan, *, record: bool = True) -> None:
        """Remove a generation's directories, and its record unless a newer one replaced it."""
        for tree in plan.trees:
            _remove(str(generation_dir(tree, plan.run)))
        if record:
            self.generation_path.unlink(missing_ok=True)


class Parents:
    """Directories found to be the tree's own during one pass over a plan.

    An operation may only rename in a directory reached from its tree without a symlink. A
    directory is checked once (one ``lstat``, its parent being checked the same way) instead
    of resolving every operation's whole path. Plans run parents first (:func:`plan_order`),
    so a directory's own operation comes before any check of its children; an operation
    that replaces or removes a path also drops it from what is known. The device of each
    directory is kept, for the final ``syncfs``.
    """

    __slots__ = ("devices", "verified")

    def __init__(self) -> None:
        self.verified: set[str] = set()
        self.devices: dict[int, str] = {}  # st_dev -> a directory on that file system

    def inside(self, op: Op) -> bool:
        """The directory ``op`` renames in is the tree's own, not a symlink's target."""
        if op.path == op.tree:
            return True
        if not op.path.startswith(op.tree.rstrip("/") + "/"):
            return False
        return self._dir_inside(os.path.dirname(op.path), op.tree)

    def _dir_inside(self, directory: str, tree: str) -> bool:
        if directory == tree or directory in self.verified:
            return True
        if not self._dir_inside(os.path.dirname(directory), tree):
            return False
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            return True  # nothing there to write through; the operation finds it missing
        if not stat.S_ISDIR(st.st_mode):  # lstat: a symlink to a directory is refused
            return False
        self.verified.add(directory)
        self.devices.setdefault(st.st_dev, directory)
        return True

    def changed(self, path: str) -> None:
        self.verified.discard(path)


def _parent_is_inside(op: Op) -> bool:
    """The directory an operation renames in must be the tree's own, not a symlink's target."""
    return Parents().inside(op)


def _forward(op: Op, parents: Parents | None = None) -> None:
    """One operation, safe to repeat after any interruption."""
    if parents is None:
        parents = Parents()
    if op.kind != "meta":
        parents.changed(op.path)
    if not parents.inside(op):
        # Never write through a symlink out of the tree; the rest of the swap goes on.
        log.error("reclone: %s not swapped: a directory on the way leaves %s", op.path, op.tree)
        return
    if op.kind == "meta":
        if op.meta is not None and _lexists(op.path):
            set_meta(op.path, op.meta, symlink=os.path.islink(op.path))
        return
    if op.kind == "delete":
        if _lexists(op.path) and not _lexists(op.saved):
            os.rename(op.path, op.saved)
        return
    if op.kind == "dir" and op.staged:  # a new subtree, built whole in the staging area
        if not _lexists(op.staged):
            return  # moved in before the interruption
        if _lexists(op.path) and not _lexists(op.saved):
            os.rename(op.path, op.saved)
        elif _lexists(op.path):
            _remove(op.path)
        os.rename(op.staged, op.path)
        return
    if op.kind == "dir":
        if os.path.isdir(op.path) and not os.path.islink(op.path):
            return
        if _lexists(op.path) and not _lexists(op.saved):
            os.rename(op.path, op.saved)
        os.mkdir(op.path, 0o700)  # its metadata is set once its children are in
        return
    # file or symlink: the staged entry is renamed over the destination
    if not _lexists(op.staged):
        return  # done before the interruption
    if _lexists(op.path) and not _lexists(op.saved):
        os.rename(op.path, op.saved)
    elif _lexists(op.path):
        _remove(op.path)  # a leftover of a half-done earlier attempt; the original is saved
    os.rename(op.staged, op.path)


def _backward(op: Op) -> None:
    """Undo one operation of a finished swap (run in reverse order: children first)."""
    if op.kind == "meta":
        if op.before is not None and _lexists(op.path):
            set_meta(op.path, op.before, symlink=os.path.islink(op.path))
        return
    if _lexists(op.saved):
        _remove(op.path)
        os.rename(op.saved, op.path)
    elif op.kind != "delete":
        _remove(op.path)  # the reclone created it


def plan_order(ops: Iterable[Op]) -> list[Op]:
    """Parents before children; a path's own operations in a stable order."""
    return sorted(ops, key=lambda op: (op.path.split("/"), op.kind != "dir"))
