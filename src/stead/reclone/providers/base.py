"""The clone provider seam: how a passive node is rebuilt from the active.

A provider rebuilds one node at a time so that it becomes a copy of the active, except for
the node's preserved configuration (host name, management address, node key, machine-id, and
what else the provider keeps), and keeps what it replaced as one rollback generation until it
is told to delete it. The agent owns everything around a reclone: choosing the node, the gate
(another passive stays in sync), the run id, the full check of the protected set afterwards,
and the history. A provider owns only the machine or the trees.

Every provider, fakes included, passes ``tests/unit/test_provider_conformance.py``.

Duties, by kind:

Critical in their timing:
- :meth:`CloneProvider.clone` may take minutes (it copies disks or trees). It must not block
  the event loop: blocking work goes to a worker thread. It reports phases through
  ``progress``, which is called on the event loop's thread and must stay a quick assignment.
- :meth:`CloneProvider.plan`, :meth:`CloneProvider.preserved` and
  :meth:`CloneProvider.generation` only read, and return within seconds.

Must be atomic (from the caller's point of view):
- :meth:`CloneProvider.clone` either completes (the node is the new copy, and the original is
  kept as the generation, or deleted if ``delete_original``) or fails with the node as it
  was: whatever it created is removed, and what it stopped is started again. A provider that
  cannot undo a step once it started it (the built-in swap) finishes it instead, and says so
  in its docstring. One generation per node: a successful clone drops the older one.
- :meth:`CloneProvider.rollback` puts the original back and uses the generation up; it fails
  with :class:`~stead.errors.RecloneError` and changes nothing when there is no generation or
  the original was deleted.
- :meth:`CloneProvider.delete_original` is idempotent.

Must refuse, with :class:`~stead.errors.RecloneError` and without changing anything:
- a node the provider does not know, the active itself as the node to rebuild, an active the
  provider does not know, and a name it would create that is already taken.

:meth:`CloneProvider.plan` never changes anything: it is what ``--dry-run`` shows.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from stead.errors import RecloneError

Progress = Callable[[dict[str, Any]], None]
"""Called with ``{"phase": ..., **details}`` as a clone moves on (on the event loop)."""


def no_progress(update: dict[str, Any]) -> None:
    """The default ``progress``: nobody watches."""


@dataclass(frozen=True, slots=True)
class ProviderPlan:
    """What a clone would do, in the order it would do it (``--dry-run``)."""

    provider: str
    node: str
    active: str
    steps: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    preserved: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "node": self.node,
            "active": self.active,
            "steps": list(self.steps),
            "summary": dict(self.summary),
            "preserved": dict(self.preserved),
        }


@dataclass(frozen=True, slots=True)
class Generation:
    """The rollback generation of a node: what the last clone replaced."""

    node: str
    run: str
    deleted: bool = False  # delete_original: the original is gone; rollback is impossible
    detail: str = ""  # where it is kept (a domain name, the generation directories)


@dataclass(frozen=True, slots=True)
class CloneResult:
    """The outcome of a successful clone."""

    provider: str
    node: str
    active: str
    run: str
    generation: Generation | None  # None: the node had nothing to keep (a new machine)
    summary: dict[str, Any] = field(default_factory=dict)
    preserved: dict[str, str] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "node": self.node,
            "active": self.active,
            "run": self.run,
            "generation": None
            if self.generation is None
            else {
                "run": self.generation.run,
                "deleted": self.generation.deleted,
                "detail": self.generation.detail,
            },
            "summary": dict(self.summary),
            "preserved": dict(self.preserved),
        }


class CloneProvider(abc.ABC):
    """Rebuilds a node from the active, keeps one rollback generation per node.

    Every method takes the node by its Stead name (``[[nodes]] name``); the provider maps it
    to its own objects (a virtual machine, the node's agent). ``run`` is the agent's run id:
    unique, safe in file and domain names, used to name what the run creates.
    """

    __slots__ = ()

    name: str = "provider"

    @abc.abstractmethod
    def nodes(self) -> list[str]:
        """The nodes this provider can rebuild (the active among them)."""

    def describe(self) -> dict[str, Any]:
        """What the provider is, for ``stead reclone status`` and logs. No secrets."""
        return {"provider": self.name, "nodes": self.nodes()}

    @abc.abstractmethod
    async def plan(
        self, node: str, *, active: str, run: str, delete_original: bool = False
    ) -> ProviderPlan:
        """What :meth:`clone` would do; changes nothing, refuses what it would refuse."""

    @abc.abstractmethod
    async def clone(
        self,
        node: str,
        *,
        active: str,
        run: str,
        delete_original: bool = False,
        progress: Progress = no_progress,
    ) -> CloneResult:
        """Rebuild ``node`` as a copy of ``active``, keeping its preserved configuration."""

    @abc.abstractmethod
    async def rollback(self, node: str) -> Generation:
        """Put back what the last clone of ``node`` replaced; returns the generation used."""

    @abc.abstractmethod
    async def delete_original(self, node: str) -> None:
        """Delete the rollback generation of ``node`` (nothing to do when there is none)."""

    @abc.abstractmethod
    async def generation(self, node: str) -> Generation | None:
        """The rollback generation of ``node``, if a clone left one (deleted or not)."""

    @abc.abstractmethod
    async def preserved(self, node: str) -> dict[str, str]:
        """The configuration that ``node`` keeps across a clone, as the provider sees it."""

    async def close(self) -> None:  # noqa: B027 (an optional hook: most hold nothing)
        """Release connections; the provider is not used afterwards."""


def check_pair(known: Iterable[str], node: str, active: str) -> None:
    """Refuse unknown nodes and recloning the active (the checks every provider makes)."""
    names = set(known)
    if node not in names:
        raise RecloneError(f"{node!r} is not a node this clone provider knows")
    if active not in names:
        raise RecloneError(f"the active {active!r} is not a node this clone provider knows")
    if node == active:
        raise RecloneError(f"{node} is the active; only a passive is recloned")


def check_node(known: Iterable[str], node: str) -> None:
    if node not in set(known):
        raise RecloneError(f"{node!r} is not a node this clone provider knows")
