"""What the agent's parts share: attributes and methods, typed once.

:class:`stead.agent.daemon.Agent` is built from mixins (operator requests, role changes,
procedures), each in its own module; they all derive from this declaration so that each
module type-checks against the whole agent without importing it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ssl

    from stead.agent import decide as d
    from stead.agent.jobs import JobTable
    from stead.agent.membership import Membership
    from stead.agent.probes import WitnessMonitor
    from stead.agent.progress import AppendLog
    from stead.channel import messages as m
    from stead.channel.transport import ChannelServer
    from stead.config.load import Loaded
    from stead.config.schema import ClusterConfig
    from stead.identity.base import IdentityBackend
    from stead.identity.hooks import Hooks
    from stead.replication.capture.core import EventCapture
    from stead.replication.filters import Filter
    from stead.replication.journal import Journal
    from stead.replication.manifest import Manifest
    from stead.replication.receiver import Receiver
    from stead.replication.sender import Sender
    from stead.services.manager import ServiceManager
    from stead.store.db import StateStore


class AgentBase:
    loaded: Loaded
    cluster: ClusterConfig
    me: str
    state_dir: Path
    store: StateStore
    role: str
    epoch: int
    roots: dict[str, Path]
    filters: dict[str, Filter]
    jobs: JobTable
    started: float
    started_monotonic: float
    clean_start: bool
    _acted: bool
    journal: Journal | None
    manifest: Manifest | None
    capture: EventCapture[Any] | None
    senders: dict[str, Sender]
    receiver: Receiver | None
    appends: AppendLog
    journal_error: str
    tasks: asyncio.TaskGroup
    client_ssl: ssl.SSLContext
    server_ssl: ssl.SSLContext
    _emit_lock: asyncio.Lock
    # role changes
    voted_epoch: int
    voted_for: str
    maintenance: bool
    campaign: d.Campaign | None
    handover: int | None
    failover_to: int | None
    decision: str
    decided_at: float
    public_held: bool
    _public_servers: list[ChannelServer]
    _transition: asyncio.Lock
    _procedure: str
    _wake_cycle: asyncio.Event
    env: dict[str, str]
    identity: IdentityBackend
    management: IdentityBackend
    hooks: Hooks
    services: ServiceManager
    witnesses: WitnessMonitor
    membership: Membership
    _monitor: asyncio.Task[None] | None

    async def flush_emitted(self) -> None:
        raise NotImplementedError

    async def emit(self, entries: list[Any]) -> None:
        raise NotImplementedError

    async def switch_runtime(self) -> None:
        raise NotImplementedError

    async def listen_on(self, address: str) -> ChannelServer:
        raise NotImplementedError

    async def wait_sync(self, timeout: float, *, require_all: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    async def promote(self, epoch: int, reason: str) -> None:
        raise NotImplementedError

    async def demote(self, epoch: int, reason: str) -> None:
        raise NotImplementedError

    async def take_public(self, reason: str) -> None:
        raise NotImplementedError

    async def release_public(self, reason: str) -> None:
        raise NotImplementedError

    def position(self) -> int:
        raise NotImplementedError

    def _hello(self) -> m.Hello:
        raise NotImplementedError

    def _best_passive(self) -> str | None:
        raise NotImplementedError

    def _heard_active(self, now: float) -> str | None:
        raise NotImplementedError

    def start_switchover(self, to: str | None, *, reason: str = "operator request") -> Any:
        raise NotImplementedError

    def start_check(self, *, node: str | None, fast: bool) -> Any:
        raise NotImplementedError

    def start_reclone(
        self,
        nodes: list[str],
        *,
        all_nodes: bool = False,
        delete_original: bool = False,
        force: bool = False,
        dry_run: bool = False,
        trigger: str = "operator",
    ) -> Any:
        raise NotImplementedError

    async def drift(self, *, node: str | None, trees: bool, packages: bool) -> dict[str, Any]:
        raise NotImplementedError

    async def _accept_handover(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def in_sync(self) -> bool:
        raise NotImplementedError

    def observe(self, now: float) -> d.Observed:
        raise NotImplementedError

    async def _campaign(self, epoch: int) -> None:
        raise NotImplementedError

    async def answer_reclone(self, peer: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def _answer_vote(self, peer: str, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def _public_probe_loop(self) -> None:
        raise NotImplementedError

    def _public_visible(self) -> bool | None:
        raise NotImplementedError
