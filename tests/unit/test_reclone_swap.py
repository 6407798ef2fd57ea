"""Planning, staging, swapping and rolling back a reclone of real trees on disk.

The "active" tree and the "passive" tree live side by side; the plan is made for the
passive's paths, and the fetch is a local copy from the active's (the transfer over the
channel has its own tests). Crashes are simulated by stopping a swap after some operations.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from stead.config.system import PathSet
from stead.errors import RecloneError
from stead.reclone.builtin import collect, remember_swapped
from stead.reclone.plan import Item, Work, make_plan, tree_of
from stead.reclone.staging import make_symlink
from stead.reclone.swap import (
    AREA,
    Op,
    Parents,
    Plan,
    Swapper,
    _forward,
    seal_staged_dirs,
    set_meta,
)
from stead.system.hashcache import HashCache
from stead.system.manifest import Scope, hash_file


def _populate_active(root: Path) -> None:
    (root / "app" / "bin").mkdir(parents=True)
    (root / "app" / "VERSION").write_text("2.0\n")
    (root / "app" / "bin" / "tool").write_text("#!/bin/sh\necho 2.0\n")
    (root / "app" / "bin" / "tool").chmod(0o755)
    (root / "new-dir" / "deep").mkdir(parents=True)
    (root / "new-dir" / "deep" / "file").write_bytes(os.urandom(100_000))
    (root / "link").symlink_to("app/VERSION")
    (root / "was-a-dir").write_text("now a file\n")
    (root / "node.conf").write_text("node = active\n")
    (root / "mode-only").write_text("same\n")
    (root / "mode-only").chmod(0o600)


def _populate_passive(root: Path) -> None:
    (root / "app" / "bin").mkdir(parents=True)
    (root / "app" / "VERSION").write_text("1.0\n")
    (root / "app" / "bin" / "tool").write_text("#!/bin/sh\necho 1.0\n")
    (root / "app" / "old-only").write_text("gone after the reclone\n")
    (root / "was-a-dir" / "child").mkdir(parents=True)
    (root / "was-a-dir" / "child" / "f").write_text("x")
    (root / "node.conf").write_text("node = passive\n")
    (root / "mode-only").write_text("same\n")
    (root / "mode-only").chmod(0o644)
    (root / "stale-dir" / "sub").mkdir(parents=True)


def _snapshot(root: Path) -> dict[str, tuple[str, int, bytes | str]]:
    out: dict[str, tuple[str, int, bytes | str]] = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if rel.split("/")[0] == AREA:
            continue
        st = path.lstat()
        if path.is_symlink():
            out[rel] = ("link", 0, os.readlink(path))
        elif path.is_dir():
            out[rel] = ("dir", st.st_mode & 0o7777, "")
        else:
            out[rel] = ("file", st.st_mode & 0o7777, path.read_bytes())
    return out


def _plan(tmp_path: Path, run: str = "r1") -> tuple[Path, Path, Work]:
    active, passive = tmp_path / "active", tmp_path / "passive"
    active.mkdir(exist_ok=True)
    passive.mkdir(exist_ok=True)
    if not any(active.iterdir()):
        _populate_active(active)
        _populate_passive(passive)
    exclude = (AREA,)
    source_raw = collect(Scope(trees=(str(active),), exclude=exclude), serving=True)
    source = {str(passive) + p[len(str(active)) :]: i for p, i in source_raw.items()}
    here = collect(Scope(trees=(str(passive),), exclude=exclude), serving=False)
    preserved = PathSet([f"{passive}/node.conf"])
    work = make_plan(run, [str(passive)], source, here, preserved)
    return active, passive, work


def _stage(active: Path, passive: Path, work: Work) -> None:
    for fetch in work.fetch:
        if fetch.item.kind == "symlink":
            make_symlink(fetch)
        else:
            origin = str(active) + fetch.path[len(str(passive)) :]
            shutil.copyfile(origin, fetch.staged)
            set_meta(fetch.staged, fetch.item.meta)


def test_swap_makes_the_passive_equal_but_for_preserved_paths(tmp_path: Path) -> None:
    active, passive, work = _plan(tmp_path)
    before = _snapshot(passive)
    swapper = Swapper(tmp_path / "state")
    swapper.begin(work.plan)
    _stage(active, passive, work)
    assert _snapshot(passive) == before  # staging touches nothing
    swapper.swap(work.plan)
    expected = _snapshot(active)
    expected["node.conf"] = before["node.conf"]  # preserved: the node's own
    assert _snapshot(passive) == expected
    assert not swapper.intent_path.exists()
    assert swapper.generation() is not None
    assert work.summary()["delete"] >= 2  # app/old-only and stale-dir

    swapper.rollback()
    assert _snapshot(passive) == before
    assert swapper.generation() is None
    with pytest.raises(RecloneError, match="no reclone generation"):
        swapper.rollback()


@pytest.mark.parametrize("stop_after", [0, 1, 3, 7, 1000])
def test_an_interrupted_swap_is_finished_on_recovery(tmp_path: Path, stop_after: int) -> None:
    active, passive, work = _plan(tmp_path)
    swapper = Swapper(tmp_path / "state")
    swapper.begin(work.plan)
    _stage(active, passive, work)
    # What swap() does, cut short: the staged directories sealed, the intent says
    # "swapping", some operations are done.
    seal_staged_dirs(work.plan)
    swapper._write(swapper.intent_path, work.plan.to_json("swapping"))
    for op in work.plan.ops[:stop_after]:
        _forward(op)
    assert "finished" in Swapper(tmp_path / "state").recover()
    expected = _snapshot(active)
    expected["node.conf"] = "file", 0o644, b"node = passive\n"
    assert _snapshot(passive) == expected


def test_an_interrupted_staging_is_discarded(tmp_path: Path) -> None:
    active, passive, work = _plan(tmp_path)
    before = _snapshot(passive)
    swapper = Swapper(tmp_path / "state")
    swapper.begin(work.plan)
    _stage(active, passive, work)
    assert "discarded" in Swapper(tmp_path / "state").recover()
    assert _snapshot(passive) == before
    assert not any((passive / AREA).iterdir())
    assert Swapper(tmp_path / "state").recover() == ""


def test_delete_original_drops_the_generation(tmp_path: Path) -> None:
    active, passive, work = _plan(tmp_path)
    work.plan.delete_original = True
    swapper = Swapper(tmp_path / "state")
    swapper.begin(work.plan)
    _stage(active, passive, work)
    swapper.swap(work.plan)
    assert not any((passive / AREA).iterdir())
    with pytest.raises(RecloneError, match="deleted"):
        swapper.rollback()


def test_a_second_reclone_finds_nothing_to_do(tmp_path: Path) -> None:
    active, passive, work = _plan(tmp_path)
    swapper = Swapper(tmp_path / "state")
    swapper.begin(work.plan)
    _stage(active, passive, work)
    swapper.swap(work.plan)
    _, _, again = _plan(tmp_path, run="r2")
    assert again.fetch == []
    assert [op.kind for op in again.plan.ops] == []


def test_a_directory_holding_a_preserved_path_is_never_removed(tmp_path: Path) -> None:
    tree = str(tmp_path / "t")
    item = Item("file", 0o644, 0, 0, 1, 0, "ab")
    here = {tree: Item("dir", 0o755, 0, 0), f"{tree}/ssh": Item("dir", 0o755, 0, 0),
            f"{tree}/ssh/host_key": item}  # fmt: skip
    source = {tree: Item("dir", 0o755, 0, 0), f"{tree}/ssh": item}  # a file on the active
    work = make_plan("r", [tree], source, here, PathSet([f"{tree}/ssh/host_key"]))
    assert [op.path for op in work.plan.ops] == []
    assert any("preserved" in s for s in work.skipped)


@pytest.mark.parametrize(
    "path",
    ["/etc/../root/x", "relative", "/elsewhere/x", f"/t/{AREA}/x", "/t/a\0b", "/t//x"],
)
def test_manifest_paths_outside_the_trees_are_refused(path: str) -> None:
    with pytest.raises(RecloneError):
        tree_of(path, ["/t"])
    with pytest.raises(RecloneError):
        make_plan("r", ["/t"], {path: Item("file", 0o644, 0, 0)}, {}, PathSet([]))


def test_a_symlinked_directory_on_the_passive_is_never_written_through(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tree = tmp_path / "t"
    tree.mkdir()
    (tree / "sub").symlink_to(outside)
    item = Item("file", 0o644, os.getuid(), os.getgid(), 2, 0, "")
    work = make_plan("r", [str(tree)], {f"{tree}/sub/x": item}, {}, PathSet([]))
    swapper = Swapper(tmp_path / "state")
    swapper.begin(work.plan)
    for fetch in work.fetch:
        Path(fetch.staged).write_text("x\n")
    swapper.swap(work.plan)
    assert not (outside / "x").exists()


def test_a_second_reclone_keeps_its_own_generation(tmp_path: Path) -> None:
    active, passive, first = _plan(tmp_path, run="r1")
    swapper = Swapper(tmp_path / "state")
    swapper.begin(first.plan)
    _stage(active, passive, first)
    swapper.swap(first.plan)
    after_first = _snapshot(passive)
    (active / "app" / "VERSION").write_text("3.0\n")
    _, _, second = _plan(tmp_path, run="r2")
    swapper.begin(second.plan)
    _stage(active, passive, second)
    swapper.swap(second.plan)
    generation = swapper.generation()
    assert generation is not None and generation.run == "r2"
    assert not (passive / AREA / "gen-r1").exists()
    swapper.rollback()
    assert _snapshot(passive) == after_first


def test_the_parent_check_refuses_every_path_under_a_symlinked_directory(tmp_path: Path) -> None:
    """Checked once per directory in a swap, a symlinked parent still stops each operation."""
    outside = tmp_path / "outside"
    outside.mkdir()
    tree = tmp_path / "t"
    (tree / "real").mkdir(parents=True)
    (tree / "real" / "sub").symlink_to(outside)
    item = Item("file", 0o644, os.getuid(), os.getgid(), 2, 0, "")
    source = {f"{tree}/real/sub/{name}": item for name in ("a", "b", "c")}
    source[f"{tree}/real/ok"] = item
    work = make_plan("r", [str(tree)], source, {}, PathSet([]))
    swapper = Swapper(tmp_path / "state")
    swapper.begin(work.plan)
    for fetch in work.fetch:
        Path(fetch.staged).write_text("x\n")
    swapper.swap(work.plan)
    assert list(outside.iterdir()) == []
    assert (tree / "real" / "ok").read_text() == "x\n"


def test_a_directory_known_good_is_checked_again_once_an_operation_replaces_it(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    tree = tmp_path / "t"
    (tree / "sub").mkdir(parents=True)
    parents = Parents()
    first = Op("file", str(tree), f"{tree}/sub/a")
    assert parents.inside(first)
    (tree / "sub").rmdir()
    (tree / "sub").symlink_to(outside)  # what an operation on the directory itself may do
    parents.changed(f"{tree}/sub")
    assert not parents.inside(Op("file", str(tree), f"{tree}/sub/b"))
    assert not parents.inside(Op("file", str(tree), f"{tree}/sub/deeper/c"))
    assert not Parents().inside(Op("file", str(tree), "/elsewhere/x"))


def test_a_plan_round_trips_through_its_intent(tmp_path: Path) -> None:
    _, _, work = _plan(tmp_path)
    data = json.loads(json.dumps(work.plan.to_json("swapping")))
    assert Plan.from_json(data) == work.plan
    old_style = {**data, "ops": [_as_map(op) for op in data["ops"]]}  # an earlier version's
    assert Plan.from_json(old_style) == work.plan


def _as_map(op: list[object]) -> dict[str, object]:
    names = ("kind", "tree", "path", "staged", "saved", "meta", "before", "existed")
    out = dict(zip(names, op, strict=True))
    for key in ("meta", "before"):
        if out[key] is not None:
            out[key] = dict(zip(("mode", "uid", "gid", "mtime_ns"), out[key], strict=True))  # type: ignore[call-overload]
    return out


def test_the_files_a_swap_placed_are_remembered_in_the_hash_cache(tmp_path: Path) -> None:
    active, passive, work = _plan(tmp_path)
    swapper = Swapper(tmp_path / "state")
    swapper.begin(work.plan)
    _stage(active, passive, work)
    swapper.swap(work.plan)
    store = tmp_path / "state" / "hash-cache.msgpack"
    verified = {f.path: f.item.digest for f in work.fetch if f.item.kind == "file"}
    remember_swapped(store, work, verified)
    cache = HashCache(store)
    placed = [f.path for f in work.fetch if f.item.kind == "file"]
    assert placed
    for path in placed:
        assert cache.lookup(path, os.lstat(path)) == hash_file(path)[0]
    Path(placed[0]).write_text("changed after the swap\n")
    assert cache.lookup(placed[0], os.lstat(placed[0])) is None


def test_a_new_subtree_is_built_whole_in_staging_and_moved_in_by_one_operation(
    tmp_path: Path,
) -> None:
    active, passive, work = _plan(tmp_path)
    top = f"{passive}/new-dir"
    moving = [op for op in work.plan.ops if op.path.startswith(top)]
    assert [(op.kind, op.path) for op in moving] == [("dir", top)]  # nothing below it
    staged = moving[0].staged
    deep = next(f for f in work.fetch if f.path == f"{top}/deep/file")
    assert deep.staged == f"{staged}/deep/file"  # under its own name in the staged tree
    assert [d for d, _ in work.plan.dirs] == [staged, f"{staged}/deep"]
    assert work.summary()["create"] >= 3  # the top, deep and the file all count
    swapper = Swapper(tmp_path / "state")
    swapper.begin(work.plan)
    _stage(active, passive, work)
    swapper.swap(work.plan)
    assert (passive / "new-dir" / "deep" / "file").read_bytes() == (
        active / "new-dir" / "deep" / "file"
    ).read_bytes()
    for rel in ("new-dir", "new-dir/deep"):  # mode and mtime as on the active
        want, got = (active / rel).stat(), (passive / rel).stat()
        assert (got.st_mode, got.st_mtime_ns) == (want.st_mode, want.st_mtime_ns)
    swapper.rollback()
    assert not (passive / "new-dir").exists()


def test_nothing_is_staged_under_a_symlink_a_manifest_puts_in_a_new_subtree(
    tmp_path: Path,
) -> None:
    """A peer's manifest may list a file below one of its symlinks: it must not be written
    through the staged symlink (which could point anywhere)."""
    tree = str(tmp_path / "t")
    me = (os.getuid(), os.getgid())
    source = {
        tree: Item("dir", 0o755, *me),
        f"{tree}/new": Item("dir", 0o755, *me),
        f"{tree}/new/link": Item("symlink", 0o777, *me, target=str(tmp_path / "outside")),
        f"{tree}/new/link/evil": Item("file", 0o644, *me, 1, 0, ""),
    }
    work = make_plan("r", [tree], source, {tree: Item("dir", 0o755, *me)}, PathSet([]))
    link = next(f for f in work.fetch if f.path.endswith("/link"))
    evil = next(f for f in work.fetch if f.path.endswith("/evil"))
    assert not evil.staged.startswith(link.staged + "/")
    assert evil.staged.startswith(str(tmp_path / "t" / AREA))
