"""Capture racing renames: a directory renamed while capture still reads its backlog."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from stead.replication.applier import Applier
from stead.replication.capture.inotify import InotifyCapture
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


async def test_directory_renamed_behind_the_backlog_loses_nothing(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    manifest = Manifest(tmp_path / "manifest.db")
    capture = InotifyCapture({"r": src}, {"r": Filter()}, manifest)
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
        assert snapshot(dst) == snapshot(src)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        applier.close()
        manifest.close()
