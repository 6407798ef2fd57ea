"""The manifest's hash cache: a digest is reused only while a file's identity is unchanged.

Real files and real stat results; the hash function is counted to see what was read again.
Files cannot be made older than the walk without sleeping, so most tests pass a settling
time of zero (the settling rule has a test of its own).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stead.system.hashcache import HashCache
from stead.system.manifest import Scope, SystemManifest, build_manifest, hash_file

NOW_SETTLED = -(10**15)  # every ctime counts as settled


class Counting:
    def __init__(self) -> None:
        self.read: list[str] = []

    def __call__(self, path: str) -> tuple[bytes, int]:
        self.read.append(os.path.basename(path))
        return hash_file(path)


def _walk(root: Path, cache: HashCache) -> tuple[SystemManifest, list[str]]:
    counting = Counting()
    found = build_manifest(
        Scope(trees=(str(root),)), hash_file=counting, virtual=frozenset(), cache=cache
    )
    return found, sorted(counting.read)


def _cache(path: Path, settled_ns: int = NOW_SETTLED) -> HashCache:
    return HashCache(path, settled_ns=settled_ns)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "etc"
    root.mkdir()
    for name in ("a", "b", "c"):
        (root / name).write_text(f"{name} content\n")
    return root


def test_unchanged_files_are_not_read_again(root: Path, tmp_path: Path) -> None:
    store = tmp_path / "cache"
    first, read = _walk(root, _cache(store))
    assert read == ["a", "b", "c"]
    second, read = _walk(root, _cache(store))
    assert read == []
    assert second.entries == first.entries


def test_content_rewritten_with_mtime_put_back_is_read_again(root: Path, tmp_path: Path) -> None:
    """Same size, same mtime (utime), new content: the ctime gives it away."""
    store = tmp_path / "cache"
    _walk(root, _cache(store))
    before = os.stat(root / "b")
    (root / "b").write_text("B CONTENT\n")  # same length
    os.utime(root / "b", ns=(before.st_atime_ns, before.st_mtime_ns))
    found, read = _walk(root, _cache(store))
    assert read == ["b"]
    assert found.entries[str(root / "b")].digest == hash_file(str(root / "b"))[0]


def test_a_file_replaced_by_rename_is_read_again(root: Path, tmp_path: Path) -> None:
    store = tmp_path / "cache"
    _walk(root, _cache(store))
    (tmp_path / "new").write_text("c CONTENX\n")
    os.rename(tmp_path / "new", root / "c")  # another inode
    found, read = _walk(root, _cache(store))
    assert read == ["c"]
    assert found.entries[str(root / "c")].digest == hash_file(str(root / "c"))[0]


def _with(st: os.stat_result, name: str) -> os.stat_result:
    """``st`` with one field of the identity moved by one."""
    fields = list(st)
    extra = {"st_atime_ns": st.st_atime_ns, "st_mtime_ns": st.st_mtime_ns}
    extra["st_ctime_ns"] = st.st_ctime_ns
    if name in extra:
        extra[name] += 1
    else:
        fields[{"st_ino": 1, "st_dev": 2, "st_size": 6}[name]] += 1
    return os.stat_result(fields, extra)


@pytest.mark.parametrize("name", ["st_size", "st_mtime_ns", "st_ctime_ns", "st_ino", "st_dev"])
def test_any_one_field_of_the_identity_changed_misses(tmp_path: Path, name: str) -> None:
    (tmp_path / "f").write_text("x")
    st = os.lstat(tmp_path / "f")
    cache = _cache(tmp_path / "cache")
    cache.store("/f", st, b"d" * 32, listed_ns=st.st_ctime_ns)
    cache.save()
    again = _cache(tmp_path / "cache")
    assert again.lookup("/f", _with(st, name)) is None
    assert again.lookup("/f", st) == b"d" * 32


def test_a_file_changed_just_before_the_walk_is_not_kept(root: Path, tmp_path: Path) -> None:
    store = tmp_path / "cache"
    _walk(root, HashCache(store))  # the default settling time: these files are too new
    _, read = _walk(root, HashCache(store))
    assert read == ["a", "b", "c"]


def test_a_deleted_path_leaves_the_cache(root: Path, tmp_path: Path) -> None:
    store = tmp_path / "cache"
    _walk(root, _cache(store))
    (root / "a").unlink()
    _walk(root, _cache(store))
    assert sorted(_cache(store).previous) == [str(root / "b"), str(root / "c")]


def test_the_sizes_it_knows_are_a_hint_of_what_the_node_holds(root: Path, tmp_path: Path) -> None:
    """What a reclone tells the active it holds, without walking: malformed entries and
    paths outside the trees are left out."""
    import msgpack

    from stead.reclone.builtin import sizes_cached

    store = tmp_path / "cache"
    _walk(root, _cache(store))
    data = msgpack.unpackb(store.read_bytes())
    some = next(iter(data["entries"].values()))
    data["entries"]["/elsewhere/x"] = some
    data["entries"][str(root / "bad")] = [1, 2, 3, 4, 5, b"d"]
    data["entries"][str(root / "short")] = some[:40]
    store.write_bytes(msgpack.packb(data))
    assert len(_cache(store).sizes()) == 4
    assert sizes_cached(store, Scope(trees=(str(root),))) == {
        str(root / name): len(f"{name} content\n") for name in ("a", "b", "c")
    }
    assert sizes_cached(tmp_path / "none", Scope(trees=(str(root),))) == {}


@pytest.mark.parametrize(
    "blob", [b"", b"\x00garbage", b"\x81\xa7version\x02", b"\x81\xa7version\x01"]
)
def test_an_unreadable_cache_means_hashing_everything(
    root: Path, tmp_path: Path, blob: bytes
) -> None:
    store = tmp_path / "cache"
    store.write_bytes(blob)
    _, read = _walk(root, _cache(store))
    assert read == ["a", "b", "c"]
    _, read = _walk(root, _cache(store))  # and it is rewritten whole
    assert read == []


def test_a_drift_snapshot_with_the_cache_equals_one_without(root: Path, tmp_path: Path) -> None:
    from stead.system.snapshot import take_snapshot

    scope = Scope(trees=(str(root),))
    plain = take_snapshot("n", scope, "none", packages=False)
    cached = take_snapshot("n", scope, "none", packages=False, cache=tmp_path / "cache")
    assert cached.manifest is not None and plain.manifest is not None
    assert cached.manifest.entries == plain.manifest.entries
