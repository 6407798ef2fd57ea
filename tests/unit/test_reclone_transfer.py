"""The reclone transfer without a network: a Source and a Fetcher joined by in-memory queues.

Real files on both sides, small batches (so that one file spans many requests), and
injected faults: chunks out of order or short must fail a file's check, never pass it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import blake3
import pytest

from stead.channel import framing
from stead.channel import messages as m
from stead.channel.transport import Connection
from stead.errors import ProtocolError, SteadError
from stead.reclone import transfer
from stead.reclone.plan import Fetch, Item
from stead.reclone.staging import Staging
from stead.reclone.transfer import Fetcher, Source, pack_sizes, unpack_sizes
from stead.system.hashcache import HashCache


class _Pipe:
    """One end of an in-memory connection."""

    def __init__(self, inbox: asyncio.Queue[m.Message], outbox: asyncio.Queue[m.Message]):
        self.inbox, self.outbox = inbox, outbox

    async def send(self, message: m.Message) -> None:
        await self.outbox.put(message)

    async def recv(self, timeout: float | None = None) -> m.Message:
        return await asyncio.wait_for(self.inbox.get(), timeout)


class _FramedPipe(_Pipe):
    """A pipe that sends every message through the channel's framing, as a connection
    does: tails travel raw and arrive as views of the frame. Counts the frames with tails;
    ``old_active`` drops the tail request, as an active that predates tails would."""

    def __init__(self, *args: Any, old_active: bool = False) -> None:
        super().__init__(*args)
        self.tails = 0
        self.old_active = old_active

    async def send(self, message: m.Message) -> None:
        if self.old_active and isinstance(message, m.Request):
            message = m.Request(message.id, message.kind, {**message.body, "tail": None})
        tail = message.tail()
        if tail:
            frame = b"".join(framing.encode_frame_tail(message.to_wire(), tail))
        else:
            frame = framing.encode_frame(message.to_wire())
        _, flags = framing.parse_header(frame[: framing.HEADER_SIZE])
        self.tails += bool(flags & framing.FLAG_TAIL)
        payload = bytearray(frame[framing.HEADER_SIZE :])
        await self.outbox.put(m.parse_message(framing.decode_payload(payload, flags)))


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


def _undigested(files: dict[str, Item]) -> dict[str, Item]:
    """The manifest an active gives for files the passive lacks: no digests."""
    return {path: item._replace(digest="") for path, item in files.items()}


def _fetches(files: dict[str, Item], stage: Path) -> list[Fetch]:
    stage.mkdir()
    return [
        Fetch(path, str(stage / f"{n:04d}"), item) for n, (path, item) in enumerate(files.items())
    ]


async def _run(files: dict[str, Item], fetches: list[Fetch]) -> None:
    a: asyncio.Queue[m.Message] = asyncio.Queue()
    b: asyncio.Queue[m.Message] = asyncio.Queue()
    source = Source(lambda **_: dict(files))
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
        source = Source(lambda **_: dict(next(calls)))
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


class _Counting(Source):
    """A Source that counts the requests it answers, by kind."""

    def __init__(self, collect: transfer.Collect) -> None:
        super().__init__(collect)
        self.kinds: list[str] = []

    async def _answer(self, kind: str, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        self.kinds.append(kind)
        return await super()._answer(kind, body)


async def _against(source: Source, step: Callable[[Fetcher], Awaitable[Any]]) -> Fetcher:
    """A fetcher that has the source's manifest (an empty passive's), then takes ``step``."""
    a: asyncio.Queue[m.Message] = asyncio.Queue()
    b: asyncio.Queue[m.Message] = asyncio.Queue()
    fetcher = Fetcher(cast(Connection, _Pipe(a, b)))
    server = asyncio.create_task(source.serve(cast(Connection, _Pipe(b, a))))
    try:
        await fetcher.manifest({})
        await step(fetcher)
    finally:
        server.cancel()
    return fetcher


async def _fetch_from(source: Source, fetches: list[Fetch]) -> Fetcher:
    return await _against(source, lambda fetcher: fetcher.fetch(fetches))


def test_files_without_a_digest_are_checked_against_what_the_active_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An empty passive: no digest in the manifest; each file is verified by the digest
    the active computed over the very ranges it sent, in order."""
    monkeypatch.setattr(transfer, "BATCH_BYTES", 1000)
    monkeypatch.setattr(transfer, "SETTLED_NS", 0)  # the files were written just now
    files = _files(tmp_path / "active")
    fetches = _fetches(_undigested(files), tmp_path / "stage")
    source = _Counting(lambda **_: _undigested(files))
    cache = tmp_path / "hash-cache.msgpack"
    source.cache = cache
    fetcher = asyncio.run(_fetch_from(source, fetches))
    assert "entry" not in source.kinds  # nothing had to be fetched twice
    for f in fetches:
        assert Path(f.staged).read_bytes() == Path(f.path).read_bytes()
        assert fetcher.verified[f.path] == files[f.path].digest
    # The active's hash cache learned every digest: the next manifest reads none of them.
    learned = HashCache(cache)
    for path, item in files.items():
        assert learned.lookup(path, os.lstat(path)) == bytes.fromhex(item.digest)


def test_a_file_that_has_not_settled_is_fetched_again_against_a_fresh_digest(
    tmp_path: Path,
) -> None:
    """A file written just before it is read could still be moving within one clock tick:
    the active vouches for no digest, and the passive fetches it against a fresh entry."""
    files = _files(tmp_path / "active")
    fetches = _fetches(_undigested(files), tmp_path / "stage")
    source = _Counting(lambda only=None, **_: files if only is not None else _undigested(files))
    fetcher = asyncio.run(_fetch_from(source, fetches))
    assert source.kinds.count("entry") == 1
    for f in fetches:
        assert Path(f.staged).read_bytes() == Path(f.path).read_bytes()
        assert fetcher.verified[f.path] == files[f.path].digest


@pytest.mark.parametrize("how", ["replaced", "rewritten"])
def test_a_file_written_between_two_ranges_is_never_vouched_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """Replaced by a rename (a new inode), or rewritten in place (new times; a rewrite in
    the same clock tick as the listing is what the settling rule keeps out, tested above)."""
    monkeypatch.setattr(transfer, "BATCH_BYTES", 1000)
    monkeypatch.setattr(transfer, "SETTLED_NS", 0)
    files = _files(tmp_path / "active")
    moving = str(tmp_path / "active" / "f6")  # 12,345 bytes: thirteen ranges
    fresh = os.urandom(12_345)
    reads = iter(range(1000))

    class Moving(_Counting):
        def _read_range(self, path: str, offset: int, length: int) -> tuple[bytes, str | None]:
            answer = super()._read_range(path, offset, length)
            if path == moving and offset == 0 and next(reads) == 0:
                if how == "replaced":
                    Path(moving + ".new").write_bytes(fresh)  # same size, new content
                    os.replace(moving + ".new", moving)
                else:
                    Path(moving).write_bytes(fresh)
                    os.utime(moving, ns=(10**9, 10**9))
            return answer

    def collect(only: Any = None, **_: Any) -> dict[str, Item]:
        now = {p: _item(Path(p)) for p in files}
        return now if only is not None else _undigested(now)

    fetches = _fetches(_undigested(files), tmp_path / "stage")
    source = Moving(collect)
    asyncio.run(_fetch_from(source, fetches))
    assert source.kinds.count("entry") == 1
    assert Path(fetches[6].staged).read_bytes() == fresh


def test_the_passive_sizes_are_checked_as_external_input() -> None:
    assert unpack_sizes(pack_sizes({"/opt/a": 3})) == {"/opt/a": 3}
    for bad in [b"not zstd", pack_sizes([1, 2]), pack_sizes({"/a": "3"}), "text"]:  # type: ignore[dict-item]
        with pytest.raises(ProtocolError):
            unpack_sizes(bad)


def test_fresh_entries_come_in_batches_and_only_for_the_paths_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transfer, "ENTRY_BATCH", 3)
    files = _files(tmp_path / "active")
    paths = sorted(files)

    class Lying(_Counting):
        """Answers with one entry more than was asked for."""

        async def _answer(self, kind: str, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
            answer, data = await super()._answer(kind, body)
            if kind == "entry":
                answer["entries"]["/etc/shadow"] = files[paths[0]].to_wire()
            return answer, data

    def entries(source: Source) -> dict[str, Item]:
        found: dict[str, Item] = {}

        async def step(fetcher: Fetcher) -> None:
            found.update(await fetcher.entries(paths))

        asyncio.run(_against(source, step))
        return found

    honest = _Counting(lambda **_: dict(files))
    assert entries(honest) == files
    assert honest.kinds.count("entry") == 3  # 8 paths, 3 a request
    # A path that was not asked for is a protocol error, never an entry.
    with pytest.raises(ProtocolError, match="not asked for"):
        entries(Lying(lambda **_: dict(files)))


@pytest.mark.parametrize("old_active", [False, True])
def test_file_data_travels_as_frame_tails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, old_active: bool
) -> None:
    """Read answers carry the bytes as raw tails, written from views of the received frame;
    an active that predates tails answers with a list, which works as well."""
    monkeypatch.setattr(transfer, "BATCH_BYTES", 5000)
    files = _files(tmp_path / "active")
    fetches = _fetches(files, tmp_path / "stage")

    async def run() -> int:
        a: asyncio.Queue[m.Message] = asyncio.Queue()
        b: asyncio.Queue[m.Message] = asyncio.Queue()
        fetcher = Fetcher(cast(Connection, _FramedPipe(a, b, old_active=old_active)))
        active_end = _FramedPipe(b, a)
        server = asyncio.create_task(Source(lambda **_: dict(files)).serve(
            cast(Connection, active_end)))  # fmt: skip
        try:
            await fetcher.manifest()
            await fetcher.fetch(_undigested_fetches(fetches))
        finally:
            server.cancel()
        return active_end.tails

    tails = asyncio.run(run())
    assert (tails == 0) == old_active
    for f in fetches:
        assert Path(f.staged).read_bytes() == Path(f.path).read_bytes()


def _undigested_fetches(fetches: list[Fetch]) -> list[Fetch]:
    """Checked against the digests the active sends with the last range of each file."""
    return [f._replace(item=f.item._replace(digest="")) for f in fetches]
