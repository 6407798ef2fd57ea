"""The block manifest: records, diffs, renames of files and subtrees, persistence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stead.replication.manifest import HASH_SIZE, Manifest, block_hash, read_blocks

BLOCK = 4096


@pytest.fixture
def manifest(tmp_path: Path) -> Manifest:
    return Manifest(tmp_path / "manifest.db", block_size=BLOCK)


def _hashes(data: bytes) -> bytes:
    return b"".join(block_hash(data[i : i + BLOCK]) for i in range(0, len(data), BLOCK))


def test_diff_against_no_record_is_none(manifest: Manifest, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 3 * BLOCK)
    assert manifest.diff_blocks("r", "f", path, path.stat()) is None


def test_one_changed_byte_is_one_block(manifest: Manifest, tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = bytearray(os.urandom(5 * BLOCK + 100))
    path.write_bytes(data)
    manifest.record("r", "f", path.stat(), _hashes(bytes(data)))
    data[2 * BLOCK + 7] ^= 0xFF
    path.write_bytes(data)
    diff = manifest.diff_blocks("r", "f", path, path.stat())
    assert diff is not None
    changed, hashes = diff
    assert changed == [(2 * BLOCK, bytes(data[2 * BLOCK : 3 * BLOCK]))]
    assert hashes == _hashes(bytes(data))
    assert len(hashes) == 6 * HASH_SIZE


def test_growth_sends_the_new_tail(manifest: Manifest, tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(2 * BLOCK)
    path.write_bytes(data)
    manifest.record("r", "f", path.stat(), _hashes(data))
    path.write_bytes(data + b"tail")
    diff = manifest.diff_blocks("r", "f", path, path.stat())
    assert diff is not None
    assert diff[0] == [(2 * BLOCK, b"tail")]


def test_holes_are_not_read(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    with open(path, "wb") as handle:
        handle.seek(10 * BLOCK)
        handle.write(b"end")
    fd = os.open(path, os.O_RDONLY)
    try:
        blocks = list(read_blocks(fd, os.fstat(fd).st_size, BLOCK))
    finally:
        os.close(fd)
    assert len(blocks) == 11
    assert [offset for offset, data in blocks if data is not None] == [10 * BLOCK]


def test_rename_moves_files_and_subtrees(manifest: Manifest, tmp_path: Path) -> None:
    st = (tmp_path).stat()
    for rel in ["d/a", "d/sub/b", "d2/c", "dx", "e"]:
        manifest.record("r", rel, st, rel.encode())
    manifest.record("other", "d/a", st, b"other root")
    manifest.rename("r", "d", "e")  # replaces what was at e
    found = {rel: manifest.lookup("r", rel) for rel in ["d/a", "e/a", "e/sub/b", "dx", "e", "d2/c"]}
    assert found["d/a"] is None
    assert found["e"] is None
    assert found["e/a"] is not None and found["e/a"].hashes == b"d/a"
    assert found["e/sub/b"] is not None and found["e/sub/b"].hashes == b"d/sub/b"
    assert found["dx"] is not None and found["d2/c"] is not None  # not under "d/"
    assert manifest.lookup("other", "d/a") is not None
    manifest.forget_tree("r", "e")
    assert manifest.lookup("r", "e/sub/b") is None
    assert manifest.count() == 3


def test_records_survive_reopening_and_block_size_change(tmp_path: Path) -> None:
    db = tmp_path / "m.db"
    first = Manifest(db, block_size=BLOCK)
    name = os.fsdecode(b"caf\xe9")  # not UTF-8: stored as bytes
    first.record("r", name, tmp_path.stat(), b"h" * HASH_SIZE)
    first.commit()
    first.close()
    again = Manifest(db, block_size=BLOCK)
    assert again.lookup("r", name) is not None
    again.close()
    resized = Manifest(db, block_size=2 * BLOCK)  # digests of another block size are useless
    assert resized.lookup("r", name) is None
    resized.close()


def test_only_files_of_two_blocks_need_records(manifest: Manifest) -> None:
    assert not manifest.needs_record(2 * BLOCK - 1)
    assert manifest.needs_record(2 * BLOCK)
    with pytest.raises(ValueError, match="power of two"):
        Manifest(Path("/nonexistent/x.db"), block_size=5000)


def test_forgets_wait_in_a_batch_and_every_query_sees_them(
    manifest: Manifest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forget waits to be executed with others; lookups, records, renames, counts and
    commits all see it first, in the order the calls were made."""
    st = tmp_path.stat()
    for rel in ["a", "b", "c", "d/x"]:
        manifest.record("r", rel, st, rel.encode())
    manifest.commit()
    manifest.forget("r", "a")
    assert manifest.lookup("r", "a") is None  # not yet executed, already invisible
    manifest.forget("r", "b")
    manifest.record("r", "b", st, b"b again")  # forget, then record: the record stands
    assert manifest.lookup("r", "b") is not None
    manifest.forget("r", "x")  # a forget of nothing at all
    manifest.forget("r", "e")
    manifest.record("r", "d/x", st, b"d/x")
    manifest.rename("r", "d", "e")  # the waiting forget of "e" runs before the move
    assert manifest.lookup("r", "e/x") is not None
    assert manifest.count() == 3  # b, c, e/x
    manifest.forget("r", "c")
    manifest.commit()
    manifest.close()
    again = Manifest(tmp_path / "manifest.db", block_size=BLOCK)
    assert again.lookup("r", "c") is None  # the commit executed it durably
    assert again.count() == 2
    # Past the batch size, forgets are executed without waiting for a commit.
    monkeypatch.setattr("stead.replication.manifest.FORGET_BATCH", 3)
    for rel in ["p", "q"]:
        again.record("r", rel, st, rel.encode())
    for rel in ["b", "p", "q"]:
        again.forget("r", rel)
    assert again._forgotten == set()
    assert again.count() == 1  # e/x
    again.close()


def test_the_forget_of_a_path_that_never_had_a_record_does_nothing(
    manifest: Manifest, tmp_path: Path
) -> None:
    """Small files have no record: their forgets are answered by the filter, no DELETE."""
    st = tmp_path.stat()
    manifest.record("r", "big", st, b"h")
    manifest.record("r", "d/big", st, b"h")
    manifest.commit()
    for i in range(1000):
        manifest.forget("r", f"small{i}")
    assert manifest._forgotten == set()
    manifest.forget("r", "big")  # a record: forgotten as before
    assert manifest.lookup("r", "big") is None
    manifest.rename("r", "d", "e")  # moved rows are known under their new names
    manifest.forget("r", "e/big")
    assert manifest.lookup("r", "e/big") is None
    manifest.commit()
    manifest.close()
    again = Manifest(tmp_path / "manifest.db", block_size=BLOCK)
    again.record("r", "kept", st, b"h")
    again.commit()
    again.close()
    third = Manifest(tmp_path / "manifest.db", block_size=BLOCK)  # filled from the table
    third.forget("r", "kept")
    assert third.lookup("r", "kept") is None
    assert third.count() == 0
    third.close()
