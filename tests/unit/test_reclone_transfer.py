"""The reclone transfer without a network: a Source and a Fetcher joined by in-memory queues.

Real files on both sides, small batches (so that one file spans many requests), and
injected faults: chunks out of order or short must fail a file's check, never pass it.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any, cast

import blake3
import pytest

from stead.channel import messages as m
from stead.channel.transport import Connection
from stead.errors import SteadError
from stead.reclone import transfer
from stead.reclone.plan import Fetch, Item
from stead.reclone.transfer import Fetcher, Source, Staging


class _Pipe:
    """One end of an in-memory connection."""

    def __init__(self, inbox: asyncio.Queue[m.Message], outbox: asyncio.Queue[m.Message]):
        self.inbox, self.outbox = inbox, outbox

    async def send(self, message: m.Message) -> None:
        await self.outbox.put(message)

    async def recv(self, timeout: float | None = None) -> m.Message:
        return await asyncio.wait_for(self.inbox.get(), timeout)


def _item(path: Path) -> Item:
    data = path.read_bytes()
    st = path.stat()
    digest = blake3.blake3(data).hexdigest()
    return Item("file", 0o640, os.getuid(), os.getgid(), len(data), st.st_mtime_ns, digest)


def _files(root: Path) -> dict[str, Item]:
    root.mkdir()
    sizes = [0, 1, 999, 1000, 1001, 4321, 12_345, 7]
    for n, size in enumerate(sizes):
        (root / f"f{n}").write_bytes(os.urandom(size))
    return {str(p): _item(p) for p in sorted(root.iterdir())}


def _fetches(files: dict[str, Item], stage: Path) -> list[Fetch]:
    stage.mkdir()
    return [
        Fetch(path, str(stage / f"{n:04d}"), item) for n, (path, item) in enumerate(files.items())
    ]


async def _run(files: dict[str, Item], fetches: list[Fetch]) -> None:
    a: asyncio.Queue[m.Message] = asyncio.Queue()
    b: asyncio.Queue[m.Message] = asyncio.Queue()
    source = Source(lambda: dict(files))
    fetcher = Fetcher(cast(Connection, _Pipe(a, b)))
    server = asyncio.create_task(source.serve(cast(Connection, _Pipe(b, a))))
    try:
        await fetcher.manifest()
        await fetcher.fetch(fetches)
    finally:
        server.cancel()
    assert fetcher.progress.files_done >= len(fetches)


def test_files_spanning_many_requests_arrive_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "BATCH_BYTES", 1000)  # one file, many chunks and answers
    monkeypatch.setattr(transfer, "WRITE_QUEUE", 1)  # the receive loop waits on the writer
    files = _files(tmp_path / "active")
    fetches = _fetches(files, tmp_path / "stage")
    asyncio.run(_run(files, fetches))
    for f in fetches:
        assert Path(f.staged).read_bytes() == Path(f.path).read_bytes()
        assert Path(f.staged).stat().st_mode & 0o7777 == 0o640


def test_a_file_changed_on_the_active_after_the_manifest_is_fetched_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "BATCH_BYTES", 1000)
    files = _files(tmp_path / "active")
    fetches = _fetches(files, tmp_path / "stage")
    changed = tmp_path / "active" / "f6"
    changed.write_bytes(os.urandom(12_000))  # shorter than the manifest says
    fresh = {**files, str(changed): _item(changed)}
    calls = iter([files, fresh, fresh])

    async def run() -> None:
        a: asyncio.Queue[m.Message] = asyncio.Queue()
        b: asyncio.Queue[m.Message] = asyncio.Queue()
        source = Source(lambda: dict(next(calls)))
        fetcher = Fetcher(cast(Connection, _Pipe(a, b)))
        server = asyncio.create_task(source.serve(cast(Connection, _Pipe(b, a))))
        try:
            await fetcher.manifest()
            await fetcher.fetch(fetches)
        finally:
            server.cancel()

    asyncio.run(run())
    assert Path(fetches[6].staged).read_bytes() == changed.read_bytes()


def _chunks(data: bytes, size: int) -> list[tuple[int, bytes]]:
    return [(offset, data[offset : offset + size]) for offset in range(0, len(data), size)]


def test_the_writer_hashes_chunks_in_order_as_it_writes(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    item = Item(
        "file", 0o600, os.getuid(), os.getgid(), len(data), 0, blake3.blake3(data).hexdigest()
    )
    fetch = Fetch("/a/b", str(tmp_path / "staged"), item)
    staging = Staging()
    results: list[tuple[Fetch, bool]] = []
    for offset, chunk in _chunks(data, 3000):
        results += staging.write_batch([(fetch, offset, len(chunk))], [chunk])
    assert results == [(fetch, True)]
    assert Path(fetch.staged).read_bytes() == data


@pytest.mark.parametrize("fault", ["swapped", "short"])
def test_chunks_out_of_order_or_short_fail_the_check(tmp_path: Path, fault: str) -> None:
    """Whatever lands on disk, the file must not pass unless its hash was fed in order."""
    data = os.urandom(9000)
    item = Item(
        "file", 0o600, os.getuid(), os.getgid(), len(data), 0, blake3.blake3(data).hexdigest()
    )
    fetch = Fetch("/a/b", str(tmp_path / "staged"), item)
    chunks = _chunks(data, 3000)
    batch: list[tuple[Fetch, int, int]] = [(fetch, o, len(c)) for o, c in chunks]
    payload: list[Any] = [c for _, c in chunks]
    if fault == "swapped":
        batch[0], batch[1] = batch[1], batch[0]
        payload[0], payload[1] = payload[1], payload[0]
    else:
        payload[1] = payload[1][:-1]
    staging = Staging()
    assert staging.write_batch(batch, payload) == [(fetch, False)]
    staging.close()


def test_a_read_of_a_path_not_served_is_refused(tmp_path: Path) -> None:
    source = Source(dict)
    with pytest.raises(SteadError, match="not in the manifest"):
        source._read([[str(tmp_path / "x"), 0, 1]])
