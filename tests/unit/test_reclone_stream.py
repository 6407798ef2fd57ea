"""The reclone manifest streamed in parts: the walk hands them over as it goes, the active
serves them while it answers reads, the passive plans and copies each part as it comes.
"""

from __future__ import annotations

import asyncio
import os
import posixpath
import threading
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_reclone_transfer import _Pipe

from stead.channel import messages as m
from stead.channel.transport import Connection
from stead.config.system import PathSet
from stead.errors import RecloneError, SteadError
from stead.reclone import plan as plan_module
from stead.reclone.builtin import collect
from stead.reclone.plan import Fetch, Item, Planner, make_plan
from stead.reclone.swap import AREA, Swapper, stage_dir
from stead.reclone.transfer import Fetcher, Source
from stead.system import manifest as manifest_module
from stead.system.manifest import Scope, SystemManifest, build_manifest


def _tree(root: Path, dirs: int = 12, files: int = 30) -> None:
    for d in range(dirs):
        sub = root / f"d{d:02d}" / "inner"
        sub.mkdir(parents=True)
        for f in range(files):
            (sub.parent / f"f{f:03d}").write_bytes(os.urandom(f * 7))
        (sub / "deep").write_text(f"deep {d}\n")
        (sub / "link").symlink_to("deep")


def test_the_walk_hands_over_every_entry_once_in_growing_parts_parents_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manifest_module, "PART_FIRST", 50)
    monkeypatch.setattr(manifest_module, "PART_MOST", 200)
    _tree(tmp_path / "t")
    parts: list[list[str]] = []

    def emit(found: SystemManifest, paths: list[str]) -> None:
        assert all(p in found.entries for p in paths)
        parts.append(paths)

    scope = Scope(trees=(str(tmp_path / "t"),))
    whole = build_manifest(scope, virtual=frozenset(), emit=emit)
    streamed = [p for part in parts for p in part]
    assert sorted(streamed) == sorted(whole.entries)  # every entry, once
    assert len(streamed) == len(set(streamed))
    seen: set[str] = set()
    for path in streamed:  # a directory before what it holds
        assert path == str(tmp_path / "t") or os.path.dirname(path) in seen
        seen.add(path)
    sizes = [len(part) for part in parts[:-1]]
    assert len(parts) >= 4
    assert sizes[0] >= 50
    assert max(sizes) <= 200 + 31  # a directory's listing goes out whole


def _source(root: Path) -> dict[str, Item]:
    return collect(Scope(trees=(str(root),)), serving=True)


def _here(tmp_path: Path) -> tuple[str, dict[str, Item], dict[str, Item]]:
    """A tree as the active has it, and the passive's version of the same tree."""
    active, passive = tmp_path / "active", tmp_path / "passive"
    _tree(active, dirs=6, files=5)
    _tree(passive, dirs=3, files=5)
    (passive / "d00" / "f001").write_text("differs")
    (passive / "only-here" / "x").mkdir(parents=True)
    (passive / "d01" / "keep.conf").write_text("mine")
    source = {str(passive) + p[len(str(active)) :]: i for p, i in _source(active).items()}
    here = collect(Scope(trees=(str(passive),)), serving=False)
    return str(passive), source, here


def _canon(planner_work: Any) -> tuple[Any, ...]:
    """A plan without its staging names (parts change the order names are made in)."""
    ops = sorted((op.kind, op.path, op.existed, op.meta) for op in planner_work.plan.ops)
    fetch = sorted((f.path, f.item) for f in planner_work.fetch)
    return ops, fetch, sorted(planner_work.skipped), planner_work.created_inside


@pytest.mark.parametrize("order", ["walk", "reversed", "shuffled"])
def test_a_plan_made_part_by_part_equals_the_plan_of_the_whole(tmp_path: Path, order: str) -> None:
    """Parts in walk order are planned as they come; a path that comes before its parent
    waits for the end; in every order the plan is the one the whole manifest gives."""
    tree, source, here = _here(tmp_path)
    preserved = PathSet([f"{tree}/d01/keep.conf"])
    whole = make_plan("r", [tree], source, here, preserved)
    paths = sorted(source)
    if order == "reversed":
        paths.reverse()
    elif order == "shuffled":
        paths = paths[1::2] + paths[0::2]
    planner = Planner("r", [tree], here, preserved)
    fetched: list[Fetch] = []
    made = {str(stage_dir(tree, "r"))}  # the staging directories, as a copy makes them

    def staged(fetches: list[Fetch], dirs: list[tuple[str, Any]]) -> None:
        for directory, _meta in dirs:
            assert os.path.dirname(directory) in made  # parents first
            made.add(directory)
        for f in fetches:  # each file's directory is made before it is fetched
            assert os.path.dirname(f.staged) in made
        fetched.extend(fetches)

    for start in range(0, len(paths), 7):
        staged(*planner.add({p: source[p] for p in paths[start : start + 7]}))
    fetches, dirs = planner.finish()
    staged(fetches, dirs)
    assert _canon(planner.work) == _canon(whole)
    assert sorted(f.path for f in fetched) == sorted(f.path for f in planner.work.fetch)
    if order == "walk":
        assert not fetches  # nothing waited: every part was planned as it came


def test_a_directory_only_this_node_has_is_kept_when_it_holds_a_preserved_path(
    tmp_path: Path,
) -> None:
    """The walk sets preserved paths apart (no item): what holds one, even a directory
    the active lacks, is neither deleted nor replaced (it used to be deleted whole)."""
    tree, source, _ = _here(tmp_path)
    own = Path(tree) / "own"
    (own / "net").mkdir(parents=True)
    (own / "net" / "mgmt.conf").write_text("this node's own")
    (own / "other").write_text("not preserved")
    preserved = PathSet([f"{tree}/own/net/mgmt.conf"])
    held: list[str] = []
    scope = Scope(trees=(tree,), preserve=(f"{tree}/own/net/mgmt.conf",))
    here = collect(scope, serving=False, held=held)
    assert held == [f"{tree}/own/net/mgmt.conf"] and held[0] not in here
    work = make_plan("r", [tree], source, here, preserved, held=held)
    deleted = {op.path for op in work.plan.ops if op.kind == "delete"}
    assert f"{tree}/own/other" in deleted  # the rest of it goes, as the active lacks it
    assert not deleted & {f"{tree}/own", f"{tree}/own/net", f"{tree}/own/net/mgmt.conf"}
    assert not any(op.path.startswith(f"{tree}/own/net") for op in work.plan.ops)


def test_a_path_sent_twice_or_after_the_end_is_refused(tmp_path: Path) -> None:
    tree, source, here = _here(tmp_path)
    planner = Planner("r", [tree], here, PathSet([]))
    first = dict(list(source.items())[:5])
    planner.add(first)
    with pytest.raises(RecloneError, match="twice"):
        planner.add(dict(list(first.items())[:1]))
    planner.finish()
    with pytest.raises(RecloneError, match="after its end"):
        planner.add({f"{tree}/late": source[next(iter(source))]})
    with pytest.raises(RecloneError, match="outside"):
        Planner("r", [tree], here, PathSet([])).add({"/elsewhere/x": source[tree]})


def test_a_staging_begun_before_its_plan_is_made_is_discarded_whole(tmp_path: Path) -> None:
    tree, source, here = _here(tmp_path)
    planner = Planner("r", [tree], here, PathSet([]))
    swapper = Swapper(tmp_path / "state")
    swapper.begin(planner.work.plan)
    _fetches, dirs = planner.add(source)
    swapper.make_dirs(dirs)
    assert dirs and all(os.path.isdir(d) for d, _ in dirs)
    # The agent dies while the manifest still arrives: the next start discards it all.
    assert "discarded" in Swapper(tmp_path / "state").recover()
    assert not stage_dir(tree, "r").exists()
    assert sorted(set(os.listdir(tree)) - {AREA}) == sorted(
        os.path.basename(p) for p in here if os.path.dirname(p) == tree
    )


class _Walking:
    """A collect that streams its items in two parts and holds the second back until
    ``release`` is set (a slow walk)."""

    def __init__(self, items: dict[str, Item]) -> None:
        paths = sorted(items)
        self.first = {p: items[p] for p in paths[: len(paths) // 2]}
        self.second = {p: items[p] for p in paths[len(paths) // 2 :]}
        self.release = threading.Event()

    def __call__(self, *, emit: Any = None, only: Any = None, **_: Any) -> dict[str, Item]:
        if only is not None:
            return {p: i for p, i in {**self.first, **self.second}.items() if p in only}
        assert emit is not None
        emit(self.first)
        if not self.release.wait(30):
            raise RecloneError("never released")
        emit(self.second)
        return {}


def _items(root: Path, n: int) -> dict[str, Item]:
    import blake3

    root.mkdir()
    items = {}
    for i in range(n):
        path = root / f"f{i:03d}"
        data = os.urandom(100 + i)
        path.write_bytes(data)
        st = path.stat()
        items[str(path)] = Item(
            "file", 0o644, os.getuid(), os.getgid(), len(data), st.st_mtime_ns,
            blake3.blake3(data).hexdigest(),
        )  # fmt: skip
    return items


def test_files_of_the_first_part_are_copied_while_the_active_still_walks(
    tmp_path: Path,
) -> None:
    """The walk holds its second part back until the first part's files are staged: a
    passive that waited for the whole manifest before copying would never finish."""
    items = _items(tmp_path / "active", 40)
    walking = _Walking(items)
    stage = tmp_path / "stage"
    stage.mkdir()
    names = {p: str(stage / f"{n:04d}") for n, p in enumerate(sorted(items))}

    async def run() -> tuple[list[int], Fetcher]:
        a: asyncio.Queue[m.Message] = asyncio.Queue()
        b: asyncio.Queue[m.Message] = asyncio.Queue()
        fetcher = Fetcher(cast(Connection, _Pipe(a, b)))
        server = asyncio.create_task(Source(walking).serve(cast(Connection, _Pipe(b, a))))
        staged_before: list[int] = []

        async def parts() -> Any:
            async for part in fetcher.manifest_parts({}):
                yield [Fetch(p, names[p], item) for p, item in part.items()]
                if not walking.release.is_set():
                    # The first part's reads are answered although the walk is stuck.
                    for _ in range(200):
                        done = sum(os.path.exists(names[p]) for p in walking.first)
                        if done == len(walking.first) and fetcher.progress.files_done:
                            break
                        await asyncio.sleep(0.01)
                    staged_before.append(fetcher.progress.files_done)
                    walking.release.set()

        try:
            await fetcher.fetch(parts())
        finally:
            server.cancel()
            await fetcher.close()
        return staged_before, fetcher

    staged_before, fetcher = asyncio.run(asyncio.wait_for(run(), 60))
    assert staged_before == [len(walking.first)]
    assert fetcher.progress.files_done == len(items)
    for path, name in names.items():
        assert Path(name).read_bytes() == Path(path).read_bytes()


@pytest.mark.parametrize("fault", ["walk fails", "next without a stream"])
def test_a_walk_that_fails_or_a_stray_request_is_refused_clearly(
    tmp_path: Path, fault: str
) -> None:
    def failing(*, emit: Any = None, **_: Any) -> dict[str, Item]:
        emit({})
        raise OSError(5, "Input/output error", "/opt/broken")

    async def run() -> None:
        a: asyncio.Queue[m.Message] = asyncio.Queue()
        b: asyncio.Queue[m.Message] = asyncio.Queue()
        fetcher = Fetcher(cast(Connection, _Pipe(a, b)))
        server = asyncio.create_task(Source(failing).serve(cast(Connection, _Pipe(b, a))))
        try:
            if fault == "walk fails":
                await fetcher.manifest({})
            else:
                await fetcher._call("manifest-next", {})
        finally:
            server.cancel()
            await fetcher.close()

    match = "Input/output error" if fault == "walk fails" else "no manifest is being streamed"
    with pytest.raises(SteadError, match=match):
        asyncio.run(run())


def test_staged_data_is_flushed_in_the_background_one_flush_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every FLUSH_EVERY bytes staged the fetcher starts the flush it was given (the
    swap's syncfs then finds little left); never two at once."""
    from stead.reclone import transfer

    monkeypatch.setattr(transfer, "FLUSH_EVERY", 2_000)
    items = _items(tmp_path / "active", 60)  # about 9 KB
    stage = tmp_path / "stage"
    stage.mkdir()
    fetches = [Fetch(p, str(stage / f"{n:04d}"), i) for n, (p, i) in enumerate(items.items())]
    running, most, calls = [0], [0], [0]
    lock = threading.Lock()

    def flush() -> None:
        with lock:
            running[0] += 1
            calls[0] += 1
            most[0] = max(most[0], running[0])
        os.sync()
        with lock:
            running[0] -= 1

    async def run() -> None:
        a: asyncio.Queue[m.Message] = asyncio.Queue()
        b: asyncio.Queue[m.Message] = asyncio.Queue()
        fetcher = Fetcher(cast(Connection, _Pipe(a, b)))
        fetcher.flush = flush
        source = Source(lambda **_: dict(items))
        server = asyncio.create_task(source.serve(cast(Connection, _Pipe(b, a))))
        try:
            await fetcher.manifest({})
            await fetcher.fetch(fetches)
            if fetcher._flushing is not None:
                await fetcher._flushing
        finally:
            server.cancel()
            await fetcher.close()

    asyncio.run(run())
    assert calls[0] >= 1
    assert most[0] == 1


def test_a_reclone_asked_while_the_last_one_keeps_its_digests_waits_for_it(
    tmp_path: Path,
) -> None:
    """A passive says "done" as soon as its swap is over and keeps the digests of what it
    staged afterwards; a new reclone asked meanwhile starts once that is kept, not refused.
    One still copying is refused."""
    import ssl

    from stead.config.init import create_cluster, parse_node_spec
    from stead.config.load import load
    from stead.reclone.builtin import Rebuilder

    nodes = [parse_node_spec("primary=198.18.0.11"), parse_node_spec("secondary=198.18.0.12")]
    directory = create_cluster(
        tmp_path / "c", cluster_name="c", nodes=nodes, active="primary", protect=["/srv"]
    )
    cluster = load(directory / "nodes" / "secondary").cluster
    order: list[str] = []

    async def run() -> None:
        copying, go_on, swapped, keeping = (asyncio.Event() for _ in range(4))
        rebuilder = Rebuilder(
            me="secondary",
            cluster=cluster,
            state_dir=tmp_path / "state",
            ssl_context=ssl.create_default_context(),
            hello=lambda: cast(m.Hello, None),
        )

        async def rebuild(active: Any, *, delete_original: bool, dry_run: bool) -> None:
            run = rebuilder.state.run
            order.append(f"{run} starts")
            if run == "one":
                rebuilder.state.phase = "copy"
                copying.set()
                await go_on.wait()
                rebuilder.state.phase = "done"  # swapped; the digests are kept next
                swapped.set()
                await keeping.wait()
            order.append(f"{run} ends")

        rebuilder._rebuild = rebuild  # type: ignore[method-assign]
        rebuilder.start("one", "primary", delete_original=False, dry_run=False)
        await copying.wait()
        with pytest.raises(RecloneError, match="already recloning"):
            rebuilder.start("two", "primary", delete_original=False, dry_run=False)
        go_on.set()
        await swapped.wait()
        rebuilder.start("two", "primary", delete_original=False, dry_run=False)
        await asyncio.sleep(0)  # the new run's task has begun: it waits
        assert order == ["one starts"]
        keeping.set()
        assert rebuilder.task is not None
        await rebuilder.task
        assert rebuilder.state.run == "two" and rebuilder.state.phase == "done"

    asyncio.run(run())
    assert order == ["one starts", "one ends", "two starts", "two ends"]


# -- paths of a manifest ------------------------------------------------------------------

_PIECES = ["", ".", "..", "a", "b.c", ".d", "..e", "f..", "g h"]


@given(st.lists(st.sampled_from(_PIECES), max_size=6), st.booleans(), st.booleans())
def test_a_manifest_path_is_normalised_exactly_as_normpath_says(
    pieces: list[str], absolute: bool, trailing: bool
) -> None:
    """The planner's quick test agrees with ``posixpath.normpath`` (a leading ``//``, which
    normpath keeps, is refused too)."""
    path = ("/" if absolute else "") + "/".join(pieces) + ("/" if trailing else "")
    expected = (
        path.startswith("/") and not path.startswith("//") and posixpath.normpath(path) == path
    )
    assert plan_module._normalised(path) == expected


def test_planning_refuses_paths_that_are_not_normalised(tmp_path: Path) -> None:
    tree = str(tmp_path)
    item = Item("file", 0o644, 0, 0, 1, 1, "ab")
    for bad in [f"{tree}/a/../b", f"{tree}//a", f"{tree}/./a", f"{tree}/a/", "relative/a"]:
        with pytest.raises(RecloneError, match="normalised"):
            make_plan("run", [tree], {bad: item}, {}, PathSet([]))
