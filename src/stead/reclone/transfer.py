"""Moving the reclone scope's bytes: the active serves, the passive pulls into staging.

A reclone uses a channel connection of its own (mutual TLS, hello with purpose
``reclone``), so that bulk copying never sits in front of heartbeats. The passive asks; the
active answers each request in order (reading the next answer while it sends the last):

- ``manifest``: the active's manifest of its system trees (zstd-compressed msgpack), made
  by the caller's ``collect``. The paths it lists are the only ones ``read`` will serve:
  preserved and excluded paths (the active's own SSH host keys, say) never leave it. With
  ``have`` (the passive's regular files and their sizes), the active reads and hashes only
  the files the passive might already hold (same path, same size) to give their digests;
  every other file is copied anyway and gets its digest as it is read.
- ``read``: a batch of ``[path, offset, length]`` (at most ``BATCH_BYTES`` in all); the
  answer holds the bytes of each, read with ``O_NOFOLLOW`` from a regular file, and for
  each range that ends its file the BLAKE3 digest of everything read of it, in order, or
  ``""`` when the file changed under the reading (see :class:`_Reading`). With ``tail``
  set, the bytes travel as the reply's raw tail (no msgpack copy on either side), else as
  the body's ``data`` list.
- ``entry``: a fresh manifest entry, digest included, for paths whose content changed
  while they were copied.

The passive keeps ``WINDOW`` requests in flight; ``WRITERS`` writer threads, fed through
bounded queues while the next answers arrive (each file always to the same one), write each
answer into the staging file named by the plan and hash every file as it is written,
checking it against the manifest's digest or, where the manifest had none, the digest the
active computed as it read the same bytes; a file that changed on the active meanwhile is
fetched again, up to ``RETRIES`` times, against the digest of a fresh entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import stat
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import msgpack
import zstandard

from stead.aio import TaskGroup, cancel_and_wait, first_cause
from stead.channel import messages as m
from stead.channel.transport import Connection
from stead.errors import ChannelError, ProtocolError, RecloneError, SteadError, TimeoutExpired
from stead.reclone.plan import Fetch, Item
from stead.reclone.staging import Staging, make_symlinks
from stead.system.hashcache import SETTLED_NS, HashCache
from stead.system.manifest import HashWanted

log = logging.getLogger(__name__)

BATCH_BYTES = 4 * 1024**2
WINDOW = 8
# Writer threads; a file's chunks always go to the same one. One: on two cores a second
# writer thread only fought the event loop's thread for the GIL (futex waits were a tenth
# of the passive's CPU): alternating runs of the 2 GiB, 50,000-file reclone, 6.41 and
# 6.43 s with one writer against 6.69 and 6.80 s with two, passive CPU 5.2 vs 6.1 s.
WRITERS = 1
WRITE_QUEUE = 2  # answers waiting for each writer (bounds memory with WINDOW)
RETRIES = 3
MAX_MANIFEST = 1024**3  # decompressed; a manifest is about 100 bytes a path
REPLY_TIMEOUT = 30.0  # a read answer; a cut link fails the copy (and the staging) after this
MANIFEST_TIMEOUT = 3600.0  # the active hashes its whole scope first
SERVE_AHEAD = 2  # answers the active holds ready while it sends the one before
FLUSH_EVERY = 128 * 1024**2  # staged bytes between two background flushes
MANIFEST_PART = 8_192  # paths at most in one streamed part of the manifest
MAX_MANIFEST_PATHS = 10_000_000  # in all its parts
ENTRY_BATCH = 10_000  # paths per entry request
MAX_READING = 4096  # files a passive may have half read at once (their hashers)

# The active's manifest (blocking); ``hash_wanted`` limits which files are read for it,
# ``only`` (a list of paths) asks for the entries of just those, every file hashed.
Collect = Callable[..., dict[str, Item]]


def pack_sizes(sizes: dict[str, int]) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(msgpack.packb(sizes, use_bin_type=True))


def _unpack_map(blob: bytes, what: str, error: type[SteadError]) -> dict[str, Any]:
    """A zstd-compressed msgpack map keyed by text, at most 1 GiB unpacked."""
    try:
        with zstandard.ZstdDecompressor().stream_reader(blob) as reader:
            raw = reader.read(MAX_MANIFEST + 1)
        if len(raw) > MAX_MANIFEST:
            raise error(f"{what} is larger than 1 GiB")
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (zstandard.ZstdError, ValueError, msgpack.UnpackException) as exc:
        raise error(f"{what} is malformed: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise error(f"{what} is not a map of paths")
    return data


def unpack_sizes(blob: Any) -> dict[str, int]:
    """The passive's ``have``: its regular files and their sizes (external input)."""
    if not isinstance(blob, bytes):
        raise ProtocolError("manifest: have must be bytes")
    data = _unpack_map(blob, "manifest: have", ProtocolError)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in data.values()):
        raise ProtocolError("manifest: have is not a map of paths to sizes")
    return data


def pack_manifest(entries: dict[str, Item]) -> bytes:
    raw = msgpack.packb({p: i.to_wire() for p, i in entries.items()}, use_bin_type=True)
    return zstandard.ZstdCompressor(level=3).compress(raw)


def unpack_manifest(blob: bytes) -> dict[str, Item]:
    data = _unpack_map(blob, "the active's manifest", RecloneError)
    return {path: Item.from_wire(wire) for path, wire in data.items()}


def _identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


class _Reading:
    """One file being read for a passive, range after range, and the hash of what was read.

    The digest given at the end vouches for the bytes sent only if the file held still: it
    is the file the manifest listed (same size and mtime) when its first range was read,
    its ``ctime`` lay at least :data:`~stead.system.hashcache.SETTLED_NS` before that (so a
    write during the reading cannot hide in the same clock tick), every range came in
    order, and size, times, inode and device are unchanged after its last range. Anything
    else gives ``""``: the passive fetches the file again against a fresh entry.
    """

    __slots__ = ("hasher", "identity", "next_offset", "sound", "started_ns")

    def __init__(self, st: os.stat_result, item: Item, started_ns: int) -> None:
        self.hasher = blake3.blake3()
        self.started_ns = started_ns
        self.identity = _identity(st)
        self.next_offset = 0
        self.sound = (st.st_size, st.st_mtime_ns) == (item.size, item.mtime_ns) and (
            st.st_ctime_ns <= started_ns - SETTLED_NS
        )


class Source:
    """The active's side of one reclone connection."""

    def __init__(self, collect: Collect, cache: Path | None = None) -> None:
        self.collect = collect
        self.cache = cache  # the hash cache that learns the digests of files read whole
        self.served: dict[str, Item] = {}
        self.reading: dict[str, _Reading] = {}
        self.learned: list[tuple[str, os.stat_result, bytes, int]] = []
        # A manifest being streamed: the walk's parts (None at its end, or what it raised).
        self.parts: asyncio.Queue[dict[str, Item] | BaseException | None] | None = None
        self.stop: threading.Event | None = None
        self.asked = False  # a manifest-next is waiting for the walk
        self.streamed = (0.0, 0)  # when the stream began, and the parts sent

    async def serve(self, conn: Connection) -> None:
        """Answer requests in order until the passive hangs up; the next answer is read
        from disk while the one before is sent."""
        answers: asyncio.Queue[m.Reply | None] = asyncio.Queue(SERVE_AHEAD)

        async def answer() -> None:
            aside: set[asyncio.Task[None]] = set()
            try:
                while True:
                    try:
                        request = await conn.recv(timeout=MANIFEST_TIMEOUT)  # it walks too
                    except SteadError:
                        return
                    if not isinstance(request, m.Request):
                        raise ProtocolError(f"expected a request, got {type(request).__name__}")
                    if request.kind == "manifest-next":  # waits for the walk, not in line
                        task = asyncio.create_task(self._reply_to(request, answers))
                        aside.add(task)
                        task.add_done_callback(aside.discard)
                        continue
                    await self._reply_to(request, answers)
            finally:
                for task in list(aside):
                    task.cancel()
                if self.stop is not None:
                    self.stop.set()  # a walk still going ends at its next part
                await answers.put(None)

        async def send() -> None:
            while (reply := await answers.get()) is not None:
                await conn.send(reply)

        try:
            async with TaskGroup() as tasks:
                tasks.create_task(answer())
                tasks.create_task(send())
        except BaseExceptionGroup as group:
            raise first_cause(group) from None
        finally:
            if self.learned:
                await asyncio.shield(asyncio.to_thread(self.remember))

    async def _reply_to(self, request: m.Request, answers: asyncio.Queue[m.Reply | None]) -> None:
        try:
            body, data = await self._answer(request.kind, request.body)
            reply = m.Reply(id=request.id, ok=True, body=body, data=data)
        except (SteadError, OSError) as exc:
            reply = m.Reply(id=request.id, ok=False, body={}, error=str(exc) or "failed")
        await answers.put(reply)

    def remember(self) -> None:
        """Keep the digests of the files read whole and still in the hash cache (blocking):
        the next reclone's manifest need not read them again."""
        learned, self.learned = self.learned, []
        if self.cache is None:
            return
        cache = HashCache(self.cache, settled_ns=SETTLED_NS)
        for path, st, digest, started_ns in learned:
            cache.store(path, st, digest, started_ns)
        try:
            cache.save(keep_previous=True)
        except OSError as exc:  # a cache: the reclone stands without it
            log.warning("reclone: hash cache not updated: %s", exc)

    async def _answer(
        self, kind: str, body: dict[str, Any]
    ) -> tuple[dict[str, Any], tuple[bytes, ...]]:
        """The body of the answer, and the bytes that travel as its tail."""
        if kind == "manifest":
            started = time.monotonic()
            wanted: HashWanted | None = None
            if "have" in body:
                have = await asyncio.to_thread(unpack_sizes, body["have"])
                wanted = lambda path, size: have.get(path) == size  # noqa: E731
            if body.get("stream") is True:
                if self.parts is not None:
                    raise ProtocolError("manifest: one is being streamed already")
                self._stream(wanted)
                return await self._next_part()
            hinted = time.monotonic()
            self.served = await asyncio.to_thread(self.collect, hash_wanted=wanted)
            self.reading.clear()
            walked = time.monotonic()
            blob = await asyncio.to_thread(pack_manifest, self.served)
            log.info(
                "reclone manifest of %d paths: hint read in %.2f s, trees walked in %.2f s,"
                " packed in %.2f s",
                len(self.served),
                hinted - started,
                walked - hinted,
                time.monotonic() - walked,
            )
            return {"manifest": blob}, ()
        if kind == "manifest-next":
            if self.parts is None:
                raise ProtocolError("manifest-next: no manifest is being streamed")
            if self.asked:
                raise ProtocolError("manifest-next: the one before is not answered yet")
            self.asked = True
            try:
                return await self._next_part()
            finally:
                self.asked = False
        if kind == "read":
            items = body.get("items")
            if not isinstance(items, list):
                raise ProtocolError("read: items must be a list")
            data, digests = await asyncio.to_thread(self._read, items)
            if body.get("tail") is True:
                return {"digests": digests}, tuple(data)
            return {"data": data, "digests": digests}, ()
        if kind == "entry":
            paths = body.get("paths")
            if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
                raise ProtocolError("entry: paths must be a list of text")
            # Only paths of the manifest served, each looked at again (no walk).
            served = [p for p in paths if p in self.served]
            fresh = await asyncio.to_thread(self.collect, only=served)
            self.served.update({p: fresh[p] for p in paths if p in fresh})
            return {"entries": {p: fresh[p].to_wire() for p in paths if p in fresh}}, ()
        raise ProtocolError(f"unknown reclone request {kind!r}")

    def _stream(self, wanted: HashWanted | None) -> None:
        """Start the walk that streams the manifest: its parts queue up as it goes."""
        loop = asyncio.get_running_loop()
        parts: asyncio.Queue[dict[str, Item] | BaseException | None] = asyncio.Queue()
        stop = threading.Event()
        self.parts, self.stop, self.served = parts, stop, {}
        self.reading.clear()
        self.streamed = (time.monotonic(), 0)

        def put(part: dict[str, Item] | BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(parts.put_nowait, part)

        def emit(part: dict[str, Item]) -> None:
            if stop.is_set():
                raise RecloneError("the passive hung up")
            put(part)

        def walk() -> None:
            try:
                rest = self.collect(hash_wanted=wanted, emit=emit)
            except BaseException as exc:  # the passive hears it with the next part asked
                put(exc)
            else:
                if rest:  # what a collect that does not stream returns
                    put(rest)
                put(None)

        loop.run_in_executor(None, walk)

    async def _next_part(self) -> tuple[dict[str, Any], tuple[bytes, ...]]:
        """What the walk found since the last part (waiting for it if nothing yet): every
        part queued, merged, and whether more will come."""
        assert self.parts is not None
        part = await self.parts.get()
        merged: dict[str, Item] = {}
        while True:
            if part is None:
                self.parts = None
                break
            if isinstance(part, BaseException):
                self.parts = None
                if isinstance(part, SteadError | OSError):
                    raise part
                raise RecloneError(f"the walk of the system trees failed: {part!r}") from part
            merged.update(part)
            if len(merged) >= MANIFEST_PART or self.parts.empty():
                break
            part = self.parts.get_nowait()
        self.served.update(merged)  # before the passive can ask for any of it
        started, sent = self.streamed
        self.streamed = (started, sent + 1)
        if self.parts is None:
            log.info(
                "reclone manifest of %d paths streamed in %d parts in %.2f s",
                len(self.served),
                sent + 1,
                time.monotonic() - started,
            )
        blob = await asyncio.to_thread(pack_manifest, merged)
        return {"manifest": blob, "more": self.parts is not None}, ()

    def _read(self, items: list[Any]) -> tuple[list[bytes], list[str | None]]:
        out: list[bytes] = []
        digests: list[str | None] = []
        total = 0
        for item in items:
            if not (isinstance(item, list) and len(item) == 3):
                raise ProtocolError("read: each item is [path, offset, length]")
            path, offset, length = item
            if not isinstance(path, str) or path not in self.served:
                raise RecloneError(f"read: {path!r} is not in the manifest served")
            if not all(isinstance(n, int) and n >= 0 for n in (offset, length)):
                raise ProtocolError("read: offset and length must be non-negative integers")
            total += length
            if total > BATCH_BYTES:
                raise ProtocolError(f"read: more than {BATCH_BYTES} bytes asked at once")
            chunk, digest = self._read_range(path, offset, length)
            out.append(chunk)
            digests.append(digest)
        return out, digests

    def _read_range(self, path: str, offset: int, length: int) -> tuple[bytes, str | None]:
        """One range, and the file's digest if the range ends it (``""``: it moved)."""
        item = self.served[path]
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RecloneError(f"{path} is no longer a regular file")
            reading = self.reading.pop(path, None)
            if offset == 0:
                reading = _Reading(st, item, time.time_ns())
            elif reading is None or reading.next_offset != offset:
                reading = _Reading(st, item, time.time_ns())
                reading.sound = False  # its start was not read here, in order
            chunk = os.pread(fd, length, offset)
            reading.hasher.update(chunk)
            reading.next_offset = offset + len(chunk)
            if len(chunk) != length or _identity(st) != reading.identity:
                reading.sound = False
            if offset + length < item.size:
                if len(self.reading) >= MAX_READING:  # a passive that never finishes files
                    self.reading.pop(next(iter(self.reading)))
                self.reading[path] = reading
                return chunk, None
            st = os.fstat(fd)
            if _identity(st) != reading.identity:
                reading.sound = False
            if not reading.sound:
                return chunk, ""
            digest = reading.hasher.digest()
            self.learned.append((path, st, digest, reading.started_ns))
            return chunk, digest.hex()
        finally:
            os.close(fd)


@dataclass
class Progress:
    files_total: int = 0
    bytes_total: int = 0
    files_done: int = 0
    bytes_done: int = 0
    started: float = 0.0

    def describe(self) -> dict[str, Any]:
        elapsed = max(time.monotonic() - self.started, 1e-6) if self.started else 0.0
        rate = self.bytes_done / elapsed if elapsed else 0.0
        left = (self.bytes_total - self.bytes_done) / rate if rate > 0 else None
        return {
            "files_total": self.files_total,
            "files_done": self.files_done,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "rate": round(rate),
            "eta": round(left, 1) if left is not None else None,
        }


class Fetcher:
    """The passive's side: asks for the manifest and pulls files into staging.

    Requests go out as they are made; one task reads every reply and hands it to the
    request of its id (the active answers a ``manifest-next`` when its walk has more, not
    in line with the reads).
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._ids = itertools.count(1)
        self.progress = Progress()
        self.verified: dict[str, str] = {}  # path: the digest its staged copy was checked by
        self._waiting: dict[int, asyncio.Future[m.Reply]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._broken: BaseException | None = None
        self.flush: Callable[[], None] | None = None
        self._dirty = 0
        self._flushing: asyncio.Future[None] | None = None

    def _flush_soon(self, written: int) -> None:
        """Every FLUSH_EVERY bytes staged, the ``flush`` given (a ``syncfs`` of the
        staging areas) runs in the background, one at a time: the disk writes back what
        was staged while the copy goes on, and the swap's flush finds little left."""
        self._dirty += written
        if self.flush is None or self._dirty < FLUSH_EVERY:
            return
        if self._flushing is not None and not self._flushing.done():
            return
        self._dirty = 0
        self._flushing = asyncio.ensure_future(asyncio.to_thread(self.flush))
        self._flushing.add_done_callback(_flushed)

    async def close(self) -> None:
        """Stop reading replies (the connection is the caller's to close)."""
        if self._reader is not None:
            await cancel_and_wait(self._reader)

    async def _read_replies(self) -> None:
        try:
            while True:
                reply = await self.conn.recv()
                if not isinstance(reply, m.Reply):
                    raise ProtocolError(f"expected a reply, got {reply!r:.80}")
                waiting = self._waiting.pop(reply.id, None)
                if waiting is None:
                    raise ProtocolError(f"reply {reply.id} answers no request")
                if not waiting.done():  # else its asker gave up waiting
                    waiting.set_result(reply)
        except BaseException as exc:
            self._broken = exc
            if isinstance(exc, asyncio.CancelledError):
                self._broken = ChannelError("the reclone connection is closed")
            for waiting in self._waiting.values():
                if not waiting.done():
                    waiting.set_exception(self._broken)
                    waiting.exception()  # seen: an asker may have gone (a failed copy)
            self._waiting.clear()
            if isinstance(exc, asyncio.CancelledError):
                raise

    async def _ask(self, kind: str, body: dict[str, Any]) -> tuple[int, asyncio.Future[m.Reply]]:
        """Send a request; its reply comes to the future returned."""
        if self._broken is not None:
            raise self._broken
        if self._reader is None:
            self._reader = asyncio.create_task(self._read_replies())
        request_id = next(self._ids)
        reply = self._waiting[request_id] = asyncio.get_running_loop().create_future()
        await self.conn.send(m.Request(id=request_id, kind=kind, body=body))
        return request_id, reply

    @staticmethod
    async def _answer(
        request_id: int, reply: asyncio.Future[m.Reply], kind: str, timeout: float
    ) -> tuple[dict[str, Any], m.Reply]:
        try:
            async with asyncio.timeout(timeout):
                answer = await reply
        except TimeoutError:
            raise TimeoutExpired(f"{kind}: no answer from the active for {timeout:g}s") from None
        return Fetcher._check(answer, request_id, kind), answer

    async def _call(
        self, kind: str, body: dict[str, Any], timeout: float = REPLY_TIMEOUT
    ) -> dict[str, Any]:
        request_id, reply = await self._ask(kind, body)
        return (await self._answer(request_id, reply, kind, timeout))[0]

    @staticmethod
    def _check(reply: m.Message, request_id: int, kind: str) -> dict[str, Any]:
        if not isinstance(reply, m.Reply) or reply.id != request_id:
            raise ProtocolError(f"{kind}: expected reply {request_id}, got {reply!r:.80}")
        if not reply.ok:
            raise RecloneError(f"the active refused {kind}: {reply.error}")
        return reply.body

    async def manifest(self, have: dict[str, int] | None = None) -> dict[str, Item]:
        """The active's manifest, whole. Given ``have`` (our regular files and their
        sizes), only files we might hold already come with a digest; without it, every
        file does."""
        source: dict[str, Item] = {}
        async for part in self.manifest_parts(have):
            source.update(part)
        return source

    async def manifest_parts(
        self, have: dict[str, int] | None = None
    ) -> AsyncIterator[dict[str, Item]]:
        """The active's manifest in the parts it sends as it walks (a directory before
        what it holds); an active that does not stream sends it in one."""
        request: dict[str, Any] = {"stream": True}
        if have is not None:
            request["have"] = await asyncio.to_thread(pack_sizes, have)
        kind = "manifest"
        seen = 0
        while True:
            body = await self._call(kind, request, MANIFEST_TIMEOUT)
            blob = body.get("manifest")
            more = body.get("more", False)
            if not isinstance(blob, bytes) or not isinstance(more, bool):
                raise ProtocolError(f"{kind}: no manifest in the reply")
            part = await asyncio.to_thread(unpack_manifest, blob)
            seen += len(part)
            if seen > MAX_MANIFEST_PATHS:
                raise RecloneError(f"the active's manifest lists over {MAX_MANIFEST_PATHS} paths")
            yield part
            if not more:
                return
            kind, request = "manifest-next", {}

    async def entries(self, paths: list[str]) -> dict[str, Item]:
        """Fresh manifest entries of ``paths``, digests included (the active reads these
        files now); a path the active no longer serves is missing from the answer."""
        found: dict[str, Item] = {}
        for start in range(0, len(paths), ENTRY_BATCH):
            asked = paths[start : start + ENTRY_BATCH]
            fresh = await self._call("entry", {"paths": asked}, MANIFEST_TIMEOUT)
            entries = fresh.get("entries")
            if not isinstance(entries, dict):
                raise ProtocolError("entry: no entries in the reply")
            wanted = set(asked)
            for path, wire in entries.items():
                if path not in wanted:
                    raise ProtocolError(f"entry: {path!r} was not asked for")
                found[path] = Item.from_wire(wire)
        return found

    async def fetch(self, fetches: list[Fetch] | AsyncIterable[list[Fetch]]) -> None:
        """Every file into its staging name, checked against its hash; symlinks made.
        ``fetches`` may come in parts (a plan made as the manifest arrives): each is
        copied as it comes, while the next is awaited."""
        self.progress = Progress(started=time.monotonic())
        parts = _once(fetches) if isinstance(fetches, list) else fetches
        changed = await self._copy(self._counted(parts))
        for _attempt in range(RETRIES):
            if not changed:
                return
            entries = await self.entries([f.path for f in changed])
            pending = []
            for f in changed:
                if f.path not in entries:
                    raise RecloneError(f"{f.path} vanished from the active during the reclone")
                item = entries[f.path]
                if item.kind != "file":
                    raise RecloneError(f"{f.path} changed kind on the active during the reclone")
                self.progress.bytes_total += item.size - f.item.size
                pending.append(Fetch(f.path, f.staged, item))
            changed = await self._copy(_once(pending))
        if changed:
            raise RecloneError(f"{len(changed)} files kept changing on the active; try again later")

    async def _counted(
        self, parts: AsyncIterable[list[Fetch]]
    ) -> AsyncGenerator[list[Fetch], None]:
        """The files of each part, counted in the progress; its symlinks made."""
        async for fetches in parts:
            files = [f for f in fetches if f.item.kind == "file"]
            self.progress.files_total += len(files)
            self.progress.bytes_total += sum(f.item.size for f in files)
            links = [f for f in fetches if f.item.kind == "symlink"]
            if links:
                await asyncio.to_thread(make_symlinks, links)
            yield files

    async def _copy(self, parts: AsyncGenerator[list[Fetch], None]) -> list[Fetch]:
        """One pass; returns the files whose content did not match their hash."""
        queue: asyncio.Queue[tuple[int, asyncio.Future[m.Reply], list[_Range]] | None]
        queue = asyncio.Queue(WINDOW)
        lanes = [_Lane() for _ in range(WRITERS)]
        placed: dict[str, int] = {}  # the lane of each file under way
        changed: list[Fetch] = []

        async def send() -> None:
            async with contextlib.aclosing(parts):
                async for files in parts:
                    for batch in _batches(files):
                        items = [[f.path, offset, length] for f, offset, length in batch]
                        asked = await self._ask("read", {"items": items, "tail": True})
                        await queue.put((*asked, batch))
            await queue.put(None)

        async def receive() -> None:
            while (entry := await queue.get()) is not None:
                request_id, asked, batch = entry
                body, reply = await self._answer(request_id, asked, "read", REPLY_TIMEOUT)
                # Views of the frame received; an active that predates tails sends a list.
                data = body["data"] if "data" in body else list(reply.data)
                digests = body.get("digests", [None] * len(batch))
                if not isinstance(data, list) or len(data) != len(batch):
                    raise ProtocolError("read: the reply does not match the request")
                if not isinstance(digests, list) or len(digests) != len(batch):
                    raise ProtocolError("read: the digests do not match the request")
                parts: list[_Part] = [([], [], []) for _ in lanes]
                for piece, chunk, digest in zip(batch, data, digests, strict=True):
                    f, offset, length = piece
                    # A file keeps its lane; a new one goes to the least loaded lane.
                    index = placed.get(f.staged)
                    if index is None:
                        index = min(range(len(lanes)), key=lambda i: lanes[i].load)
                        placed[f.staged] = index
                    if offset + length >= f.item.size:
                        del placed[f.staged]
                    lanes[index].load += len(chunk)
                    part = parts[index]
                    part[0].append(piece)
                    part[1].append(chunk)
                    part[2].append(digest)
                for lane, part in zip(lanes, parts, strict=True):
                    if part[0]:
                        await lane.queue.put(part)  # bounded: the writers set the pace
            for lane in lanes:
                await lane.queue.put(None)

        async def write(lane: _Lane) -> None:
            # Each lane is fed in request order: the chunks of a file (always in one lane)
            # arrive in offset order, which the incremental hash needs. Lanes run beside the
            # receive loop and each other, so that one file's metadata waits overlap another's.
            while (entry := await lane.queue.get()) is not None:
                batch, data, digests = entry
                job = asyncio.ensure_future(
                    asyncio.to_thread(lane.staging.write_batch, batch, data, digests)
                )
                try:
                    done = await asyncio.shield(job)
                except asyncio.CancelledError:
                    # The thread uses the lane's descriptors until it returns: wait for it.
                    with contextlib.suppress(Exception):
                        await job
                    raise
                for f, ok in done:
                    self.progress.files_done += 1
                    if not ok:
                        changed.append(f)
                written = sum(len(d) for d in data)
                lane.load -= written
                self.progress.bytes_done += written
                self._flush_soon(written)

        try:
            async with TaskGroup() as tasks:
                tasks.create_task(send())
                tasks.create_task(receive())
                for lane in lanes:
                    tasks.create_task(write(lane))
        except BaseExceptionGroup as group:
            raise first_cause(group) from None
        finally:
            for lane in lanes:
                lane.staging.close()
                self.verified.update(lane.staging.verified)
        return changed


# A range of a file asked for: the file, offset and length.
_Range = tuple[Fetch, int, int]
# One writer's share of an answer: the ranges, their bytes, and the digests the active sent.
_Part = tuple[list[_Range], list[Any], list[Any]]


class _Lane:
    """One writer thread's share of the files: its queue of answers and its open files."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[_Part | None] = asyncio.Queue(WRITE_QUEUE)
        self.staging = Staging()
        self.load = 0  # bytes given to it and not written yet


def _batches(files: list[Fetch]) -> Any:
    """Requests of at most BATCH_BYTES: many small files together, large ones in chunks."""
    batch: list[tuple[Fetch, int, int]] = []
    size = 0
    for f in files:
        offset = 0
        while True:
            length = min(f.item.size - offset, BATCH_BYTES - size)
            batch.append((f, offset, length))
            size += length
            offset += length
            if size >= BATCH_BYTES:
                yield batch
                batch, size = [], 0
            if offset >= f.item.size:
                break
    if batch:
        yield batch


def _flushed(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.warning("reclone: flush of the staging area failed: %s", exc)  # the swap's counts


async def _once(fetches: list[Fetch]) -> AsyncGenerator[list[Fetch], None]:
    yield fetches
