"""Hard links on a passive stay whole: under a check (split or wrongly joined names are
found and mended) and after the active forgot which names it sent (a restart).

A check that re-sent one name of a hard-linked inode as a whole file used to split the
passive's inode (the copy was renamed over one name only).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from capturefs import Place
from stead.errors import ProtocolError
from stead.replication.applier import Applier
from stead.replication.capture import make_capture
from stead.replication.capture.core import EventCapture
from stead.replication.check import _link_groups, _list_page, _validate_item
from stead.replication.entries import Entry, Op
from stead.replication.filters import Filter
from stead.replication.manifest import Manifest


def _listing(root: Path) -> dict[str, list[Any]]:
    page = _list_page({"r": root}, {"r": Filter()}, {"root": "r", "full": False})
    return {item[0]: item for item in page["items"]}


def _local(root: Path) -> list[tuple[str, os.stat_result]]:
    return list(Filter().walk(root))


def _tree(root: Path, linked: list[list[str]], alone: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for names in linked:
        (root / names[0]).write_text("linked")
        for name in names[1:]:
            os.link(root / names[0], root / name)
    for name in alone:
        (root / name).write_text("alone")


def test_listing_names_the_inode_of_linked_files_only(tmp_path: Path) -> None:
    _tree(tmp_path, [["a", "b"]], ["c"])
    items = _listing(tmp_path)
    assert items["a"][8] == items["b"][8] != 0
    assert items["c"][8] == 0


def test_same_links_on_both_sides_need_nothing(tmp_path: Path) -> None:
    _tree(tmp_path / "active", [["a", "b", "c"]], ["d"])
    _tree(tmp_path / "passive", [["a", "b", "c"]], ["d"])
    linked, mislinked = _link_groups(_local(tmp_path / "active"), _listing(tmp_path / "passive"))
    assert linked["b"] == ("a", "b", "c")
    assert mislinked == set()


def test_a_split_link_on_the_passive_is_found(tmp_path: Path) -> None:
    _tree(tmp_path / "active", [["a", "b"]], [])
    _tree(tmp_path / "passive", [], ["a", "b"])
    _, mislinked = _link_groups(_local(tmp_path / "active"), _listing(tmp_path / "passive"))
    assert mislinked == {("a", "b")}


def test_names_joined_only_on_the_passive_are_found(tmp_path: Path) -> None:
    _tree(tmp_path / "active", [], ["a", "b"])
    _tree(tmp_path / "passive", [["a", "b"]], [])
    _, mislinked = _link_groups(_local(tmp_path / "active"), _listing(tmp_path / "passive"))
    assert mislinked == {("a",), ("b",)}


def test_a_peer_without_link_ids_is_compared_by_content_only(tmp_path: Path) -> None:
    _tree(tmp_path / "active", [["a", "b"]], [])
    _tree(tmp_path / "passive", [], ["a", "b"])
    old = {path: item[:8] for path, item in _listing(tmp_path / "passive").items()}
    assert all(_validate_item(item)[0] == path for path, item in old.items())
    assert _link_groups(_local(tmp_path / "active"), old)[1] == set()


@pytest.mark.parametrize("bad", [-1, 2**63, "x", None])
def test_a_malformed_link_id_is_refused(tmp_path: Path, bad: Any) -> None:
    (tmp_path / "a").write_text("x")
    item = _listing(tmp_path)["a"]
    with pytest.raises(ProtocolError, match="link id"):
        _validate_item([*item[:8], bad])


@dataclass
class _Pair:
    src: Path
    dst: Path
    capture: EventCapture[Any]
    log: list[Entry]


@pytest.fixture
async def pair(place: Place) -> AsyncIterator[_Pair]:
    manifest = Manifest(place.dst.parent / "manifest.db")
    backend = "fanotify" if place.backend == "fanotify" else "inotify"
    capture = make_capture({"r": place.src}, {"r": Filter()}, manifest, backend)
    applier = Applier({"r": place.dst})
    log: list[Entry] = []

    async def emit(batch: list[Entry]) -> None:
        records = [(len(log) + i + 1, entry) for i, entry in enumerate(batch)]
        log.extend(batch)
        await asyncio.to_thread(applier.apply, records, lambda _seq: None)

    task = asyncio.create_task(capture.run(emit))
    try:
        await capture.started()
        yield _Pair(place.src, place.dst, capture, log)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        applier.close()
        manifest.close()


async def test_repairing_a_linked_file_keeps_the_passive_inode_whole(pair: _Pair) -> None:
    (pair.src / "a").write_text("one")
    os.link(pair.src / "a", pair.src / "b")
    await pair.capture.drain()
    assert (pair.dst / "a").stat().st_nlink == 2
    (pair.dst / "a").write_text("drifted")  # written through the shared inode: both differ
    await pair.capture.reconcile("r", [], [("a", "b")])
    assert (pair.dst / "b").read_text() == "one"
    assert os.path.samestat((pair.dst / "a").stat(), (pair.dst / "b").stat())
    ops = [(e.op, e.path) for e in pair.log[-2:]]
    assert ops == [(Op.FILE, "a"), (Op.LINK, "b")]


async def test_a_split_link_is_joined_again_and_a_false_one_split(pair: _Pair) -> None:
    (pair.src / "a").write_text("one")
    os.link(pair.src / "a", pair.src / "b")
    (pair.src / "c").write_text("two")
    (pair.src / "d").write_text("two")
    await pair.capture.drain()
    # The passive drifts: a/b split apart, c and d joined into one inode.
    (pair.dst / "b").unlink()
    (pair.dst / "b").write_text("one")
    (pair.dst / "d").unlink()
    os.link(pair.dst / "c", pair.dst / "d")
    _, mislinked = _link_groups(_local(pair.src), _listing(pair.dst))
    assert mislinked == {("a", "b"), ("c",), ("d",)}
    await pair.capture.reconcile("r", [], sorted(mislinked))
    assert os.path.samestat((pair.dst / "a").stat(), (pair.dst / "b").stat())
    assert (pair.dst / "c").stat().st_nlink == 1
    assert (pair.dst / "d").stat().st_nlink == 1
    assert _link_groups(_local(pair.src), _listing(pair.dst))[1] == set()


async def test_a_linked_file_changed_after_a_restart_stays_linked(pair: _Pair) -> None:
    (pair.src / "a").write_text("one")
    os.link(pair.src / "a", pair.src / "b")
    await pair.capture.drain()
    for name, text in (("a", "two"), ("b", "three")):
        pair.capture.reader.forget_links()  # what an agent restart (or a failover) knows
        (pair.src / name).write_text(text)
        await pair.capture.drain()
        assert pair.log[-1].op is Op.FILE and pair.log[-1].linked
        assert (pair.dst / "a").read_text() == text
        assert os.path.samestat((pair.dst / "a").stat(), (pair.dst / "b").stat())
