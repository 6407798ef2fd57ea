"""The built-in clone provider: a passive rebuilds its system trees from the active's.

The passive drives its own reclone (the active only serves bytes, see
:mod:`stead.reclone.transfer`): it fetches the active's manifest, walks its own trees, plans
(:mod:`stead.reclone.plan`), stages and verifies every new or changed file, and swaps
(:mod:`stead.reclone.swap`). Until the swap the node is untouched and stays a usable passive;
a failure or an interruption before it discards the staging, one during it is finished on
the next start. The protected set is not copied here: replication keeps it identical, and
the active follows every reclone with a full check of the node, whose repairs travel through
the journal like every other change.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import ssl
import stat
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stead.channel import messages as m
from stead.channel.transport import Connection, connect
from stead.config.schema import ClusterConfig, NodeSection
from stead.config.system import PathSet
from stead.errors import ChannelError, ProtocolError, RecloneError, SteadError
from stead.reclone.plan import Fetch, Item, Kind, Planner, Work
from stead.reclone.swap import AREA, Meta, Swapper, stage_dir, sync_paths
from stead.reclone.transfer import REPLY_TIMEOUT, Fetcher, Source
from stead.system import hashcache
from stead.system.hashcache import HashCache
from stead.system.manifest import (
    HashWanted,
    Scope,
    SystemManifest,
    build_manifest,
    manifest_of_paths,
)

log = logging.getLogger(__name__)

_KINDS: dict[str, Kind] = {"file": "file", "dir": "dir", "symlink": "symlink"}


def scope_of(cluster: ClusterConfig) -> Scope:
    """The system trees of the reclone scope; the reclone areas are never part of them."""
    scope = Scope.from_config(cluster)
    return Scope(
        trees=scope.trees,
        exclude=(*scope.exclude, AREA),
        preserve=scope.preserve,
        skip=scope.skip,
    )


def hash_cache_path(state_dir: Path) -> Path:
    """The agent's :class:`HashCache` of its system trees (used as active and as passive)."""
    return state_dir / hashcache.FILE_NAME


def collect(
    scope: Scope,
    *,
    serving: bool,
    cache: Path | None = None,
    hash_wanted: HashWanted | None = None,
    only: list[str] | None = None,
    emit: Callable[[dict[str, Item]], None] | None = None,
    held: list[str] | None = None,
) -> dict[str, Item]:
    """Items of every path of the trees (blocking). Serving (the active), a path it cannot
    read is left out, so that it is neither copied nor deleted on the passive. With a
    ``cache`` file, only files changed since the last walk are read; with ``hash_wanted``,
    only the files it names are read (the others have an empty digest unless cached).
    With ``only``, just those paths, each file hashed (no walk). With ``emit``, the items
    go to it in parts as the walk goes (a directory before what it holds) and none are
    returned. ``held`` receives the preserved paths the walk met and set apart (they have
    no item: the passive keeps them, and what holds them)."""
    hashes = HashCache(cache) if cache is not None else None
    if only is not None:
        manifest = manifest_of_paths(scope, only, cache=hashes)
        return _items(manifest, manifest.entries, serving)
    if emit is None:
        manifest = build_manifest(scope, cache=hashes, hash_wanted=hash_wanted)
        if held is not None:
            held.extend(manifest.preserved)
        return _items(manifest, manifest.entries, serving)

    def part(manifest: SystemManifest, paths: list[str]) -> None:
        emit(_items(manifest, paths, serving))

    build_manifest(scope, cache=hashes, hash_wanted=hash_wanted, emit=part)
    return {}


def _items(manifest: SystemManifest, paths: Iterable[str], serving: bool) -> dict[str, Item]:
    items = {}
    entries, mtimes = manifest.entries, manifest.mtimes
    for path in paths:  # once per path of the trees: :func:`_item`, inlined
        entry = entries[path]
        if entry.error:
            if serving:
                log.warning("reclone: %s left out: %s", path, entry.error)
                continue
            digest = ""
        else:
            digest = entry.digest.hex()
        mtime = mtimes.get(path)
        if mtime is None:
            try:
                mtime = os.lstat(entry.path).st_mtime_ns
            except OSError:
                continue
        kind = _KINDS.get(entry.kind, "other")
        items[path] = Item(
            kind, entry.mode, entry.uid, entry.gid, entry.size, mtime, digest, entry.target
        )
    return items


def source_for(cluster: ClusterConfig, state_dir: Path | None = None) -> Source:
    scope = scope_of(cluster)
    cache = hash_cache_path(state_dir) if state_dir is not None else None

    def serving(
        hash_wanted: HashWanted | None = None,
        only: list[str] | None = None,
        emit: Callable[[dict[str, Item]], None] | None = None,
    ) -> dict[str, Item]:
        return collect(
            scope, serving=True, cache=cache, hash_wanted=hash_wanted, only=only, emit=emit
        )

    return Source(serving, cache)


def sizes_cached(cache_path: Path, scope: Scope) -> dict[str, int]:
    """The regular files of the trees our hash cache knows, and their sizes then: a hint
    of what we hold, read without walking the trees (blocking)."""
    trees = tuple(scope.trees)
    prefixes = tuple(tree.rstrip("/") + "/" for tree in trees)
    return {
        path: size
        for path, size in HashCache(cache_path).sizes().items()
        if path in trees or path.startswith(prefixes)
    }


def remember_swapped(cache_path: Path, work: Work, verified: dict[str, str]) -> None:
    """Record the digests of the files a swap just put in place (``verified`` while
    staged), so that the next walk need not read them again (blocking)."""
    cache = HashCache(cache_path)
    for f in work.fetch:
        digest = verified.get(f.path, "")
        if f.item.kind != "file" or not digest:
            continue
        try:
            st = os.lstat(f.path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (
            f.item.size,
            f.item.mtime_ns,
        ):
            cache.remember(f.path, st, bytes.fromhex(digest))
    cache.save(keep_previous=True)


@dataclass
class RunState:
    """What ``reclone-status`` answers: the phase, progress and outcome of the last run."""

    run: str = ""
    phase: str = "idle"  # manifest, plan, copy, swap, done, failed
    started: float = 0.0
    finished: float = 0.0
    summary: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    error: str = ""
    fetcher: Fetcher | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "run": self.run,
            "phase": self.phase,
            "started": self.started,
            "finished": self.finished,
            "summary": self.summary,
            "skipped": self.skipped[:50],
            "error": self.error,
            "progress": self.fetcher.progress.describe() if self.fetcher else {},
        }


class Rebuilder:
    """The passive's side of the built-in provider."""

    def __init__(
        self,
        *,
        me: str,
        cluster: ClusterConfig,
        state_dir: Path,
        ssl_context: ssl.SSLContext,
        hello: Callable[[], m.Hello],
    ) -> None:
        self.me = me
        self.cluster = cluster
        self.swapper = Swapper(state_dir / "reclone")
        self.cache_path = hash_cache_path(state_dir)
        self.ssl_context = ssl_context
        self.hello = hello
        self.state = RunState()
        self.task: asyncio.Task[None] | None = None

    @property
    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self, run: str, active: str, *, delete_original: bool, dry_run: bool) -> None:
        if self.busy and self.state.phase != "done":
            raise RecloneError(f"{self.me} is already recloning (run {self.state.run})")
        # A run that is done may still be keeping its digests: the new one waits for that.
        previous = self.task if self.busy else None
        self.state = RunState(run=run, phase="manifest", started=time.time())
        node = self.cluster.node(active)
        self.task = asyncio.get_running_loop().create_task(
            self._run(node, delete_original=delete_original, dry_run=dry_run, after=previous)
        )

    async def _run(
        self,
        active: NodeSection,
        *,
        delete_original: bool,
        dry_run: bool,
        after: asyncio.Task[None] | None = None,
    ) -> None:
        state = self.state
        try:
            if after is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(after)
            await self._rebuild(active, delete_original=delete_original, dry_run=dry_run)
            state.phase = "done"
        except asyncio.CancelledError:
            state.phase, state.error = "failed", "cancelled (the agent is stopping)"
            raise
        except Exception as exc:  # whatever it was, the active must hear that it failed
            reason = exc.kwargs.get("message") if isinstance(exc, SteadError) else None
            state.phase, state.error = "failed", str(reason or exc) or type(exc).__name__
            if isinstance(exc, SteadError | OSError):
                log.error("reclone %s failed: %s", state.run, state.error)
            else:
                log.exception("reclone %s failed", state.run)
        finally:
            state.finished = state.finished or time.time()

    async def _rebuild(self, active: NodeSection, *, delete_original: bool, dry_run: bool) -> None:
        state = self.state
        conn = await self._connect(active)
        fetcher = state.fetcher = Fetcher(conn)
        scope = scope_of(self.cluster)
        trees = list(scope.trees)
        started = time.monotonic()
        # Our own walk runs while the active walks its trees: neither waits for the other.
        held: list[str] = []  # our preserved paths: they, and what holds them, stay
        walk = asyncio.ensure_future(
            asyncio.to_thread(collect, scope, serving=False, cache=self.cache_path, held=held)
        )
        planner: Planner | None = None
        begun = False
        counts = {"parts": 0, "paths": 0, "unsure": 0}

        async def planned() -> AsyncGenerator[list[Fetch], None]:
            """The active's manifest, planned part by part as it arrives: the files of
            each part are copied while the active walks on."""
            nonlocal planner, begun
            # What we held when we last hashed, by size (our hash cache): the active reads
            # and hashes only the files we might hold already; what we lack is hashed as it
            # is copied. A wrong hint costs time, never correctness: see below.
            have = await asyncio.to_thread(sizes_cached, self.cache_path, scope)
            async for part in fetcher.manifest_parts(have):
                if planner is None:
                    here = await walk
                    planner = Planner(
                        state.run,
                        trees,
                        here,
                        PathSet(list(scope.preserve)),
                        delete_original=delete_original,
                        held=held,
                    )
                    log.info(
                        "reclone %s: the active's first part after %.2f s (%d files hinted)",
                        state.run,
                        time.monotonic() - started,
                        len(have),
                    )
                    if not dry_run:
                        await asyncio.to_thread(self.swapper.begin, planner.work.plan)
                        begun = True
                        stages = [str(stage_dir(tree, state.run)) for tree in trees]
                        fetcher.flush = functools.partial(sync_paths, stages)
                    state.phase = "plan" if dry_run else "copy"
                # Files we hold at the active's size that it did not hash (the hint was
                # stale): their digests now, so that an identical file is not copied.
                unsure = [
                    path
                    for path, item in part.items()
                    if item.kind == "file"
                    and not item.digest
                    and (mine := planner.here.get(path)) is not None
                    and mine.kind == "file"
                    and mine.size == item.size
                ]
                if unsure:
                    part.update(await fetcher.entries(unsure))
                counts["parts"] += 1
                counts["paths"] += len(part)
                counts["unsure"] += len(unsure)
                yield await self._planned(*planner.add(part), dry_run=dry_run)
            assert planner is not None  # a manifest has at least one part
            last = await self._planned(*planner.finish(), dry_run=dry_run)
            state.summary, state.skipped = planner.work.summary(), planner.work.skipped
            log.info(
                "reclone %s: the active's manifest of %d paths in %d parts in %.2f s,"
                " %d more digests asked for",
                state.run,
                counts["paths"],
                counts["parts"],
                time.monotonic() - started,
                counts["unsure"],
            )
            yield last

        try:
            if dry_run:
                async for _ in planned():
                    pass
                return
            try:
                await fetcher.fetch(planned())  # every file checked against the active's hash
            except BaseException:
                if begun and planner is not None:
                    plan = planner.work.plan
                    await asyncio.shield(asyncio.to_thread(self.swapper.abandon, plan))
                raise
            assert planner is not None
            await self._swap(fetcher, planner.work)
        finally:
            if not walk.done():
                walk.cancel()
                with contextlib.suppress(BaseException):
                    await walk  # the thread finishes its walk; nothing waits on it after this
            await fetcher.close()
            await conn.close()

    async def _planned(
        self, fetches: list[Fetch], dirs: list[tuple[str, Meta]], *, dry_run: bool
    ) -> list[Fetch]:
        """A part of the plan ready to copy: its staged directories made."""
        if dirs and not dry_run:
            await asyncio.to_thread(Swapper.make_dirs, dirs)
        return fetches

    async def _swap(self, fetcher: Fetcher, work: Work) -> None:
        state = self.state
        state.phase = "swap"
        started = time.monotonic()
        # Shielded: once the intent says "swapping", finishing is the only way out.
        await asyncio.shield(asyncio.to_thread(self.swapper.swap, work.plan))
        swapped = time.monotonic()
        # Done: the active may go on (its check of the protected set) while we keep the
        # digests of what we staged for the next reclone.
        state.phase, state.finished = "done", time.time()
        try:
            await asyncio.to_thread(remember_swapped, self.cache_path, work, fetcher.verified)
        except Exception as exc:  # a cache: the reclone is done without it
            log.warning("reclone %s: hash cache not updated: %s", state.run, exc)
        log.info(
            "reclone %s: swapped in %.2f s, hash cache updated in %.2f s",
            state.run,
            swapped - started,
            time.monotonic() - swapped,
        )

    async def _connect(self, active: NodeSection) -> Connection:
        channel = self.cluster.channel
        errors = []
        for address in active.addresses:
            try:
                conn = await connect(
                    address,
                    channel.port,
                    self.ssl_context,
                    expected_peer=active.name,
                    timeout=channel.connect_timeout,
                    max_frame=channel.max_frame,
                    compression=channel.compression,
                    io_timeout=REPLY_TIMEOUT,
                )
            except ChannelError as exc:
                errors.append(str(exc))
                continue
            await conn.send(self.hello())
            answer = await conn.recv(timeout=channel.peer_timeout)
            if isinstance(answer, m.Error):
                await conn.close()
                raise RecloneError(f"{active.name} refused the reclone: {answer.message}")
            if not isinstance(answer, m.Hello):
                await conn.close()
                raise ProtocolError(f"{active.name} did not answer with a hello")
            return conn
        raise RecloneError(f"cannot reach the active {active.name}: {'; '.join(errors)}")
