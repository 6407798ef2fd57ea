"""Membership links between two real nodes over mutual TLS on loopback, with two channels.

Each node listens on two addresses (127.0.0.2 and 127.0.0.3 for one, .4 and .5 for the
other) and dials both of its peer's. Heartbeats arrive on both channels; with one channel
gone the peer is still heard on the other; a vote request is answered over the link.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from stead import pki
from stead.agent.membership import Membership
from stead.channel import messages as m
from stead.channel.transport import ChannelServer, Connection, client_context, serve, server_context
from stead.config.schema import ClusterConfig
from stead.errors import ChannelError

ADDRESSES = {"a": ["127.0.0.2", "127.0.0.3"], "b": ["127.0.0.4", "127.0.0.5"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(port: int) -> ClusterConfig:
    return ClusterConfig.model_validate(
        {
            "cluster": {"name": "t", "id": "0123456789", "active": "a"},
            "channel": {"port": port, "heartbeat": 0.05, "peer_timeout": 1.0},
            "failover": {"timeout": 0.4},
            "protected": [{"path": "/srv"}],
            "nodes": [{"name": n, "addresses": a} for n, a in ADDRESSES.items()],
        }
    )


class Node:
    def __init__(self, name: str, cluster: ClusterConfig, base: Path) -> None:
        self.name = name
        self.cluster = cluster
        ca, cert, key = base / "ca.pem", base / f"{name}.pem", base / f"{name}.key"
        self.server_ctx = server_context(ca, cert, key)
        self.membership = Membership(
            me=name,
            cluster=cluster,
            ssl_context=client_context(ca, cert, key),
            hello=self.hello,
            heartbeat=self.beat,
            handle_request=self.answer,
            on_heartbeat=lambda *_: self.beats.set(),
        )
        self.beats = asyncio.Event()
        self.servers: dict[str, ChannelServer] = {}
        self.requests: list[tuple[str, str]] = []

    def hello(self) -> m.Hello:
        return m.Hello(
            protocol=m.PROTOCOL_VERSION,
            cluster_id=self.cluster.cluster.id,
            node=self.name,
            epoch=3,
            role="passive",
            applied_seq=7,
            persisted_seq=7,
            journal_head=7,
            purpose="heartbeat",
        )

    def beat(self) -> m.Heartbeat:
        return m.Heartbeat(
            epoch=3, role="passive", sent_at=time.time(), journal_head=7, applied_seq=7
        )

    async def answer(self, peer: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        self.requests.append((peer, kind))
        return {"granted": True, "epoch": body["epoch"]}

    async def handle(self, conn: Connection) -> None:
        hello = await conn.recv(timeout=2)
        assert isinstance(hello, m.Hello)
        await self.membership.serve(conn, hello)

    async def listen(self) -> None:
        for address in ADDRESSES[self.name]:
            self.servers[address] = await serve(
                address, self.cluster.channel.port, self.server_ctx, self.handle
            )


@pytest.fixture
def base(tmp_path: Path) -> Path:
    ca_cert, ca_key = pki.create_ca("t")
    (tmp_path / "ca.pem").write_bytes(ca_cert)
    for name, addresses in ADDRESSES.items():
        cert, key = pki.issue_node_cert(ca_cert, ca_key, name, addresses)
        (tmp_path / f"{name}.pem").write_bytes(cert)
        pki.write_private(tmp_path / f"{name}.key", key)
    return tmp_path


@pytest.fixture
async def nodes(base: Path) -> AsyncIterator[dict[str, Node]]:
    cluster = config(free_port())
    made = {name: Node(name, cluster, base) for name in ADDRESSES}
    for node in made.values():
        await node.listen()
    tasks = [asyncio.create_task(node.membership.run()) for node in made.values()]
    try:
        yield made
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for node in made.values():
            for server in node.servers.values():
                server.close()
                await server.wait_closed()


async def until(node: Node, predicate: Any, timeout: float = 5.0) -> None:
    """Wait for ``predicate``, re-checked on every heartbeat the node receives."""
    async with asyncio.timeout(timeout):
        while True:
            node.beats.clear()
            if predicate():
                return
            await node.beats.wait()


async def test_heartbeats_arrive_on_every_channel(nodes: dict[str, Node]) -> None:
    a = nodes["a"].membership
    await until(nodes["a"], lambda: set(a.peers["b"].heard_on) == set(ADDRESSES["a"]))
    beat = a.peers["b"].last
    assert beat is not None and beat.epoch == 3 and beat.applied_seq == 7
    status = a.status(time.monotonic())["b"]
    assert set(status["channels"]) == set(ADDRESSES["a"])
    assert status["links"] == dict.fromkeys(ADDRESSES["b"], "up")


async def test_a_peer_stays_heard_while_one_channel_is_down(nodes: dict[str, Node]) -> None:
    a = nodes["a"].membership
    await until(nodes["a"], lambda: set(a.peers["b"].heard_on) == set(ADDRESSES["a"]))
    lost = nodes["a"].servers.pop("127.0.0.2")  # one channel of a goes away
    lost.close()
    await lost.wait_closed()
    await asyncio.sleep(0.6)  # time must pass: longer than the failover timeout
    heard = a.peers["b"].last_heard
    assert heard is not None and time.monotonic() - heard < 0.4
    assert time.monotonic() - a.peers["b"].heard_on["127.0.0.2"] > 0.4


async def test_requests_travel_on_the_links(nodes: dict[str, Node]) -> None:
    a = nodes["a"].membership
    await until(nodes["b"], lambda: a.peers["b"].links.get("127.0.0.4") == "up")
    reply = await a.request("b", "vote", {"epoch": 4}, timeout=2)
    assert reply == {"granted": True, "epoch": 4}
    assert nodes["b"].requests == [("a", "vote")]


async def test_a_request_to_an_unreachable_peer_fails_clearly(base: Path) -> None:
    cluster = config(free_port())
    lonely = Node("a", cluster, base)
    with pytest.raises(ChannelError, match="no heartbeat link to b"):
        await lonely.membership.request("b", "vote", {"epoch": 4}, timeout=0.5)
