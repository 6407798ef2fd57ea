"""Helpers for the capture conformance suite (fixtures live in ``tests/unit/conftest.py``)."""

from __future__ import annotations

import contextlib
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

BACKENDS = [pytest.param("inotify"), pytest.param("fanotify", marks=pytest.mark.root)]


@dataclass(frozen=True)
class Place:
    """Where a capture test works: ``src`` and ``outside`` share a file system."""

    backend: str
    src: Path
    dst: Path
    outside: Path


def capture_base(backend: str, request: pytest.FixtureRequest, fallback: Path) -> Path:
    """A fresh directory for one test: on the ext4 mount for fanotify."""
    if backend != "fanotify":
        return fallback
    base: Path = request.getfixturevalue("ext4") / uuid.uuid4().hex
    base.mkdir()
    request.addfinalizer(lambda: shutil.rmtree(base, ignore_errors=True))
    return base


@contextlib.contextmanager
def event_queue_limit(backend: str, limit: int) -> Iterator[None]:
    """The kernel's event queue limit for ``backend`` set to ``limit``, restored afterwards
    (agents raise it machine-wide; a test that counts on a limit sets its own)."""
    path = Path(f"/proc/sys/fs/{backend}/max_queued_events")
    before = path.read_text()
    path.write_text(str(limit))
    try:
        yield
    finally:
        path.write_text(before)
