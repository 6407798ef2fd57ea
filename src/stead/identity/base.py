"""The identity seam: whatever makes clients reach this node as "the service".

A backend takes the public identity when the node becomes active and gives it back when it
stops being active. Three stand-ins live here: the abstract seam, ``NullIdentity`` for a
cluster without a public identity, and ``CompositeIdentity``, which chains backends.

Every backend records what it is about to change in a small JSON state file *before* it
changes it (``StateFile``: temporary file, fsync, rename, fsync of the directory), so that an
agent restarted after ``kill -9`` can still undo exactly what its predecessor did.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stead.errors import IdentityError

log = logging.getLogger(__name__)

STATE_VERSION = 1


class IdentityBackend(abc.ABC):
    """One way of being the public identity; the executor takes and releases it.

    Critical in their timing (the executor wraps each call in ``asyncio.timeout``):

    - ``take`` returns once the identity is in place and its first announcement is sent
      (gratuitous ARP, DNS update...). Repeated announcements may continue in the background
      for a short, bounded time, and stop when ``release`` is called. A take of a few seconds
      at most: it lies on the failover path.
    - ``release`` returns once nothing of the identity is left on this host. The executor
      lets the peer take over only after it, so it must not return early, and it stops any
      announcement still pending before it returns.

    Must be idempotent and crash-safe:

    - ``take`` twice is ``take`` once; ``take`` after a crash half-way finishes the job.
      A ``take`` that fails leaves nothing taken (it undoes its own changes) and raises
      ``IdentityError``.
    - ``release`` when nothing is held is a no-op. It undoes exactly what ``take`` changed,
      as recorded in the backend's state file, never what was there before ``take``; a new
      instance with the same state file releases what a killed predecessor took.
    - A cancelled ``take`` (timeout) followed by ``release`` must leave nothing behind:
      blocking work that outlives the cancellation finishes before ``release`` starts.

    Cheap and without side effects: ``holds`` (called every decision cycle) says whether this
    backend took the identity and it is still in place; ``describe`` says in one line what
    the identity is, for logs and status.
    """

    __slots__ = ()

    @abc.abstractmethod
    async def take(self) -> None:
        """Become the public identity holder."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give the identity back, leaving the host as it was before ``take``."""

    @abc.abstractmethod
    async def holds(self) -> bool:
        """Whether this backend took the identity and all of it is still in place."""

    @abc.abstractmethod
    def describe(self) -> str:
        """The identity in one line, e.g. "host name svc, 198.51.100.10/24 on eth0"."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.describe()}>"


class BlockingIdentity(IdentityBackend):
    """A backend whose work blocks (netlink, DNS exchanges): each call runs its blocking
    half in a worker thread, where the backend serialises them under its own lock."""

    __slots__ = ()

    async def take(self) -> None:
        await asyncio.to_thread(self._take)

    async def release(self) -> None:
        await asyncio.to_thread(self._release)

    async def holds(self) -> bool:
        return await asyncio.to_thread(self._holds)

    @abc.abstractmethod
    def _take(self) -> None: ...

    @abc.abstractmethod
    def _release(self) -> None: ...

    @abc.abstractmethod
    def _holds(self) -> bool: ...


class NullIdentity(IdentityBackend):
    """The stand-in when no public identity is configured: taking it changes nothing."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = False

    async def take(self) -> None:
        self._held = True

    async def release(self) -> None:
        self._held = False

    async def holds(self) -> bool:
        return self._held

    def describe(self) -> str:
        return "no public identity"


class CompositeIdentity(IdentityBackend):
    """Several backends as one: taken in order, released in reverse order.

    A failed take releases every backend of the chain (the failed one too, in case it left
    something behind) before it raises, so that the chain is either held or not at all. A
    cancelled take releases nothing by itself: the executor calls ``release`` afterwards.
    """

    __slots__ = ("_backends",)

    def __init__(self, backends: Sequence[IdentityBackend]) -> None:
        self._backends = tuple(backends)

    @property
    def backends(self) -> tuple[IdentityBackend, ...]:
        return self._backends

    async def take(self) -> None:
        for index, backend in enumerate(self._backends):
            try:
                await backend.take()
            except Exception as exc:
                log.warning("taking %s failed, releasing the identity", backend.describe())
                problems = await self._release_all(self._backends[: index + 1])
                if not isinstance(exc, IdentityError) or problems:
                    raise IdentityError(
                        f"could not take {backend.describe()}: {exc}"
                        + "".join(f"; {problem}" for problem in problems)
                    ) from exc
                raise

    async def release(self) -> None:
        problems = await self._release_all(self._backends)
        if problems:
            raise IdentityError("; ".join(problems))

    async def holds(self) -> bool:
        for backend in self._backends:
            if not await backend.holds():
                return False
        return True

    def describe(self) -> str:
        return " + ".join(backend.describe() for backend in self._backends) or "nothing"

    @staticmethod
    async def _release_all(backends: Sequence[IdentityBackend]) -> list[str]:
        """Release in reverse order; one failure does not stop the others."""
        problems: list[str] = []
        for backend in reversed(backends):
            try:
                await backend.release()
            except Exception as exc:
                log.error("releasing %s failed: %s", backend.describe(), exc)
                problems.append(f"could not release {backend.describe()}: {exc}")
        return problems


class StateFile:
    """A small JSON document that survives crashes: what a backend changed, to undo it.

    ``save`` is atomic and durable (a reader sees the old or the new content, never a mix,
    and the new content is on disk when ``save`` returns); ``clear`` removes it durably.
    Blocking: call it from a worker thread.
    """

    __slots__ = ("path",)

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any] | None:
        """The saved document, or None when there is none."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise IdentityError(f"cannot read state file {self.path}: {exc}") from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise IdentityError(f"state file {self.path} is not JSON: {exc}") from exc
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            raise IdentityError(
                f"state file {self.path} is not a version {STATE_VERSION} identity state"
            )
        return data

    def save(self, data: dict[str, Any]) -> None:
        text = json.dumps({**data, "version": STATE_VERSION}, indent=2, sort_keys=True)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp"
            )
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    handle.write(text + "\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self._sync_directory()
        except OSError as exc:
            raise IdentityError(f"cannot write state file {self.path}: {exc}") from exc

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise IdentityError(f"cannot remove state file {self.path}: {exc}") from exc
        with contextlib.suppress(OSError):
            self._sync_directory()

    def _sync_directory(self) -> None:
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
