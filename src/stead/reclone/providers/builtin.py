"""The built-in provider behind the seam: the passive rebuilds its own trees over the channel.

The mechanism is :mod:`stead.reclone.builtin` (the passive's :class:`Rebuilder`) driven by the
agent's requests (``reclone-start``, ``reclone-status``, ``reclone-rollback``). This adapter
knows none of that: it talks to a :class:`BuiltinBackend`, which the agent implements with
its requests to the node, and the tests with a real :class:`~stead.reclone.swap.Swapper` on
temporary trees.

Atomicity: the node's swap cannot be undone half way; once it started it is finished (on the
node's next start if need be, see :mod:`stead.reclone.swap`). A clone that fails before it
leaves the node as it was; after it, the node has the new trees and the rollback generation.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from stead.errors import ChannelError, RecloneError
from stead.reclone.providers.base import (
    CloneProvider,
    CloneResult,
    Generation,
    Progress,
    ProviderPlan,
    check_node,
    check_pair,
    no_progress,
)


class BuiltinBackend(Protocol):
    """What the built-in provider needs from the agent (one method per request)."""

    def nodes(self) -> list[str]:
        """Every node of the cluster."""
        ...

    async def start(
        self, node: str, *, active: str, run: str, delete_original: bool, dry_run: bool
    ) -> None:
        """Ask ``node`` to start rebuilding from ``active`` (``reclone-start``)."""
        ...

    async def status(self, node: str) -> dict[str, Any]:
        """The node's ``reclone-status``: ``run``, ``phase``, ``summary``, ``error``..."""
        ...

    async def rollback(self, node: str) -> dict[str, Any]:
        """``reclone-rollback``: ``{"run": ..., "operations": ...}``."""
        ...

    async def delete_original(self, node: str) -> None:
        """Drop the node's generation directories (the swapper's ``delete_generation``)."""
        ...

    async def generation(self, node: str) -> dict[str, Any] | None:
        """The node's generation record (``run``, ``delete_original``), if any."""
        ...

    async def preserved(self, node: str) -> dict[str, str]:
        """The node's preserved paths and what they hold (or their digests)."""
        ...


class BuiltinProvider(CloneProvider):
    """Drives a node's own rebuild and waits for it, reporting its phases."""

    __slots__ = ("backend", "monotonic", "poll", "restart_grace", "wait")
    name = "builtin"

    def __init__(
        self,
        backend: BuiltinBackend,
        *,
        poll: float = 0.5,
        restart_grace: float = 90.0,
        wait: Callable[[float], Awaitable[None]] = asyncio.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.poll = poll
        self.restart_grace = restart_grace  # a node silent this long (restarting) failed
        self.wait = wait
        self.monotonic = monotonic

    def nodes(self) -> list[str]:
        return list(self.backend.nodes())

    async def _run(
        self,
        node: str,
        *,
        active: str,
        run: str,
        delete_original: bool,
        dry_run: bool,
        progress: Progress,
    ) -> dict[str, Any]:
        await self.backend.start(
            node, active=active, run=run, delete_original=delete_original, dry_run=dry_run
        )
        silent_since: float | None = None
        while True:
            await self.wait(self.poll)
            try:
                status = await self.backend.status(node)
            except ChannelError as exc:
                now = self.monotonic()
                silent_since = now if silent_since is None else silent_since
                if now - silent_since > self.restart_grace:
                    raise RecloneError(f"{node} stopped answering: {exc}") from exc
                continue
            silent_since = None
            if status.get("run") != run:
                recovered = status.get("recovered") or "no interrupted reclone found"
                raise RecloneError(f"{node} restarted during the reclone: {recovered}")
            progress({"phase": status.get("phase", ""), "node": node, "status": status})
            if status.get("phase") == "failed":
                raise RecloneError(f"{node}: {status.get('error') or 'failed'}")
            if status.get("phase") == "done":
                return status

    async def plan(
        self, node: str, *, active: str, run: str, delete_original: bool = False
    ) -> ProviderPlan:
        check_pair(self.nodes(), node, active)
        status = await self._run(
            node,
            active=active,
            run=run,
            delete_original=delete_original,
            dry_run=True,
            progress=no_progress,
        )
        summary = dict(status.get("summary") or {})
        steps = [
            f"{node} fetches the manifest of {active}'s reclone scope and plans",
            f"{node} stages {summary.get('fetch_files', 0)} files "
            f"({summary.get('fetch_bytes', 0)} bytes) and verifies them",
            f"{node} swaps them in: {summary.get('create', 0)} created, "
            f"{summary.get('replace', 0)} replaced, {summary.get('delete', 0)} deleted",
            "the originals are deleted"
            if delete_original
            else f"the originals are kept as the rollback generation of run {run}",
            f"{active} runs a full check of {node}'s protected set",
        ]
        skipped = list(status.get("skipped") or [])
        return ProviderPlan(
            provider=self.name,
            node=node,
            active=active,
            steps=steps,
            summary={**summary, "skipped_paths": skipped},
            preserved=await self.backend.preserved(node),
        )

    async def clone(
        self,
        node: str,
        *,
        active: str,
        run: str,
        delete_original: bool = False,
        progress: Progress = no_progress,
    ) -> CloneResult:
        check_pair(self.nodes(), node, active)
        status = await self._run(
            node,
            active=active,
            run=run,
            delete_original=delete_original,
            dry_run=False,
            progress=progress,
        )
        generation = await self.generation(node)
        return CloneResult(
            provider=self.name,
            node=node,
            active=active,
            run=run,
            generation=generation,
            summary=dict(status.get("summary") or {}),
            preserved=await self.backend.preserved(node),
        )

    async def rollback(self, node: str) -> Generation:
        check_node(self.nodes(), node)
        answer = await self.backend.rollback(node)
        operations = answer.get("operations", 0)
        return Generation(
            node, str(answer.get("run", "")), detail=f"{operations} operations undone"
        )

    async def delete_original(self, node: str) -> None:
        check_node(self.nodes(), node)
        await self.backend.delete_original(node)

    async def generation(self, node: str) -> Generation | None:
        check_node(self.nodes(), node)
        record = await self.backend.generation(node)
        if record is None:
            return None
        return Generation(
            node,
            str(record.get("run", "")),
            deleted=bool(record.get("delete_original", False)),
            detail="generation directories in each tree's .stead-reclone area",
        )

    async def preserved(self, node: str) -> dict[str, str]:
        check_node(self.nodes(), node)
        return await self.backend.preserved(node)
