"""Fixtures for the capture conformance suite: a file system of its own for fanotify.

A fanotify filesystem mark sees a whole file system, so fanotify tests run on a small ext4
image, loop-mounted once per session and unmounted (``mount -o loop`` releases its loop
device then) at the end even when tests fail. Each test gets a fresh directory in it.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from capturefs import BACKENDS, Place, capture_base


@pytest.fixture(scope="session")
def ext4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A mounted, empty ext4 file system (512 MiB, sparse)."""
    if os.geteuid() != 0:
        pytest.skip("mounting an ext4 image needs root")
    base = tmp_path_factory.mktemp("ext4")
    image, mountpoint = base / "fs.img", base / "mnt"
    mountpoint.mkdir()
    with open(image, "wb") as handle:
        handle.truncate(512 * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        done = subprocess.run(["umount", str(mountpoint)], check=False)
        if done.returncode != 0:  # still busy: detach now, the kernel finishes later
            subprocess.run(["umount", "-l", str(mountpoint)], check=False)
        image.unlink(missing_ok=True)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def place(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    base = capture_base(backend, request, tmp_path)
    found = Place(backend, base / "src", tmp_path / "dst", base / "outside")
    for path in (found.src, found.dst, found.outside):
        path.mkdir(exist_ok=True)
    return found
