"""The applier: each entry kind, replacements, refusals, replay after a crash, full disk."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from stead.errors import ApplyError, OutOfSync, UnsafePath
from stead.replication.applier import Applier
from stead.replication.entries import Entry, Op

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from treeutil import snapshot

ROOT = "/srv/lab"
MTIME = 1_700_000_000_123_456_789


def file(path: str, data: bytes, **kw: Any) -> Entry:
    kw.setdefault("size", len(data))
    kw.setdefault("mode", 0o640)
    kw.setdefault("mtime_ns", MTIME)
    return Entry(Op.FILE, ROOT, path, data=data, **kw)


def op(kind: Op, path: str, **kw: Any) -> Entry:
    return Entry(kind, ROOT, path, **kw)


class Node:
    """A passive's root plus an applier, with the agent's commit and refusal callbacks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.applier = Applier({ROOT: path})
        self.commits: list[int] = []
        self.refused: list[tuple[int, Entry, Exception]] = []
        self.seq = 0
        self.raise_out_of_sync = True  # most tests look at the OutOfSync itself

    def records(self, entries: tuple[Entry, ...]) -> list[tuple[int, Entry]]:
        out = []
        for entry in entries:
            self.seq += 1
            out.append((self.seq, entry))
        return out

    def run(self, *entries: Entry) -> int:
        return self.apply(self.records(entries))

    def apply(self, records: list[tuple[int, Entry]]) -> int:
        return self.applier.apply(records, commit=self.commits.append, on_refused=self._refused)

    def _refused(self, seq: int, entry: Entry, exc: Exception) -> None:
        if isinstance(exc, OutOfSync) and self.raise_out_of_sync:
            raise exc
        self.refused.append((seq, entry, exc))

    def restart(self) -> None:
        """A crash: a new applier on the same disk, which recovers first."""
        self.applier.close()
        self.applier = Applier({ROOT: self.path})
        self.applier.recover()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path / "root")
    yield n
    n.applier.close()


def staging(node: Node) -> list[str]:
    return sorted(os.listdir(node.path / ".stead" / "staging"))


# -- each entry kind ---------------------------------------------------------------------


def test_file_is_placed_with_metadata(node: Node) -> None:
    assert node.run(file("d/a.txt", b"hello", uid=1234, gid=4321)) == 1
    st = os.lstat(node.path / "d/a.txt")
    assert (node.path / "d/a.txt").read_bytes() == b"hello"
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert (st.st_uid, st.st_gid, st.st_mtime_ns) == (1234, 4321, MTIME)
    assert stat.S_IMODE(os.stat(node.path / "d").st_mode) == 0o755
    assert node.commits == [1]
    assert staging(node) == []  # the commit covered it
    stats = node.applier.stats
    assert (stats.files_written, stats.bytes_written, stats.entries_applied) == (1, 5, 1)


def test_multi_part_file_across_batches(node: Node) -> None:
    node.run(file("big", b"a" * 10, size=30, last=False))
    assert not (node.path / "big").exists()
    assert len(staging(node)) == 1
    node.run(file("big", b"b" * 10, offset=10, first=False, last=False, size=30))
    assert not (node.path / "big").exists()
    node.run(file("big", b"c" * 10, offset=20, first=False, size=30))
    assert (node.path / "big").read_bytes() == b"a" * 10 + b"b" * 10 + b"c" * 10
    assert staging(node) == []


def test_part_without_staging_file_is_out_of_sync(node: Node) -> None:
    with pytest.raises(OutOfSync):
        node.run(file("x", b"tail", offset=4, first=False, size=8))
    assert not (node.path / "x").exists()


def test_sparse_file_keeps_holes(node: Node) -> None:
    size = 64 << 20
    node.run(
        file("sparse", b"A" * 4096, size=size, last=False),
        file("sparse", b"B" * 4096, offset=32 << 20, first=False, size=size),
    )
    st = os.stat(node.path / "sparse")
    assert st.st_size == size
    assert st.st_blocks * 512 < 1 << 20
    with open(node.path / "sparse", "rb") as handle:
        assert handle.read(4096) == b"A" * 4096
        handle.seek(32 << 20)
        assert handle.read(4097) == b"B" * 4096 + b"\0"


def test_same_file_twice_in_one_batch(node: Node) -> None:
    node.run(file("f", b"one"), op(Op.LINK, "g", target="f"), file("f", b"second"))
    assert (node.path / "f").read_bytes() == b"second"
    assert (node.path / "g").read_bytes() == b"one"


def test_delta_writes_blocks_and_truncates(node: Node) -> None:
    node.run(file("db", b"0123456789"))
    node.run(op(Op.DELTA, "db", blocks=((2, b"ab"), (12, b"Z")), size=13, mtime_ns=5))
    assert (node.path / "db").read_bytes() == b"01ab456789\0\0Z"
    assert os.stat(node.path / "db").st_mtime_ns == 5
    node.run(op(Op.DELTA, "db", blocks=(), size=4))
    assert (node.path / "db").read_bytes() == b"01ab"


@pytest.mark.parametrize("setup", ["missing", "dir", "symlink"])
def test_delta_on_wrong_thing_is_out_of_sync(node: Node, setup: str) -> None:
    node.path.mkdir()
    if setup == "dir":
        (node.path / "db").mkdir()
    elif setup == "symlink":
        (node.path / "db").symlink_to("/etc/passwd")
    with pytest.raises(OutOfSync):
        node.run(op(Op.DELTA, "db", blocks=((0, b"x"),), size=1))


def test_mkdir(node: Node) -> None:
    node.run(op(Op.MKDIR, "a/b", mode=0o750, uid=7, mtime_ns=MTIME))
    st = os.stat(node.path / "a/b")
    assert stat.S_ISDIR(st.st_mode)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_mtime_ns) == (0o750, 7, MTIME)
    (node.path / "a/b/keep").write_bytes(b"k")
    node.run(op(Op.MKDIR, "a/b", mode=0o700))  # exists: only metadata changes
    assert (node.path / "a/b/keep").exists()
    assert stat.S_IMODE(os.stat(node.path / "a/b").st_mode) == 0o700


def test_symlink_is_never_followed(node: Node) -> None:
    node.run(op(Op.SYMLINK, "s", target="/etc/passwd", uid=99, mtime_ns=MTIME))
    st = os.lstat(node.path / "s")
    assert os.readlink(node.path / "s") == "/etc/passwd"
    assert (st.st_uid, st.st_mtime_ns) == (99, MTIME)
    passwd = os.stat("/etc/passwd")
    node.run(op(Op.META, "s", uid=98, mode=0o600))  # chmod skipped on a symlink
    assert os.lstat(node.path / "s").st_uid == 98
    assert os.stat("/etc/passwd") == passwd
    node.run(op(Op.SYMLINK, "s", target="elsewhere"))
    assert os.readlink(node.path / "s") == "elsewhere"


def test_hard_link(node: Node) -> None:
    node.run(file("a", b"shared"), file("b", b"old"))
    node.run(op(Op.LINK, "b", target="a"), op(Op.LINK, "c/d", target="a"))
    ino = os.stat(node.path / "a").st_ino
    assert os.stat(node.path / "b").st_ino == ino
    assert os.stat(node.path / "c/d").st_ino == ino
    assert os.stat(node.path / "a").st_nlink == 3
    node.run(op(Op.LINK, "b", target="a"))  # again: no change
    assert os.stat(node.path / "a").st_nlink == 3
    with pytest.raises(OutOfSync):
        node.run(op(Op.LINK, "e", target="nope"))


def test_content_of_a_linked_inode_goes_in_place(node: Node) -> None:
    """A FILE flagged linked keeps the passive's inode whole (the active sends a copy when
    it no longer knows the inode's first name, e.g. after a restart)."""
    node.run(file("a", b"old"), op(Op.LINK, "b", target="a"))
    node.run(file("a", b"new!", linked=True))
    assert (node.path / "b").read_bytes() == b"new!"
    assert os.path.samestat(os.stat(node.path / "a"), os.stat(node.path / "b"))
    assert stat.S_IMODE(os.stat(node.path / "b").st_mode) == 0o640
    assert os.stat(node.path / "b").st_mtime_ns == MTIME
    node.run(file("b", b"a" * 10, size=25, last=False, linked=True))
    node.run(file("b", b"b" * 5, offset=20, first=False, size=25, linked=True))
    assert (node.path / "a").read_bytes() == b"a" * 10 + bytes(10) + b"b" * 5
    assert os.stat(node.path / "a").st_nlink == 2
    assert staging(node) == []


def test_linked_flag_replays_and_only_joins_what_is_linked_here(node: Node) -> None:
    node.run(file("a", b"old"), op(Op.LINK, "b", target="a"), file("c", b"alone"))
    tail = node.records((file("a", b"again", linked=True), file("c", b"linked", linked=True)))
    node.applier.apply(tail)  # applied, but the crash comes before the mark is stored
    node.restart()
    node.apply(tail)
    assert (node.path / "b").read_bytes() == b"again"
    assert os.stat(node.path / "a").st_nlink == 2
    assert (node.path / "c").read_bytes() == b"linked"  # one name here: replaced as usual
    node.run(file("a", b"split"))  # not linked on the active any more: a new inode
    assert (node.path / "b").read_bytes() == b"again"
    assert os.stat(node.path / "b").st_nlink == 1


def test_delete_file_symlink_tree_and_missing(node: Node, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_bytes(b"p")
    node.run(file("t/a/f", b"1"), file("f", b"2"), op(Op.SYMLINK, "t/out", target=str(outside)))
    (node.path / "t/a/evil").symlink_to(outside)
    node.run(op(Op.DELETE, "f"), op(Op.DELETE, "t"), op(Op.DELETE, "never/was"))
    assert snapshot(node.path) == {}
    assert (outside / "precious").read_bytes() == b"p"
    node.run(op(Op.DELETE, "t"))  # idempotent


def test_rename_commits_first_when_a_replay_could_undo_it(node: Node) -> None:
    node.run(file("a", b"A"), file("b", b"B"))
    first = node.seq
    # Replaying [delete b, rename a->b] would delete the renamed data: a commit between.
    node.run(op(Op.DELETE, "b"), op(Op.RENAME, "a", target="b"), file("c", b"C"))
    assert node.commits == [first, first + 1, first + 3]
    assert (node.path / "b").read_bytes() == b"A"
    assert not (node.path / "a").exists()
    node.run(op(Op.RENAME, "a", target="b"))  # source gone: no-op
    assert (node.path / "b").read_bytes() == b"A"
    # Replaying [rename b->d, file b] would move the new b over d: a commit between.
    before = node.seq
    node.run(op(Op.RENAME, "b", target="d"), file("b", b"new"))
    assert node.commits[-2:] == [before + 1, before + 2]
    assert (node.path / "d").read_bytes() == b"A" and (node.path / "b").read_bytes() == b"new"


def test_atomic_saves_share_group_commits(node: Node) -> None:
    """What capture sends for an application that saves atomically (write a temporary
    name, rename it over the real one): each rename, then the content under the new name."""
    entries = []
    for i in range(200):
        entries += [op(Op.RENAME, f".k{i}.tmp", target=f"k{i}"), file(f"k{i}", b"v%d" % i)]
    node.run(*entries)
    assert len(node.commits) == 1  # not two per save
    assert node.applier.stats.durability_passes <= 3
    assert (node.path / "k199").read_bytes() == b"v199"


def test_rename_over_directories(node: Node) -> None:
    node.run(file("src/x", b"x"), file("dst/y", b"y"), file("f", b"f"))
    node.run(op(Op.RENAME, "src", target="dst"))
    assert snapshot(node.path).keys() == {"dst", "dst/x", "f"}
    node.run(op(Op.RENAME, "f", target="dst"))
    assert (node.path / "dst").read_bytes() == b"f"
    node.run(op(Op.MKDIR, "d2"), op(Op.RENAME, "d2", target="dst"))
    assert (node.path / "dst").is_dir()


def test_meta(node: Node) -> None:
    node.run(file("f", b"x"), op(Op.MKDIR, "d"))
    node.run(op(Op.META, "f", mode=0o4755, uid=5, gid=6, mtime_ns=MTIME))
    st = os.stat(node.path / "f")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4755, 5, 6)
    assert st.st_mtime_ns == MTIME
    node.run(op(Op.META, "d", mode=0o711))
    assert stat.S_IMODE(os.stat(node.path / "d").st_mode) == 0o711
    with pytest.raises(OutOfSync):
        node.run(op(Op.META, "missing", mode=0o600))


# -- replacements ------------------------------------------------------------------------


@pytest.mark.parametrize("before", ["file", "dir", "symlink"])
@pytest.mark.parametrize("after", ["file", "dir", "symlink"])
def test_replacement(node: Node, before: str, after: str) -> None:
    make = {
        "file": file("p", b"content"),
        "dir": op(Op.MKDIR, "p", mode=0o755),
        "symlink": op(Op.SYMLINK, "p", target="t"),
    }
    node.run(make[before])
    if before == "dir":
        node.run(file("p/inner/x", b"x"))
    node.run(make[after])
    record = snapshot(node.path)["p"]
    assert record[0] == after
    if after != "dir":
        assert not any(key.startswith("p/") for key in snapshot(node.path))


# -- refusals ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        file("../escape", b"x"),
        file("/abs/olute", b"x"),
        file("a\x00b", b"x"),
        file("a/../../b", b"x"),
        file(".stead/staging/x", b"x"),
        op(Op.DELETE, ".stead"),
        op(Op.RENAME, "a", target="../b"),
        op(Op.LINK, "a", target="/etc/shadow"),
        Entry(Op.FILE, "/not/protected", "x", data=b"x", size=1),
    ],
)
def test_unsafe_entries_are_refused_and_skipped(node: Node, entry: Entry) -> None:
    node.run(entry, file("ok", b"fine"))
    assert [(seq, exc.__class__) for seq, _, exc in node.refused] == [(1, UnsafePath)]
    assert snapshot(node.path) == {"ok": snapshot(node.path)["ok"]}
    assert node.commits[-1] == 2
    assert node.applier.stats.refused == 1


def test_symlink_on_the_way_creates_nothing_outside(node: Node, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    node.run(op(Op.SYMLINK, "a", target=str(outside)), op(Op.SYMLINK, "r", target="../outside"))
    node.run(
        file("a/x", b"x"),
        op(Op.MKDIR, "r/d"),
        op(Op.SYMLINK, "a/s", target="x"),
        op(Op.RENAME, "a", target="r/moved"),
        op(Op.DELETE, "a/x"),
    )
    assert len(node.refused) == 5
    assert list(outside.iterdir()) == []
    assert os.readlink(node.path / "a") == str(outside)


def test_refusal_raises_without_callback(node: Node) -> None:
    with pytest.raises(UnsafePath):
        node.applier.apply([(1, file("../x", b"x"))])


def test_non_utf8_names(node: Node) -> None:
    name = os.fsdecode(b"caf\xe9")
    node.run(op(Op.MKDIR, name), file(f"{name}/{name}", b"bytes"))
    assert os.listdir(os.fsencode(node.path / name)) == [b"caf\xe9"]
    assert f"{name}/{name}" in snapshot(node.path)


def test_records_must_increase(node: Node) -> None:
    with pytest.raises(ValueError, match="increasing"):
        node.applier.apply([(2, file("a", b"")), (2, file("b", b""))])
    assert node.applier.apply([]) == -1


# -- crash and replay --------------------------------------------------------------------


class Crash(Exception):
    """The process died while the agent was storing an applied mark."""


def test_replay_after_rename_keeps_renamed_data(tmp_path: Path) -> None:
    setup = (file("a", b"A"), file("b", b"B"))
    tail = (op(Op.DELETE, "b"), op(Op.RENAME, "a", target="b"), file("a", b"N"))
    reference = Node(tmp_path / "reference")
    reference.run(*setup)
    reference.run(*tail)
    want = snapshot(reference.path)
    for crash_at in range(3):  # the tail commits before the rename, after it, and at the end
        node = Node(tmp_path / f"crash{crash_at}")
        node.run(*setup)
        records = node.records(tail)
        stored = list(node.commits)
        limit = len(stored) + crash_at

        def commit(seq: int, stored: list[int] = stored, limit: int = limit) -> None:
            if len(stored) == limit:
                raise Crash
            stored.append(seq)

        with pytest.raises(Crash):
            node.applier.apply(records, commit=commit)
        node.restart()
        node.apply([r for r in records if r[0] > stored[-1]])
        assert snapshot(node.path) == want, crash_at


def test_replay_of_multi_part_file_after_rename_into_place(node: Node) -> None:
    node.run(file("m", b"first-", size=12, last=False))
    tail = node.records(
        (
            file("m", b"second", offset=6, first=False, size=12),
            op(Op.DELTA, "m", blocks=((0, b"F"),), size=12, mtime_ns=MTIME),
            op(Op.MKDIR, "d"),
        )
    )
    node.applier.apply(tail)  # applied, but the crash comes before the mark is stored
    want = snapshot(node.path)
    assert (node.path / "m").read_bytes() == b"First-second"
    node.restart()
    node.apply(tail)
    assert snapshot(node.path) == want


def test_replay_tolerates_paths_a_later_entry_removed(node: Node) -> None:
    node.run(file("f", b"data"))
    tail = node.records(
        (
            op(Op.DELTA, "f", blocks=((0, b"D"),), size=4),
            op(Op.META, "f", mode=0o600),
            op(Op.DELETE, "f"),
            file("g/h", b"h"),
            op(Op.DELETE, "g"),
            op(Op.MKDIR, "g"),
        )
    )
    node.applier.apply(tail)
    want = snapshot(node.path)
    node.restart()
    node.apply(tail)
    assert snapshot(node.path) == want
    with pytest.raises(OutOfSync):  # past the replay bound, strict again
        node.run(op(Op.META, "f", mode=0o600))


def test_recover_removes_temporaries_keeps_staging(node: Node) -> None:
    node.run(file("part", b"x", size=2, last=False))
    staged = staging(node)
    (node.path / ".stead/staging/tmp-orphan").symlink_to("x")
    node.restart()
    assert staging(node) == staged
    node.run(file("part", b"y", offset=1, first=False, size=2))
    assert (node.path / "part").read_bytes() == b"xy"


# -- full disk ---------------------------------------------------------------------------


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


@pytest.mark.root
def test_disk_full_raises_retryable_without_commit(tiny_fs: Path) -> None:
    node = Node(tiny_fs / "root")
    try:
        node.run(file("keep", b"old content"))
        before = snapshot(node.path)
        with pytest.raises(ApplyError) as caught:
            node.run(file("huge", b"z" * (2 << 20)), file("keep", b"new content"))
        assert caught.value.retryable
        assert "no space" in str(caught.value)
        assert node.commits == [1]
        assert snapshot(node.path) == before
        assert staging(node) == []  # the partial staging file was freed
        node.run(file("keep", b"new content"))  # space is back
        assert (node.path / "keep").read_bytes() == b"new content"
    finally:
        node.applier.close()


def test_out_of_sync_entry_is_skipped_and_reported_and_the_queue_moves_on(node: Node) -> None:
    """A passive that drifted must not hold every later entry (and the repairs) behind one."""
    node.raise_out_of_sync = False
    last = node.run(
        Entry(Op.DELTA, ROOT, "gone", blocks=((0, b"x"),), size=1),
        Entry(Op.FILE, ROOT, "after", data=b"later entries still apply", size=25),
    )
    assert last == 2
    assert [(seq, type(exc)) for seq, _, exc in node.refused] == [(1, OutOfSync)]
    assert (node.path / "after").read_bytes() == b"later entries still apply"
    assert not (node.path / "gone").exists()
    assert node.commits[-1] == 2


def test_two_whole_versions_of_one_file_in_one_batch(node: Node) -> None:
    node.run(
        Entry(Op.FILE, ROOT, "a", data=b"one", size=3),
        Entry(Op.RENAME, ROOT, "a", target="b"),
        Entry(Op.FILE, ROOT, "a", data=b"two!", size=4, mode=0o600, mtime_ns=10**18),
        Entry(Op.FILE, ROOT, "a", data=b"three", size=5, mode=0o640, mtime_ns=2 * 10**18),
    )
    assert (node.path / "b").read_bytes() == b"one"
    assert (node.path / "a").read_bytes() == b"three"
    st = (node.path / "a").stat()
    assert (st.st_mode & 0o777, st.st_mtime_ns) == (0o640, 2 * 10**18)
    assert not node.refused


# -- whole files staged without a name (O_TMPFILE) ----------------------------------------


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


class Calls:
    """Counts the calls of one ``os`` function (``rename``: a new whole file needs none, it
    is linked straight in; ``fchown``: a file born with its owner needs none)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.count = 0
        real = getattr(os, name)

        def counting(*args: Any, **kw: Any) -> Any:
            self.count += 1
            return real(*args, **kw)

        monkeypatch.setattr(os, name, counting)


def test_new_whole_files_are_linked_in_without_a_staging_name(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    renames = Calls(monkeypatch, "rename")
    entries = [file(f"d{i % 3}/f{i}", b"%d" % i, uid=1234, gid=4321) for i in range(50)]
    node.run(*entries)
    assert renames.count == 0
    assert staging(node) == []
    for i in range(50):
        path = node.path / f"d{i % 3}/f{i}"
        st = os.lstat(path)
        assert path.read_bytes() == b"%d" % i
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 1234, 4321)
        assert (st.st_mtime_ns, st.st_nlink) == (MTIME, 1)
    assert node.applier.stats.files_written == 50


def test_whole_file_over_something_is_still_replaced_atomically(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.run(file("a", b"old"), op(Op.MKDIR, "b"), file("b/x", b"in a directory"))
    renames = Calls(monkeypatch, "rename")
    node.run(file("a", b"new"), file("b", b"a file now"))
    assert renames.count >= 2  # each linked to its staging name, renamed over the old
    assert (node.path / "a").read_bytes() == b"new"
    assert (node.path / "b").read_bytes() == b"a file now"
    assert staging(node) == []


def test_without_o_tmpfile_whole_files_are_staged_by_name(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stead.replication import applier as applier_module
    from stead.replication import apply_files

    def refused(dir_fd: int, mode: int = 0o600) -> int:
        raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE here")

    for module in (applier_module, apply_files):  # the probe, and every file after it
        monkeypatch.setattr(module, "open_unnamed", refused)
    renames = Calls(monkeypatch, "rename")
    node.run(*[file(f"f{i}", b"x" * i) for i in range(5)])
    assert renames.count == 5
    assert [(node.path / f"f{i}").read_bytes() for i in range(5)] == [b"x" * i for i in range(5)]
    assert staging(node) == []


def test_only_so_many_unnamed_files_are_held_open(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    node.applier._unnamed_cap = 3
    renames = Calls(monkeypatch, "rename")
    node.run(*[file(f"f{i}", b"%d" % i) for i in range(10)])
    assert renames.count == 7
    assert [(node.path / f"f{i}").read_bytes() for i in range(10)] == [b"%d" % i for i in range(10)]


def test_whole_file_removes_an_unfinished_staging_file_of_its_path(node: Node) -> None:
    node.run(file("big", b"first part", size=20, last=False))
    assert len(staging(node)) == 1
    node.run(file("big", b"whole now"))
    assert (node.path / "big").read_bytes() == b"whole now"
    assert staging(node) == []
    node.restart()  # after a start, whatever staging held counts as unfinished too
    node.run(file("big", b"part", size=8, last=False))
    node.restart()
    node.run(file("big", b"whole again"))
    assert staging(node) == []


def test_replay_of_linked_in_files_converges(node: Node) -> None:
    records = node.records((file("a", b"one"), file("d/b", b"two"), op(Op.DELETE, "a")))
    node.applier.apply(records)  # applied, never committed: a crash now replays it
    node.restart()
    node.apply(records)
    assert not (node.path / "a").exists()
    assert (node.path / "d/b").read_bytes() == b"two"
    assert staging(node) == []


def test_no_descriptor_is_left_open(node: Node, tmp_path: Path) -> None:
    node.run(file("warm", b"up"))  # the root's own descriptors are open from here on
    before = open_fds()
    node.raise_out_of_sync = False
    outside = tmp_path / "outside"
    outside.mkdir()
    (node.path / "link").symlink_to(outside)
    node.run(
        file("a", b"placed"),
        file("link/escape", b"refused: a symlink on the way"),
        Entry(Op.DELTA, ROOT, "gone", blocks=((0, b"x"),), size=1),
        file("b", b"placed too"),
    )
    assert [type(exc) for _, _, exc in node.refused] == [UnsafePath, OutOfSync]
    assert not (outside / "escape").exists()
    assert open_fds() == before


@pytest.mark.root
def test_disk_full_leaves_no_unnamed_file_open(tiny_fs: Path) -> None:
    node = Node(tiny_fs / "root")
    try:
        node.run(file("keep", b"old"))
        before = open_fds()
        many = [file(f"f{i}", b"z" * 65536) for i in range(40)]  # 2.5 MiB into 1 MiB
        with pytest.raises(ApplyError):
            node.run(*many)
        assert open_fds() == before
        assert sorted(os.listdir(node.path)) == [".stead", "keep"]
        free = os.statvfs(tiny_fs)
        assert free.f_bfree * free.f_bsize > 900 * 1024  # the unnamed files were freed
    finally:
        node.applier.close()


def test_a_new_file_already_owned_right_is_not_chowned(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    chowns = Calls(monkeypatch, "fchown")
    me = (os.geteuid(), os.getegid())
    node.run(*[file(f"mine{i}", b"x", uid=me[0], gid=me[1]) for i in range(5)])
    assert chowns.count == 0
    node.run(file("gid-only", b"x", gid=me[1]), file("no-owner", b"x"))
    assert chowns.count == 0
    for name in ("mine0", "gid-only", "no-owner"):
        st = os.lstat(node.path / name)
        assert (st.st_uid, st.st_gid) == me


@pytest.mark.root
def test_the_owner_a_new_file_is_born_with_is_seen_not_assumed(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a set-group-ID tree a new file takes the directory's group: an entry naming the
    agent's own group still needs its chown."""
    node.path.mkdir()
    os.chown(node.path, 0, 4321)
    os.chmod(node.path, 0o2755)
    chowns = Calls(monkeypatch, "fchown")
    node.run(file("a", b"x", uid=0, gid=0), file("b", b"y", uid=0, gid=4321))
    assert chowns.count == 1
    assert os.lstat(node.path / "a").st_gid == 0
    assert os.lstat(node.path / "b").st_gid == 4321
    chowns.count = 0
    node.run(file("c", b"z", uid=1234, gid=4321))  # someone else's: chowned
    assert chowns.count == 1
    assert (os.lstat(node.path / "c").st_uid, os.lstat(node.path / "c").st_gid) == (1234, 4321)


def test_where_an_unnamed_file_cannot_be_named_files_are_staged_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No capability to link a descriptor and no /proc: found out before any data is
    staged unnamed (such a file could not be placed), and nothing is lost."""
    from stead.replication import applier as applier_module
    from stead.replication import apply_files

    def refused(fd: int, dir_fd: int, name: str) -> None:
        raise FileNotFoundError(errno.ENOENT, "no /proc here", f"/proc/self/fd/{fd}")

    for module in (applier_module, apply_files):  # the probe, and every naming after it
        monkeypatch.setattr(module, "name_unnamed", refused)
    node = Node(tmp_path / "root")
    try:
        node.run(*[file(f"f{i}", b"%d" % i) for i in range(5)])
        assert [(node.path / f"f{i}").read_bytes() for i in range(5)] == [
            b"%d" % i for i in range(5)
        ]
        assert staging(node) == []
        assert not node.applier._roots[ROOT].unnamed
    finally:
        node.applier.close()
