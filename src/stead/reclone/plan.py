"""From two manifests of the reclone scope to the list of what to fetch and what to swap.

The active's manifest says what each system tree must hold; the passive's says what it
holds. The plan makes the passive's trees equal to the active's except for preserved paths,
which it never touches: not their content, not by deleting or replacing a directory that
holds one. Paths are absolute; every one must lie strictly inside a configured tree, be
normalised, and stay out of the reclone area, or the whole plan is refused (a manifest
comes from a peer: it is external input).
"""

from __future__ import annotations

import posixpath
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from stead.errors import RecloneError
from stead.reclone.swap import AREA, Meta, Op, Plan, generation_dir, plan_order, stage_dir

Kind = Literal["file", "dir", "symlink", "other"]


class Item(NamedTuple):
    """One entry of a manifest: what the planner needs to know about a path (a named
    tuple, as cheap to build as a tuple: a manifest holds one per path of the scope)."""

    kind: Kind
    mode: int
    uid: int
    gid: int
    size: int = 0
    mtime_ns: int = 0
    digest: str = ""  # content hash of a regular file
    target: str = ""  # of a symlink

    @property
    def meta(self) -> Meta:
        return Meta(self.mode, self.uid, self.gid, self.mtime_ns)

    def to_wire(self) -> list[Any]:
        return [self.kind, self.mode, self.uid, self.gid, self.size, self.mtime_ns,
                self.digest, self.target]  # fmt: skip

    @classmethod
    def from_wire(cls, wire: Any) -> Item:
        try:
            kind, mode, uid, gid, size, mtime_ns, digest, target = wire
        except (TypeError, ValueError):
            raise RecloneError(f"malformed manifest entry {wire!r}") from None
        if kind not in ("file", "dir", "symlink", "other"):
            raise RecloneError(f"manifest entry of unknown kind {kind!r}")
        numbers = (mode, uid, gid, size, mtime_ns)
        if not all(isinstance(n, int) and n >= 0 for n in numbers) or mode > 0o7777:
            raise RecloneError(f"malformed manifest entry {wire!r}")
        if not isinstance(digest, str) or not isinstance(target, str):
            raise RecloneError(f"malformed manifest entry {wire!r}")
        return cls(kind, mode, uid, gid, size, mtime_ns, digest, target)


class Fetch(NamedTuple):
    """A file to copy from the active into the staging area (or a symlink to make there)."""

    path: str
    staged: str
    item: Item


@dataclass(slots=True)
class Work:
    plan: Plan
    fetch: list[Fetch] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # special files, preserved conflicts
    created_inside: int = 0  # paths created inside new subtrees (no operation of their own)

    @property
    def fetch_bytes(self) -> int:
        return sum(f.item.size for f in self.fetch if f.item.kind == "file")

    def summary(self) -> dict[str, int]:
        kinds = [op.kind for op in self.plan.ops]
        return {
            "fetch_files": sum(1 for f in self.fetch if f.item.kind == "file"),
            "fetch_bytes": self.fetch_bytes,
            "replace": sum(
                1 for op in self.plan.ops if op.existed and op.kind in ("file", "symlink", "dir")
            ),
            "create": sum(1 for op in self.plan.ops if not op.existed and op.kind != "meta")
            + self.created_inside,
            "delete": kinds.count("delete"),
            "meta": kinds.count("meta"),
            "skipped": len(self.skipped),
        }


def tree_of(path: str, trees: list[str]) -> str:
    """The configured tree that holds ``path`` (refused unless it is safely inside one)."""
    if not _normalised(path):
        raise RecloneError(f"manifest path {path!r} is not a normalised absolute path")
    for tree in trees:
        if path == tree or path.startswith(tree + "/"):
            rest = path[len(tree) + 1 :]
            if rest.split("/", 1)[0] == AREA:
                raise RecloneError(f"manifest path {path!r} lies in the reclone area")
            return tree
    raise RecloneError(f"manifest path {path!r} lies outside the system trees")


def _normalised(path: str) -> bool:
    """An absolute path without NUL, empty, ``.`` or ``..`` components or a trailing ``/``
    (what ``posixpath.normpath`` leaves unchanged, less a leading ``//``), in a few
    substring tests: this runs for every path of two manifests."""
    if not path.startswith("/") or "\0" in path:
        return False
    if path == "/":
        return True
    return not (
        "//" in path or "/./" in path or "/../" in path or path.endswith(("/", "/.", "/.."))
    )


def _ancestors(path: str) -> list[str]:
    out: list[str] = []
    while True:
        parent = posixpath.dirname(path)
        if parent == path:
            return out
        out.append(parent)
        path = parent


def _differs(a: Item, b: Item) -> bool:
    return (a.mode, a.uid, a.gid, a.mtime_ns) != (b.mode, b.uid, b.gid, b.mtime_ns)


def make_plan(
    run: str,
    trees: list[str],
    source: Mapping[str, Item],
    here: Mapping[str, Item],
    preserved: Container[str],
    *,
    delete_original: bool = False,
    held: Iterable[str] = (),
) -> Work:
    """What makes ``here`` equal to ``source`` in ``trees``, leaving preserved paths alone."""
    planner = Planner(run, trees, here, preserved, delete_original=delete_original, held=held)
    planner.add(source)
    planner.finish()
    return planner.work


class Planner:
    """:func:`make_plan` for a manifest that arrives in parts (the active streams it while
    it walks): each part is planned as it comes, so that its files can be copied while the
    rest is still being walked; :meth:`finish` adds the deletions once all has come.

    A path is planned once its parent has been (the active walks parents first); one that
    comes before its parent, or whose parent never comes, waits for :meth:`finish`. A
    path sent twice refuses the whole plan: a manifest is external input.
    """

    def __init__(
        self,
        run: str,
        trees: list[str],
        here: Mapping[str, Item],
        preserved: Container[str],
        *,
        delete_original: bool = False,
        held: Iterable[str] = (),
    ) -> None:
        self.trees = list(trees)
        self.roots = frozenset(self.trees)
        self.here = {p: i for p, i in here.items() if _inside(p, self.trees)}
        self.preserved = preserved
        # Tree of a path already checked by tree_of: its prefix is enough.
        self._prefixes = [(t.rstrip("/") + "/", t) for t in self.trees]
        self.work = Work(Plan(run=run, trees=list(trees), delete_original=delete_original))
        self.counters = dict.fromkeys(self.trees, 0)
        # Per tree, once: names are made for every path of the scope.
        self.dirs = {t: (str(stage_dir(t, run)), str(generation_dir(t, run))) for t in trees}
        # Ancestors of preserved paths here: never replaced, never deleted. A walk sets
        # preserved paths apart (``held``: they have no item in ``here``).
        found = [p for p in self.here if p in preserved]
        self.preserved_here = frozenset(found)  # asked again for each path that came
        self.kept = {a for p in [*found, *held] for a in _ancestors(p)}
        self.moved: set[str] = set()  # paths whose whole subtree the swap moves away
        self.ops: list[Op] = []
        # Directories new here are built whole in the staging area, under their real names,
        # and the swap renames each new subtree's top into place: one operation, not one
        # per path. Path of each directory staged so -> its staged name.
        self.staged_dirs: dict[str, str] = {}
        self.source: dict[str, Item] = {}
        self.waiting: dict[str, Item] = {}
        self.finished = False

    def add(self, part: Mapping[str, Item]) -> tuple[list[Fetch], list[tuple[str, Meta]]]:
        """Plan a part of the active's manifest; returns what it adds to fetch and the
        staged directories to make before those files are fetched (parents first)."""
        if self.finished:
            raise RecloneError("the active sent more of its manifest after its end")
        for path in part:
            tree_of(path, self.trees)
            if path in self.source:
                raise RecloneError(f"the active's manifest lists {path!r} twice")
        self.source.update(part)
        fetched, made = len(self.work.fetch), len(self.work.plan.dirs)
        for path in sorted(part):
            parent = posixpath.dirname(path)
            if path not in self.roots and (parent not in self.source or parent in self.waiting):
                self.waiting[path] = part[path]
                continue
            self._plan(path, part[path])
        return self.work.fetch[fetched:], self.work.plan.dirs[made:]

    def finish(self) -> tuple[list[Fetch], list[tuple[str, Meta]]]:
        """The paths that waited for their parents, then the deletions and the order of the
        swap; returns what the waiting paths add to fetch and the directories to make."""
        fetched, made = len(self.work.fetch), len(self.work.plan.dirs)
        self.finished = True
        waiting, self.waiting = self.waiting, {}
        for path in sorted(waiting):
            self._plan(path, waiting[path])
        for path in sorted(self.here):
            if path in self.source or path in self.preserved_here or path in self.kept:
                continue
            if any(a in self.moved for a in _ancestors(path)):
                continue
            tree = tree_of(path, self.trees)
            _, saved = self._names(tree)
            before = self.here[path].meta
            self.ops.append(Op("delete", tree, path, saved=saved, before=before, existed=True))
            self.moved.add(path)
        self.work.plan.ops = plan_order(self.ops)
        return self.work.fetch[fetched:], self.work.plan.dirs[made:]

    def _names(self, tree: str) -> tuple[str, str]:
        self.counters[tree] += 1
        stage, generation = self.dirs[tree]
        n = f"{self.counters[tree]:08d}"
        return f"{stage}/{n}", f"{generation}/{n}"

    def _tree(self, path: str) -> str:
        """The tree of a path ``add`` checked with :func:`tree_of`."""
        for prefix, tree in self._prefixes:
            if path == tree or path.startswith(prefix):
                return tree
        return tree_of(path, self.trees)  # raises

    def _is_preserved(self, path: str) -> bool:
        if path in self.here:
            return path in self.preserved_here
        return path in self.preserved

    def _plan(self, path: str, new: Item) -> None:
        work, ops = self.work, self.ops
        if self._is_preserved(path):
            return
        parent = posixpath.dirname(path)
        if parent in self.staged_dirs:
            _stage_inside(work, path, new, self.staged_dirs)
            return
        old = self.here.get(path)
        tree = self._tree(path)
        if new.kind == "other":
            work.skipped.append(f"{path}: special file, not copied")
            return
        replaces = old is not None and old.kind != new.kind
        if replaces and path in self.kept:
            work.skipped.append(f"{path}: holds a preserved path here; not replaced")
            return
        if new.kind == "dir":
            if old is None and path != tree:
                staged, saved = self._names(tree)
                ops.append(Op("dir", tree, path, staged, saved, new.meta))
                self.staged_dirs[path] = staged
                work.plan.dirs.append((staged, new.meta))
                return
            if old is None or old.kind != "dir":
                _, saved = self._names(tree)
                ops.append(Op("dir", tree, path, saved=saved, meta=new.meta, existed=replaces))
                if replaces:
                    self.moved.add(path)
            elif _differs(new, old):
                ops.append(Op("meta", tree, path, meta=new.meta, before=old.meta, existed=True))
            return
        same = old is not None and old.kind == new.kind
        if new.kind == "file":
            same = same and old is not None and old.digest == new.digest and bool(new.digest)
        else:
            same = same and old is not None and old.target == new.target
        if same:
            assert old is not None
            if new.kind == "symlink":
                differs = (new.uid, new.gid) != (old.uid, old.gid)
            else:
                differs = _differs(new, old)
            if differs:
                ops.append(Op("meta", tree, path, meta=new.meta, before=old.meta, existed=True))
            return
        staged, saved = self._names(tree)
        work.fetch.append(Fetch(path, staged, new))
        ops.append(Op(new.kind, tree, path, staged, saved, new.meta, existed=old is not None))
        if old is not None and old.kind == "dir":
            self.moved.add(path)


def _stage_inside(work: Work, path: str, new: Item, staged_dirs: dict[str, str]) -> None:
    """A path under a directory built whole in staging: staged under its own name there."""
    parent = posixpath.dirname(path)
    staged = f"{staged_dirs[parent]}/{posixpath.basename(path)}"
    if new.kind == "other":
        work.skipped.append(f"{path}: special file, not copied")
        return
    work.created_inside += 1
    if new.kind == "dir":
        staged_dirs[path] = staged
        work.plan.dirs.append((staged, new.meta))
    else:
        work.fetch.append(Fetch(path, staged, new))


def _inside(path: str, trees: list[str]) -> bool:
    try:
        tree_of(path, trees)
    except RecloneError:
        return False
    return True
