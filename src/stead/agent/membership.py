"""Membership links: heartbeats between every pair of nodes, on every channel address.

Every node dials every address of every peer and sends a heartbeat there each
``channel.heartbeat`` seconds; what a node *receives* on the links its peers dialled is what
tells it who is alive, on which of its own addresses (channels), and where each peer stands
(role, epoch, position, sync, witnesses). The same links carry the few requests of the
decision cycle (votes, handovers) from the dialling side, answered on the same connection.

Timing duties: a heartbeat that cannot be sent within the failover timeout breaks its link
(then redialled with backoff); liveness is judged only by heartbeats received, never by a
link that merely looks open. Nothing here decides anything: the decision cycle reads
:meth:`Membership.peer` and acts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from stead.aio import TaskGroup, first_cause
from stead.channel import messages as m
from stead.channel.transport import Backoff, Connection, connect
from stead.config.schema import ClusterConfig, NodeSection
from stead.errors import ChannelError, ProtocolError, SteadError, TimeoutExpired

log = logging.getLogger(__name__)

RequestHandler = Callable[[str, str, dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass
class PeerLive:
    """What this node has heard from one peer."""

    name: str
    last_heard: float | None = None  # monotonic time of the last heartbeat, any channel
    heard_on: dict[str, float] = field(default_factory=dict)  # my address -> last heard
    last: m.Heartbeat | None = None
    links: dict[str, str] = field(default_factory=dict)  # peer address -> "up" or the error


class Membership:
    def __init__(
        self,
        *,
        me: str,
        cluster: ClusterConfig,
        ssl_context: ssl.SSLContext,
        hello: Callable[[], m.Hello],
        heartbeat: Callable[[], m.Heartbeat],
        handle_request: RequestHandler,
        on_heartbeat: Callable[[str, m.Heartbeat, m.Heartbeat | None], None] | None = None,
    ) -> None:
        self.me = me
        self.cluster = cluster
        self.ssl_context = ssl_context
        self.hello = hello
        self.heartbeat = heartbeat
        self.handle_request = handle_request
        self.on_heartbeat = on_heartbeat
        self.peers = {peer.name: PeerLive(peer.name) for peer in cluster.peers(me)}
        self._outgoing: dict[str, dict[str, Connection]] = {name: {} for name in self.peers}
        self._pending: dict[int, asyncio.Future[m.Reply]] = {}
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()

    # ---- dialling ----------------------------------------------------------------------

    async def run(self) -> None:
        async with TaskGroup() as tasks:
            for peer in self.cluster.peers(self.me):
                for address in peer.addresses:
                    tasks.create_task(self._dial_forever(peer, address))

    def beat_now(self) -> None:
        """Send the next heartbeat at once (after a role or epoch change)."""
        self._wake.set()

    async def _dial_forever(self, peer: NodeSection, address: str) -> None:
        channel = self.cluster.channel
        backoff = Backoff(initial=0.05, maximum=max(channel.heartbeat, 0.2))
        live = self.peers[peer.name]
        while True:
            try:
                await self._link(peer, address, backoff)
            except (SteadError, OSError, TimeoutError, ssl.SSLError) as exc:
                reason = str(exc) or type(exc).__name__
                if live.links.get(address) != reason:
                    log.info("heartbeat link to %s (%s) down: %s", peer.name, address, reason)
                live.links[address] = reason
            finally:
                self._outgoing[peer.name].pop(address, None)
            await asyncio.sleep(backoff.next_delay())

    async def _link(self, peer: NodeSection, address: str, backoff: Backoff) -> None:
        channel = self.cluster.channel
        timeout = self.cluster.failover.timeout
        conn = await connect(
            address,
            channel.port,
            self.ssl_context,
            expected_peer=peer.name,
            timeout=min(channel.connect_timeout, timeout),
            max_frame=1024**2,
            compression="never",
            io_timeout=timeout,
        )
        try:
            await conn.send(self.hello())
            answer = await conn.recv(timeout=timeout)
            if isinstance(answer, m.Error):
                raise ChannelError(f"{peer.name} says {answer.code}: {answer.message}")
            if not isinstance(answer, m.Hello) or answer.cluster_id != self.cluster.cluster.id:
                raise ProtocolError(f"{peer.name} did not answer with this cluster's hello")
            self._outgoing[peer.name][address] = conn
            self.peers[peer.name].links[address] = "up"
            backoff.reset()
            try:
                async with TaskGroup() as tasks:
                    tasks.create_task(self._send_beats(conn))
                    tasks.create_task(self._read_replies(conn, peer.name))
            except BaseExceptionGroup as group:
                raise first_cause(group) from None
        finally:
            await conn.close()

    async def _send_beats(self, conn: Connection) -> None:
        interval = self.cluster.channel.heartbeat
        while True:
            await conn.send(self.heartbeat())
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self._wake.wait()

    async def _read_replies(self, conn: Connection, name: str) -> None:
        while True:
            message = await conn.recv(timeout=None)
            if isinstance(message, m.Reply):
                future = self._pending.pop(message.id, None)
                if future is not None and not future.done():
                    future.set_result(message)
            elif isinstance(message, m.Error):
                raise ChannelError(f"{name} says {message.code}: {message.message}")
            else:
                raise ProtocolError(f"unexpected {type(message).__name__} on a heartbeat link")

    async def request(
        self, peer: str, kind: str, body: dict[str, Any], timeout: float
    ) -> dict[str, Any]:
        """Ask a peer over any of its open links; raises ChannelError if none answers."""
        links = list(self._outgoing.get(peer, {}).values())
        if not links:
            raise ChannelError(f"no heartbeat link to {peer} is up")
        request_id = next(self._ids)
        future: asyncio.Future[m.Reply] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            for conn in links:  # the first link that takes the request carries it
                try:
                    await conn.send(m.Request(id=request_id, kind=kind, body=body))
                    break
                except SteadError:
                    continue
            else:
                raise ChannelError(f"no heartbeat link to {peer} took the request")
            try:
                async with asyncio.timeout(timeout):
                    reply = await future
            except TimeoutError:
                raise ChannelError(f"{peer} did not answer {kind} within {timeout} s") from None
        finally:
            self._pending.pop(request_id, None)
        if not reply.ok:
            raise ChannelError(f"{peer} refused {kind}: {reply.error}")
        return reply.body

    # ---- accepting ---------------------------------------------------------------------

    async def serve(self, conn: Connection, hello: m.Hello) -> None:
        """A peer dialled us: answer its hello, then record its heartbeats."""
        name = conn.peer_name
        if name not in self.peers:
            raise ProtocolError(f"{name!r} is not a peer of {self.me}")
        if hello.node != name:
            raise ProtocolError(f"certificate says {name}, hello says {hello.node}")
        await conn.send(self.hello())
        local = conn.local_address
        try:
            async with TaskGroup() as tasks:
                while True:
                    message = await conn.recv(timeout=self.cluster.failover.timeout * 2)
                    if isinstance(message, m.Heartbeat):
                        self._heard(name, local, message)
                    elif isinstance(message, m.Request):
                        tasks.create_task(self._answer(conn, name, message))
                    else:
                        raise ProtocolError(f"unexpected {type(message).__name__} from {name}")
        except BaseExceptionGroup as group:
            cause = first_cause(group)
            if isinstance(cause, TimeoutExpired):  # the peer went silent: a link, not a bug
                raise ChannelError(f"heartbeats from {name} stopped: {cause}") from None
            raise cause from None

    def _heard(self, name: str, local: str, beat: m.Heartbeat) -> None:
        now = time.monotonic()
        live = self.peers[name]
        live.last_heard = now
        live.heard_on[local] = now
        previous, live.last = live.last, beat
        if self.on_heartbeat is not None:
            self.on_heartbeat(name, beat, previous)

    async def _answer(self, conn: Connection, name: str, request: m.Request) -> None:
        try:
            body = await self.handle_request(name, request.kind, request.body)
            reply = m.Reply(id=request.id, ok=True, body=body, error="")
        except SteadError as exc:
            reply = m.Reply(id=request.id, ok=False, body={}, error=str(exc))
        with contextlib.suppress(SteadError):
            await conn.send(reply)

    # ---- queries -----------------------------------------------------------------------

    def status(self, now: float) -> dict[str, Any]:
        return {
            name: {
                "heartbeat_age": round(now - live.last_heard, 3) if live.last_heard else None,
                "channels": {
                    address: round(now - heard, 3) for address, heard in live.heard_on.items()
                },
                "links": dict(live.links),
                "role": live.last.role if live.last else None,
                "epoch": live.last.epoch if live.last else None,
            }
            for name, live in self.peers.items()
        }
