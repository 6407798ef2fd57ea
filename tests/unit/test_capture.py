"""The capture conformance suite: every backend on real trees, checked by applying.

Every test runs once per backend (inotify on ``tmp_path``; fanotify, as root, on a
loop-mounted ext4 of its own, see ``conftest.py``), mirrors a source tree ``src`` into
``dst`` through the real applier and compares the two with ``tests/treeutil.snapshot``;
a Hypothesis property does the same for random sequences of file operations.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capturefs import BACKENDS, Place, capture_base, event_queue_limit
from stead.replication.applier import Applier
from stead.replication.capture import make_capture
from stead.replication.capture.base import FileReader
from stead.replication.capture.fanotify import FanotifyCapture, probe
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
        backend: str = "inotify",
        filt: Filter | None = None,
        manifest: Manifest | None = None,
        scan_on_start: bool = False,
        on_overflow: Callable[[], None] | None = None,
    ) -> None:
        self.src, self.dst = src, dst
        self.capture = make_capture(
            {ROOT: src},
            {ROOT: filt or Filter()},
            manifest,
            "fanotify" if backend == "fanotify" else "inotify",
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
async def mirror(place: Place, **kwargs: object) -> AsyncIterator[Mirror]:
    mir = Mirror(place.src, place.dst, backend=place.backend, **kwargs)  # type: ignore[arg-type]
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


def events_to_overflow(backend: str) -> int:
    """Files to write, without yielding, for more events than the kernel queue holds.

    inotify queues three events per new file (create, modify, close); fanotify merges them
    into one.
    """
    limit = int(Path(f"/proc/sys/fs/{backend}/max_queued_events").read_text())
    return limit // 2 + 100 if backend == "inotify" else limit + 100


async def test_file_create_write_append_truncate(place: Place) -> None:
    src = place.src
    async with mirror(place) as mir:
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
        assert (place.dst / "f").read_bytes() == b"he"


async def test_chmod_chown_touch_send_meta(place: Place) -> None:
    src = place.src
    async with mirror(place) as mir:
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
        assert (place.dst / "f").stat().st_uid == 1234
        assert (place.dst / "f").stat().st_gid == 4321


async def test_renames_of_files_and_directories(place: Place) -> None:
    src = place.src
    async with mirror(place) as mir:
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


async def test_renames_back_and_forth_and_reused_names(place: Place) -> None:
    """Sequences that fanotify merges out of order while they are queued."""
    src = place.src
    async with mirror(place) as mir:
        (src / "d" / "sub").mkdir(parents=True)
        (src / "d" / "sub" / "f").write_bytes(b"in d")
        (src / "a").write_bytes(b"file a")
        await mir.sync()
        # The third rename repeats the first while it is still queued.
        for _ in range(2):
            os.rename(src / "a", src / "c")
            os.rename(src / "c", src / "a")
            os.rename(src / "d", src / "e")
            os.rename(src / "e", src / "d")
        os.rename(src / "a", src / "c")
        os.rename(src / "d", src / "e")
        await mir.sync()
        mir.assert_same()
        # A new directory takes the old name of one renamed before the queue was read.
        os.rename(src / "e", src / "moved")
        (src / "e").mkdir()
        (src / "e" / "x").write_bytes(b"in the new e")
        # Created and deleted, deleted and linked again: one queued event each.
        (src / "gone").write_bytes(b"short-lived")
        os.unlink(src / "gone")
        os.link(src / "c", src / "c2")
        os.unlink(src / "c")
        os.link(src / "c2", src / "c")
        await mir.sync()
        mir.assert_same()


async def test_delete_rmdir_and_moves_out_and_in(place: Place) -> None:
    src, outside = place.src, place.outside
    (outside / "in").mkdir(parents=True)
    (outside / "in" / "x").write_bytes(b"from outside")
    async with mirror(place) as mir:
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
        (outside / "ignored").write_bytes(b"changes outside the root are not sent")
        new = await mir.sync()
        assert ops(new) == [(Op.FILE, "in/y")]
        mir.assert_same()


async def test_symlinks_and_hard_links(place: Place) -> None:
    src = place.src
    async with mirror(place) as mir:
        (src / "f").write_bytes(b"shared")
        os.symlink("f", src / "s")
        os.symlink("/nowhere/at/all", src / "dangling")
        await mir.sync()
        os.link(src / "f", src / "g")
        new = await mir.sync()
        assert (Op.LINK, "g") in ops(new)
        mir.assert_same()
        assert (place.dst / "f").stat().st_ino == (place.dst / "g").stat().st_ino
        append(src / "g", b" more")  # through the second name
        await mir.sync()
        mir.assert_same()
        assert (place.dst / "f").stat().st_ino == (place.dst / "g").stat().st_ino


async def test_sparse_file_stays_sparse(place: Place) -> None:
    src = place.src
    async with mirror(place) as mir:
        (src / "sparse").write_bytes(b"head")
        write_at(src / "sparse", 64 * 1024 * 1024, b"tail")
        new = await mir.sync()
        assert sum(entry.payload_bytes() for entry in new) <= 2 * 65536
        mir.assert_same()
        assert (place.dst / "sparse").stat().st_blocks * 512 < 1024 * 1024


async def test_big_file_one_byte_change_is_one_block(place: Place, tmp_path: Path) -> None:
    src = place.src
    manifest = Manifest(tmp_path / "manifest.db")
    data = bytearray(os.urandom(10 * 1024 * 1024 + 123))
    async with mirror(place, manifest=manifest) as mir:
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


async def test_filters_keep_excluded_paths_out(place: Place) -> None:
    src = place.src
    filt = Filter(include=["data/**"], exclude=["*.tmp", "data/cache"])
    async with mirror(place, filt=filt) as mir:
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
        assert snapshot(place.dst) == wanted


async def test_non_utf8_names(place: Place) -> None:
    src = place.src
    async with mirror(place) as mir:
        write_at(os.path.join(os.fsencode(src), b"caf\xe9"), 0, b"bytes")
        new = await mir.sync()
        assert os.fsencode(new[0].path) == b"caf\xe9"
        mir.assert_same()


async def test_drain_returns_after_every_earlier_change(place: Place) -> None:
    src = place.src
    async with mirror(place) as mir:
        mir.capture.coalesce = 3600.0  # only drain can flush content changes now
        for index in range(200):
            (src / f"f{index}").write_bytes(b"%d" % index)
        await mir.sync()
        mir.assert_same()
        assert mir.capture.stats.entries == 200


@pytest.fixture
def default_event_queue(place: Place) -> Iterator[None]:
    """The kernel's default queue limit, whatever an agent raised it to."""
    with event_queue_limit(place.backend, 16384):
        yield


@pytest.mark.usefixtures("default_event_queue")
async def test_start_scan_and_overflow_rescan(place: Place) -> None:
    src = place.src
    (src / "before").mkdir()
    (src / "before" / "f").write_bytes(b"existed before the start")
    overflows: list[int] = []
    async with mirror(place, scan_on_start=True, on_overflow=lambda: overflows.append(1)) as mir:
        await mir.sync()
        mir.assert_same()
        # Without yielding to the loop, more events than the kernel queue holds.
        for index in range(events_to_overflow(place.backend)):
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


async def replay(
    backend: str, base: Path, operations: list[tuple[object, ...]], with_manifest: bool
) -> None:
    with tempfile.TemporaryDirectory(dir=base) as tmp, tempfile.TemporaryDirectory() as out:
        place = Place(backend, Path(tmp) / "src", Path(out) / "dst", Path(tmp) / "outside")
        place.src.mkdir()
        place.dst.mkdir()
        manifest = Manifest(Path(out) / "m.db", block_size=4096) if with_manifest else None
        async with mirror(place, manifest=manifest) as mir:
            for op in operations:
                if op[0] == "sync":
                    await mir.sync()
                else:
                    apply_op(place.src, op)
            await mir.sync()
            mir.assert_same()
        if manifest is not None:
            manifest.close()


@pytest.mark.parametrize("backend", BACKENDS)
@settings(
    max_examples=40,
    deadline=None,
    # The request only fetches the session's ext4 mount: nothing to reset per example.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(operations=st.lists(operation, max_size=25), with_manifest=st.booleans())
def test_property_capture_then_apply_gives_the_same_tree(
    backend: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    operations: list[tuple[object, ...]],
    with_manifest: bool,
) -> None:
    base = capture_base(backend, request, tmp_path)
    asyncio.run(replay(backend, base, operations, with_manifest))


# -- choosing a backend -------------------------------------------------------------------


@pytest.mark.root
def test_auto_picks_fanotify_on_a_mounted_ext4(
    ext4: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="stead.replication.capture.factory"):
        capture = make_capture({ROOT: ext4}, {}, None, "auto")
    assert isinstance(capture, FanotifyCapture)
    assert "capture: fanotify" in caplog.text
    # A root that shares its file system: a filesystem mark would see unrelated writes.
    (ext4 / "auto").mkdir(exist_ok=True)
    with caplog.at_level("INFO", logger="stead.replication.capture.factory"):
        shared = make_capture({ROOT: ext4 / "auto"}, {}, None, "auto")
    assert isinstance(shared, InotifyCapture)
    assert "not a mount point" in caplog.text


def test_auto_falls_back_to_inotify_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("INFO", logger="stead.replication.capture.factory"):
        capture = make_capture({ROOT: tmp_path / "missing"}, {}, None, "auto")
    assert isinstance(capture, InotifyCapture)
    assert "capture: inotify" in caplog.text
    assert "ENOENT" in (probe([str(tmp_path / "missing")]) or "")
    assert isinstance(make_capture({ROOT: tmp_path}, {}, None, "inotify"), InotifyCapture)


async def test_file_renames_cost_the_same_however_much_is_queued(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rename of a file looks its own names up; it never walks what is queued.

    Walking everything pending and queued for each rename made a stream of atomic saves
    (temp file, rename) quadratic in the backlog, until the agent's event loop stopped
    sending heartbeats and a passive took over.
    """
    from stead.replication.capture import core

    capture = InotifyCapture({ROOT: tmp_path}, {ROOT: Filter()}, None)
    for i in range(20_000):  # a backlog of changes and queued entries
        capture._touch(ROOT, f"busy/f{i}", core.CONTENT)
        capture._out.append(Entry(Op.DELETE, ROOT, f"gone/g{i}"))
    walked = 0
    real_under = core.under

    def counting(path: str, top: str) -> bool:
        nonlocal walked
        walked += 1
        return real_under(path, top)

    monkeypatch.setattr(core, "under", counting)
    for i in range(1_000):
        capture._touch(ROOT, f"d/.k{i}.tmp", core.CONTENT)
        capture._move((ROOT, f"d/.k{i}.tmp"), (ROOT, f"d/k{i}"), is_dir=False)
    assert walked <= 3 * 1_000  # a few lookups per rename, not 40,000
    assert (ROOT, "d/k7") in capture._pending and (ROOT, "d/.k7.tmp") not in capture._pending
    renames = [e for e in capture._out if isinstance(e, Entry) and e.op is Op.RENAME]
    assert len(renames) == 1_000 and renames[0].target == "d/k0"
    # A directory rename still moves everything below it.
    capture._move((ROOT, "busy"), (ROOT, "moved"), is_dir=True)
    assert (ROOT, "moved/f5") in capture._pending and (ROOT, "busy/f5") not in capture._pending
