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
from collections.abc import Container, Mapping
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
    if not path.startswith("/") or posixpath.normpath(path) != path or "\0" in path:
        raise RecloneError(f"manifest path {path!r} is not a normalised absolute path")
    for tree in trees:
        if path == tree or path.startswith(tree + "/"):
            rest = path[len(tree) + 1 :]
            if rest.split("/", 1)[0] == AREA:
                raise RecloneError(f"manifest path {path!r} lies in the reclone area")
            return tree
    raise RecloneError(f"manifest path {path!r} lies outside the system trees")


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
) -> Work:
    """What makes ``here`` equal to ``source`` in ``trees``, leaving preserved paths alone."""
    for path in source:
        tree_of(path, trees)
    here = {p: i for p, i in here.items() if _inside(p, trees)}
    work = Work(Plan(run=run, trees=list(trees), delete_original=delete_original))
    counters = dict.fromkeys(trees, 0)
    # Per tree, once: this runs for every path of the scope.
    dirs = {tree: (str(stage_dir(tree, run)), str(generation_dir(tree, run))) for tree in trees}

    def names(tree: str) -> tuple[str, str]:
        counters[tree] += 1
        stage, generation = dirs[tree]
        n = f"{counters[tree]:08d}"
        return f"{stage}/{n}", f"{generation}/{n}"

    kept = {a for p in here if p in preserved for a in _ancestors(p)}  # hold preserved paths
    moved: set[str] = set()  # paths whose whole subtree the swap moves away
    ops: list[Op] = []
    # Directories new here are built whole in the staging area, under their real names,
    # and the swap renames each new subtree's top into place: one operation, not one per
    # path. Path of each directory staged so -> its staged name.
    staged_dirs: dict[str, str] = {}
    for path in sorted(source):
        new = source[path]
        if path in preserved:
            continue
        parent = posixpath.dirname(path)
        if parent in staged_dirs:
            _stage_inside(work, path, new, staged_dirs)
            continue
        old = here.get(path)
        tree = tree_of(path, trees)
        if new.kind == "other":
            work.skipped.append(f"{path}: special file, not copied")
            continue
        replaces = old is not None and old.kind != new.kind
        if replaces and path in kept:
            work.skipped.append(f"{path}: holds a preserved path here; not replaced")
            continue
        if new.kind == "dir":
            if old is None and path != tree:
                staged, saved = names(tree)
                ops.append(Op("dir", tree, path, staged, saved, new.meta))
                staged_dirs[path] = staged
                work.plan.dirs.append((staged, new.meta))
                continue
            if old is None or old.kind != "dir":
                _, saved = names(tree)
                ops.append(Op("dir", tree, path, saved=saved, meta=new.meta, existed=replaces))
                if replaces:
                    moved.add(path)
            elif _differs(new, old):
                ops.append(Op("meta", tree, path, meta=new.meta, before=old.meta, existed=True))
            continue
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
            continue
        staged, saved = names(tree)
        work.fetch.append(Fetch(path, staged, new))
        ops.append(Op(new.kind, tree, path, staged, saved, new.meta, existed=old is not None))
        if old is not None and old.kind == "dir":
            moved.add(path)
    for path in sorted(here):
        if path in source or path in preserved or path in kept:
            continue
        if any(a in moved for a in _ancestors(path)):
            continue
        tree = tree_of(path, trees)
        _, saved = names(tree)
        ops.append(Op("delete", tree, path, saved=saved, before=here[path].meta, existed=True))
        moved.add(path)
    work.plan.ops = plan_order(ops)
    return work


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
