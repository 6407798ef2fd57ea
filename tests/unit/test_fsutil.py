"""Durability helpers: O_DIRECT writes of large file data, write-back hints."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from stead import fsutil
from stead.fsutil import DIRECT_ALIGN, DIRECT_BUFFER, DIRECT_MIN, DirectWriter


def _file(tmp_path: Path) -> int:
    return os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)


@pytest.mark.parametrize(
    ("size", "offset"),
    [
        (DIRECT_MIN, 0),  # all aligned: direct only
        (DIRECT_MIN + 123, 0),  # an unaligned tail through the page cache
        (DIRECT_BUFFER * 2 + 4097, DIRECT_ALIGN * 3),  # several buffers, aligned offset
        (DIRECT_MIN, 100),  # unaligned offset, too little after the boundary: the cache
        (DIRECT_BUFFER + 5000, 100),  # unaligned offset: its head cached, then direct
        (DIRECT_MIN - DIRECT_ALIGN, 0),  # small: the page cache
        (0, 0),
    ],
)
def test_direct_writer_writes_exactly_the_data(tmp_path: Path, size: int, offset: int) -> None:
    data = os.urandom(size)
    fd = _file(tmp_path)
    writer = DirectWriter()
    try:
        os.pwrite(fd, b"\xff" * (offset + size + 10), 0)  # old bytes around the write
        writer.pwrite(fd, data, offset)
        assert os.pread(fd, size, offset) == data
        assert os.pread(fd, 10, offset + size) == b"\xff" * 10
        assert not fsutil.fcntl.fcntl(fd, fsutil.fcntl.F_GETFL) & os.O_DIRECT  # flag restored
        head = -offset % DIRECT_ALIGN
        direct = (size - head) - (size - head) % DIRECT_ALIGN
        direct = direct if direct >= DIRECT_MIN else 0
        if writer.enabled:
            assert writer.direct_bytes == direct
    finally:
        writer.close()
        os.close(fd)


def test_direct_writer_falls_back_where_o_direct_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fcntl = fsutil.fcntl.fcntl

    def refusing(fd: int, cmd: int, arg: int = 0) -> int:
        if cmd == fsutil.fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return int(real_fcntl(fd, cmd, arg))

    monkeypatch.setattr(fsutil.fcntl, "fcntl", refusing)
    data = os.urandom(DIRECT_MIN * 2)
    fd = _file(tmp_path)
    writer = DirectWriter()
    try:
        writer.pwrite(fd, data, 0)
        assert os.pread(fd, len(data), 0) == data
        assert not writer.enabled and writer.direct_bytes == 0
        writer.pwrite(fd, data[::-1], 0)  # and stays with the page cache
        assert os.pread(fd, len(data), 0) == data[::-1]
    finally:
        writer.close()
        os.close(fd)


def test_direct_writer_passes_other_errors_on(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "r", os.O_RDONLY | os.O_CREAT, 0o600)
    writer = DirectWriter()
    try:
        with pytest.raises(OSError, match="Bad file descriptor"):
            writer.pwrite(fd, os.urandom(DIRECT_MIN), 0)
    finally:
        writer.close()
        os.close(fd)


def test_disabled_direct_writer_uses_the_page_cache(tmp_path: Path) -> None:
    fd = _file(tmp_path)
    writer = DirectWriter(enabled=False)
    try:
        writer.pwrite(fd, b"x" * DIRECT_MIN, 0)
        assert writer.direct_bytes == 0
        assert os.pread(fd, 3, 0) == b"xxx"
    finally:
        writer.close()
        os.close(fd)


@pytest.mark.parametrize("empty_path", [True, False], ids=["AT_EMPTY_PATH", "proc"])
def test_an_unnamed_file_gets_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_path: bool
) -> None:
    if not empty_path:
        monkeypatch.setattr(fsutil, "_linkat_empty_path", False)
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = fsutil.open_unnamed(dir_fd)
        try:
            os.write(fd, b"content")
            assert os.listdir(tmp_path) == []
            fsutil.name_unnamed(fd, dir_fd, "named")
            (tmp_path / "other").write_bytes(b"old")
            with pytest.raises(FileExistsError):
                fsutil.name_unnamed(fd, dir_fd, "other")  # never replaces
        finally:
            os.close(fd)
    finally:
        os.close(dir_fd)
    assert (tmp_path / "named").read_bytes() == b"content"
    assert (tmp_path / "other").read_bytes() == b"old"
    assert os.stat(tmp_path / "named").st_nlink == 1


def test_an_unnamed_file_disappears_unless_named(tmp_path: Path) -> None:
    dir_fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(fsutil.open_unnamed(dir_fd))
    finally:
        os.close(dir_fd)
    assert os.listdir(tmp_path) == []
