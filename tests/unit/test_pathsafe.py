"""pathsafe: walks that never follow a symlink and never leave the root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from stead.errors import UnsafePath
from stead.replication.pathsafe import RootDir, split_relative


@pytest.mark.parametrize(
    "path",
    ["", "/etc/passwd", "..", "a/../b", "a/./b", ".", "a//b", "a/", "a\x00b", "../outside"],
)
def test_split_relative_refuses(path: str) -> None:
    with pytest.raises(UnsafePath):
        split_relative(path)


def test_split_relative_accepts_non_utf8() -> None:
    name = os.fsdecode(b"caf\xe9")
    assert split_relative(f"d/{name}") == ["d", name]


def test_open_parent_creates_missing_dirs(tmp_path: Path) -> None:
    with RootDir(tmp_path) as root:
        fd, name = root.open_parent("a/b/c.txt", create_missing=True)
        assert name == "c.txt"
        os.mkdir(name, dir_fd=fd)
    assert (tmp_path / "a/b/c.txt").is_dir()


def test_open_parent_missing_without_create(tmp_path: Path) -> None:
    with RootDir(tmp_path) as root, pytest.raises(FileNotFoundError):
        root.open_parent("a/b/c")
    assert not (tmp_path / "a").exists()


def test_symlink_on_the_way_is_refused(tmp_path: Path) -> None:
    inside, outside = tmp_path / "root", tmp_path / "outside"
    inside.mkdir()
    outside.mkdir()
    (inside / "a").symlink_to(outside)
    (inside / "rel").symlink_to("../outside")
    with RootDir(inside) as root:
        for path in ("a/x", "a/new/x", "rel/x"):
            with pytest.raises(UnsafePath, match="symlink on the way"):
                root.open_parent(path, create_missing=True)
        # The final component may be a symlink: the walk stops before it.
        fd, name = root.open_parent("a")
        assert name == "a"
        assert os.readlink(name, dir_fd=fd) == str(outside)
    assert list(outside.iterdir()) == []


def test_file_on_the_way(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with RootDir(tmp_path) as root, pytest.raises(NotADirectoryError):
        root.open_parent("f/x", create_missing=True)


def test_root_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(UnsafePath):
        RootDir(tmp_path / "link", create=False)


def test_invalidate_under_keeps_other_descriptors(tmp_path: Path) -> None:
    with RootDir(tmp_path) as root:
        fd_a, _ = root.open_parent("a/x", create_missing=True)
        fd_b, _ = root.open_parent("b/x", create_missing=True)
        root.invalidate(under="a")
        os.fstat(fd_b)  # still open
        assert root.open_parent("b/y")[0] == fd_b
        fd_a2, _ = root.open_parent("a/x")
        assert os.path.samestat(os.fstat(fd_a2), os.stat(tmp_path / "a"))
        assert fd_a != fd_b
