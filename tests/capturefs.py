"""Helpers for the capture conformance suite (fixtures live in ``tests/unit/conftest.py``)."""

from __future__ import annotations

import shutil
import uuid
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
