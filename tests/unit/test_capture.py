"""Capture with real inotify on temporary trees, checked by applying what it emits.

Every test mirrors a source tree ``src`` into ``dst`` through the real applier and compares
the two with ``tests/treeutil.snapshot``; a Hypothesis property does the same for random
sequences of file operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stead.replication.applier import Applier
from stead.replication.capture.base import FileReader
from stead.replication.capture.inotify import InotifyCapture
from stead.replication.capture.scan import initial_scan
from stead.replication.entries import Entry, Op
from stead.replication.filters import Filter
from stead.replication.manifest import Manifest
from treeutil import snapshot

ROOT = "r"
TIMEOUT = 20


class Mirror:
    """A capture of ``src`` whose entries are applied to ``dst`` on every ``sync``."""

    def __init__(
        self,
        src: Path,
        dst: Path,
        *,
        filt: Filter | None = None,
        manifest: Manifest | None = None,
        scan_on_start: bool = False,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self.src, self.dst = src, dst
        self.capture = InotifyCapture(
            {ROOT: src},
            {ROOT: filt or Filter()},
            manifest,
            scan_on_start=scan_on_start,
            on_overflow=on_overflow,
        )
        self.applier = Applier({ROOT: dst})
        self.emitted: list[Entry] = []
        self.applied = 0

    async def _emit(self, batch: list[Entry]) -> None:
        for entry in batch:  # every entry survives the wire
            assert Entry.from_wire(entry.to_wire()) == entry
        self.emitted.extend(batch)

    async def sync(self) -> list[Entry]:
        """Drain, apply what is new to ``dst``, and return it."""
        async with asyncio.timeout(TIMEOUT):
            await self.capture.drain()
        new = self.emitted[self.applied :]
        if new:
            records = list(enumerate(new, start=self.applied))
            self.applier.apply(records, commit=lambda seq: None)
        self.applied = len(self.emitted)
        return new

    def assert_same(self) -> None:
        assert snapshot(self.dst) == snapshot(self.src)


@contextlib.asynccontextmanager
async def mirror(src: Path, dst: Path, **kwargs: object) -> AsyncIterator[Mirror]:
    mir = Mirror(src, dst, **kwargs)  # type: ignore[arg-type]
    task = asyncio.create_task(mir.capture.run(mir._emit))
    started = asyncio.create_task(mir.capture.started())
    async with asyncio.timeout(TIMEOUT):
        done, _ = await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()  # raises what went wrong
    try:
        yield mir
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        mir.applier.close()


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    return src, dst


def ops(entries: list[Entry]) -> list[tuple[Op, str]]:
    return [(entry.op, entry.path) for entry in entries]


def append(path: Path, data: bytes) -> None:
    with open(path, "ab") as handle:
        handle.write(data)


def write_at(path: Path | bytes, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def queue_limit() -> int:
    return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())


async def test_file_create_write_append_truncate(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    async with mirror(src, dst) as mir:
        (src / "f").write_bytes(b"hello")
        new = await mir.sync()
        assert ops(new) == [(Op.FILE, "f")]
        assert new[0].data == b"hello" and new[0].first and new[0].last and new[0].size == 5
        mir.assert_same()
        append(src / "f", b" world")
        await mir.sync()
        mir.assert_same()
        os.truncate(src / "f", 2)
        await mir.sync()
        mir.assert_same()
        assert (dst / "f").read_bytes() == b"he"


async def test_chmod_chown_touch_send_meta(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    async with mirror(src, dst) as mir:
        (src / "f").write_bytes(b"x")
        (src / "d").mkdir()
        await mir.sync()
        os.chmod(src / "f", 0o600)
        os.chmod(src / "d", 0o711)
        os.chown(src / "f", 1234, 4321)
        os.utime(src / "f", ns=(1_000_000_000, 2_000_000_000))
        new = await mir.sync()
        assert set(ops(new)) == {(Op.META, "f"), (Op.META, "d")}
        mir.assert_same()
        assert (dst / "f").stat().st_uid == 1234
        assert (dst / "f").stat().st_gid == 4321


async def test_renames_of_files_and_directories(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    async with mirror(src, dst) as mir:
        (src / "d" / "sub").mkdir(parents=True)
        (src / "d" / "sub" / "f").write_bytes(b"one")
        (src / "g").write_bytes(b"two")
        await mir.sync()
        os.rename(src / "g", src / "h")
        os.rename(src / "d", src / "e")
        # The moved directory's watches must now report under the new name.
        (src / "e" / "sub" / "f").write_bytes(b"three")
        (src / "e" / "sub" / "new").write_bytes(b"four")
        new = await mir.sync()
        assert (Op.RENAME, "g") in ops(new) and (Op.RENAME, "d") in ops(new)
        assert (Op.FILE, "e/sub/f") in ops(new)
        mir.assert_same()


async def test_delete_rmdir_and_moves_out_and_in(trees: tuple[Path, Path], tmp_path: Path) -> None:
    src, dst = trees
    outside = tmp_path / "outside"
    (outside / "in").mkdir(parents=True)
    (outside / "in" / "x").write_bytes(b"from outside")
    async with mirror(src, dst) as mir:
        (src / "d" / "e").mkdir(parents=True)
        (src / "d" / "e" / "f").write_bytes(b"1")
        (src / "g").write_bytes(b"2")
        (src / "h").write_bytes(b"3")
        await mir.sync()
        os.unlink(src / "g")
        shutil.rmtree(src / "d")
        os.rename(src / "h", outside / "h")
        os.rename(outside / "in", src / "in")
        new = await mir.sync()
        assert (Op.DELETE, "g") in ops(new) and (Op.DELETE, "h") in ops(new)
        mir.assert_same()
        (src / "in" / "y").write_bytes(b"watched after moving in")
        await mir.sync()
        mir.assert_same()


async def test_symlinks_and_hard_links(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    async with mirror(src, dst) as mir:
        (src / "f").write_bytes(b"shared")
        os.symlink("f", src / "s")
        os.symlink("/nowhere/at/all", src / "dangling")
        await mir.sync()
        os.link(src / "f", src / "g")
        new = await mir.sync()
        assert (Op.LINK, "g") in ops(new)
        mir.assert_same()
        assert (dst / "f").stat().st_ino == (dst / "g").stat().st_ino
        append(src / "g", b" more")  # through the second name
        await mir.sync()
        mir.assert_same()
        assert (dst / "f").stat().st_ino == (dst / "g").stat().st_ino


async def test_sparse_file_stays_sparse(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    async with mirror(src, dst) as mir:
        (src / "sparse").write_bytes(b"head")
        write_at(src / "sparse", 64 * 1024 * 1024, b"tail")
        new = await mir.sync()
        assert sum(entry.payload_bytes() for entry in new) <= 2 * 65536
        mir.assert_same()
        assert (dst / "sparse").stat().st_blocks * 512 < 1024 * 1024


async def test_big_file_one_byte_change_is_one_block(
    trees: tuple[Path, Path], tmp_path: Path
) -> None:
    src, dst = trees
    manifest = Manifest(tmp_path / "manifest.db")
    data = bytearray(os.urandom(10 * 1024 * 1024 + 123))
    async with mirror(src, dst, manifest=manifest) as mir:
        (src / "big").write_bytes(data)
        new = await mir.sync()
        parts = [entry for entry in new if entry.op is Op.FILE]
        assert len(parts) == 3 and parts[0].first and parts[-1].last
        assert all(len(entry.data) <= 4 * 1024 * 1024 for entry in parts)
        mir.assert_same()
        write_at(
            src / "big", 5 * 1024 * 1024 + 5, b"\x00" if data[5 * 1024 * 1024 + 5] else b"\x01"
        )
        new = await mir.sync()
        assert ops(new) == [(Op.DELTA, "big")]
        assert [offset for offset, _ in new[0].blocks] == [5 * 1024 * 1024]
        assert new[0].size == len(data)
        mir.assert_same()
        os.rename(src / "big", src / "moved")  # the record follows the rename
        append(src / "moved", b"tail")
        new = await mir.sync()
        deltas = [entry for entry in new if entry.op is Op.DELTA]
        assert deltas and sum(len(entry.blocks) for entry in deltas) == 1
        mir.assert_same()
    manifest.close()


async def test_filters_keep_excluded_paths_out(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    filt = Filter(include=["data/**"], exclude=["*.tmp", "data/cache"])
    async with mirror(src, dst, filt=filt) as mir:
        (src / "data" / "cache").mkdir(parents=True)
        (src / "other").mkdir()
        (src / "data" / "keep").write_bytes(b"k")
        (src / "data" / "x.tmp").write_bytes(b"t")
        (src / "data" / "cache" / "c").write_bytes(b"c")
        (src / "other" / "o").write_bytes(b"o")
        (src / "top").write_bytes(b"t")
        new = await mir.sync()
        assert {entry.path for entry in new} == {"data", "data/keep"}
        os.rename(src / "data" / "x.tmp", src / "data" / "saved")  # an editor's atomic save
        os.rename(src / "data" / "keep", src / "data" / "k.tmp")  # renamed out of view
        new = await mir.sync()
        assert set(ops(new)) == {(Op.FILE, "data/saved"), (Op.DELETE, "data/keep")}
        wanted = {k: v for k, v in snapshot(src).items() if filt.protected(k, v[0] == "dir")}
        assert set(wanted) == {"data", "data/saved"}
        assert snapshot(dst) == wanted


async def test_non_utf8_names(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    async with mirror(src, dst) as mir:
        write_at(os.path.join(os.fsencode(src), b"caf\xe9"), 0, b"bytes")
        new = await mir.sync()
        assert os.fsencode(new[0].path) == b"caf\xe9"
        mir.assert_same()


async def test_drain_returns_after_every_earlier_change(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    async with mirror(src, dst) as mir:
        mir.capture.coalesce = 3600.0  # only drain can flush content changes now
        for index in range(200):
            (src / f"f{index}").write_bytes(b"%d" % index)
        await mir.sync()
        mir.assert_same()
        assert mir.capture.stats.entries == 200


async def test_start_scan_and_overflow_rescan(trees: tuple[Path, Path]) -> None:
    src, dst = trees
    (src / "before").mkdir()
    (src / "before" / "f").write_bytes(b"existed before the start")
    overflows: list[int] = []
    async with mirror(src, dst, scan_on_start=True, on_overflow=lambda: overflows.append(1)) as mir:
        await mir.sync()
        mir.assert_same()
        # Without yielding to the loop, more events than the kernel queue holds.
        for index in range(queue_limit() // 2 + 100):
            (src / f"n{index}").write_bytes(b"x")
        await mir.sync()
        assert overflows
        mir.assert_same()


def test_initial_scan_is_ordered_and_batched(tmp_path: Path) -> None:
    for rel in ["b/c/d", "a", "b/e"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(rel.encode())
    os.link(tmp_path / "a", tmp_path / "b" / "a2")
    batches = list(initial_scan({ROOT: tmp_path}, {}, None, max_entries=2))
    assert all(len(batch) <= 2 for batch in batches)
    flat = [entry for batch in batches for entry in batch]
    assert ops(flat) == [
        (Op.FILE, "a"),
        (Op.MKDIR, "b"),
        (Op.LINK, "b/a2"),
        (Op.MKDIR, "b/c"),
        (Op.FILE, "b/c/d"),
        (Op.FILE, "b/e"),
    ]
    assert flat[2].target == "a"


def test_reader_resends_a_file_torn_by_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 1000)
    writes = iter([b"b" * 2000])

    class Racing(FileReader):
        def _check(self, fd: int, before: os.stat_result, final: bool) -> None:
            for data in writes:  # one concurrent write, during the first read only
                path.write_bytes(data)
            super()._check(fd, before, final)

    reader = Racing(None)
    entries = list(reader.entries(ROOT, "f", os.fspath(path)))
    assert [entry.data for entry in entries] == [b"b" * 2000]
    assert reader.stats.retried_reads == 1


# -- the property: any sequence of operations on src, then drain, gives dst == src ------------

NAMES = ["a", "b", "c"]
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
contents = st.binary(max_size=300) | st.sampled_from([b"", b"x" * 70_000])
operation = st.one_of(
    st.tuples(st.just("write"), paths, contents),
    st.tuples(st.just("append"), paths, contents),
    st.tuples(st.just("truncate"), paths, st.integers(0, 400)),
    st.tuples(st.just("mkdir"), paths),
    st.tuples(st.just("rmdir"), paths),
    st.tuples(st.just("delete"), paths),
    st.tuples(st.just("rename"), paths, paths),
    st.tuples(st.just("symlink"), paths, st.sampled_from(["a", "../x", "b/c"])),
    st.tuples(st.just("link"), paths, paths),
    st.tuples(st.just("chmod"), paths, st.sampled_from([0o600, 0o755, 0o640])),
    st.tuples(st.just("sync")),
)


def apply_op(root: Path, op: tuple[object, ...]) -> None:
    kind = op[0]
    path = root / str(op[1]) if len(op) > 1 else root
    try:
        if kind == "write":
            path.write_bytes(op[2])  # type: ignore[arg-type]
        elif kind == "append":
            with open(path, "ab") as handle:
                handle.write(op[2])  # type: ignore[arg-type]
        elif kind == "truncate":
            os.truncate(path, op[2])  # type: ignore[arg-type]
        elif kind == "mkdir":
            path.mkdir()
        elif kind == "rmdir":
            shutil.rmtree(path)
        elif kind == "delete":
            path.unlink()
        elif kind == "rename":
            os.rename(path, root / str(op[2]))
        elif kind == "symlink":
            os.symlink(str(op[2]), path)
        elif kind == "link":
            os.link(root / str(op[2]), path, follow_symlinks=False)
        elif kind == "chmod":
            os.chmod(path, op[2], follow_symlinks=False)  # type: ignore[arg-type]
    except (OSError, NotImplementedError):
        pass  # the operation is not possible in this state: so be it


async def replay(operations: list[tuple[object, ...]], with_manifest: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        dst.mkdir()
        manifest = Manifest(Path(tmp) / "m.db", block_size=4096) if with_manifest else None
        async with mirror(src, dst, manifest=manifest) as mir:
            for op in operations:
                if op[0] == "sync":
                    await mir.sync()
                else:
                    apply_op(src, op)
            await mir.sync()
            mir.assert_same()
        if manifest is not None:
            manifest.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=st.lists(operation, max_size=25), with_manifest=st.booleans())
def test_property_capture_then_apply_gives_the_same_tree(
    operations: list[tuple[object, ...]], with_manifest: bool
) -> None:
    asyncio.run(replay(operations, with_manifest))
