"""Capture racing renames: a directory renamed while capture still reads its backlog.

Runs once per backend (see ``conftest.py``). The writer makes a backlog of about 16,000
files, so the kernel queue is raised as the agent raises it (``raise_queue_limit``): an
overflow would turn the race into a rescan, which is tested elsewhere.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator

import pytest

from capturefs import Place, event_queue_limit
from stead.replication.applier import Applier
from stead.replication.capture import make_capture
from stead.replication.capture.core import QUEUE_EVENTS
from stead.replication.entries import Entry
from stead.replication.filters import Filter
from stead.replication.manifest import Manifest
from treeutil import snapshot

WRITER = """
import os, sys
src = sys.argv[1]
for d in range(40):
    os.makedirs(f"{src}/many/d{d}")
    for f in range(400):
        with open(f"{src}/many/d{d}/f{f}", "wb") as handle:
            handle.write(os.urandom(64))
os.rename(f"{src}/many", f"{src}/renamed")
os.rename(f"{src}/renamed/d7", f"{src}/d7")
"""


@pytest.fixture
def agent_event_queue(place: Place) -> Iterator[None]:
    with event_queue_limit(place.backend, QUEUE_EVENTS):
        yield


@pytest.mark.usefixtures("agent_event_queue")
async def test_directory_renamed_behind_the_backlog_loses_nothing(place: Place) -> None:
    src, dst = place.src, place.dst
    manifest = Manifest(dst.parent / "manifest.db")
    overflows: list[int] = []
    capture = make_capture(
        {"r": src},
        {"r": Filter()},
        manifest,
        "fanotify" if place.backend == "fanotify" else "inotify",
        on_overflow=lambda: overflows.append(1),
    )
    applier = Applier({"r": dst})
    sequence = 0

    async def emit(batch: list[Entry]) -> None:
        nonlocal sequence
        records = []
        for entry in batch:
            sequence += 1
            records.append((sequence, entry))
        await asyncio.to_thread(applier.apply, records, lambda _seq: None)

    task = asyncio.create_task(capture.run(emit))
    try:
        await capture.started()
        writer = await asyncio.create_subprocess_exec(sys.executable, "-c", WRITER, str(src))
        assert await writer.wait() == 0
        await capture.drain()
        assert not overflows, "the raised kernel queue still overflowed"
        assert snapshot(dst) == snapshot(src)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        applier.close()
        manifest.close()
