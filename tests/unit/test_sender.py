"""The active's sender: how it stops, and which form of records it sends a passive."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from stead.channel import messages as m
from stead.config.schema import ClusterConfig
from stead.errors import ChannelError
from stead.replication import sender as sender_module
from stead.replication.entries import Entry, Op
from stead.replication.journal import Journal, decode_record
from stead.replication.sender import PeerState, Sender

CLUSTER = ClusterConfig.model_validate(
    {
        "cluster": {"name": "t", "id": "0123456789", "active": "a"},
        "protected": [{"path": "/srv"}],
        "nodes": [
            {"name": "a", "addresses": ["198.18.0.1"]},
            {"name": "b", "addresses": ["198.18.0.2"]},
        ],
    }
)


def _sender(journal: Journal, connected: Any) -> Sender:
    """The active's sender to passive b, over whatever ``connect`` the test put in."""
    return Sender(
        me="a",
        peer=CLUSTER.node("b"),
        cluster=CLUSTER,
        journal=journal,
        ssl_context=None,  # type: ignore[arg-type]
        epoch=lambda: 1,
        on_connected=connected,
        lineage=lambda: (0, 1),
    )


class _Passive:
    """A connection to a passive that answers hello, then fails once aborted."""

    def __init__(self, tail_records: bool = False) -> None:
        self.greeted = False
        self.aborted = asyncio.Event()
        self.tail_records = tail_records
        self.records: asyncio.Queue[m.Records] = asyncio.Queue()

    async def send(self, message: m.Message) -> None:
        if isinstance(message, m.Records):
            self.records.put_nowait(message)

    async def recv(self, timeout: float | None = None) -> m.Message:
        if not self.greeted:
            self.greeted = True
            return m.Hello(
                protocol=m.PROTOCOL_VERSION,
                cluster_id=CLUSTER.cluster.id,
                node="b",
                epoch=1,
                role="passive",
                applied_seq=0,
                persisted_seq=0,
                journal_head=0,
                tail_records=self.tail_records,
            )
        await self.aborted.wait()
        raise ChannelError("connection to b broken: aborted")

    def abort(self) -> None:
        self.aborted.set()

    async def close(self) -> None:
        self.aborted.set()


async def test_a_sender_aborted_and_cancelled_together_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the active does when its role changes: abort the sessions, cancel the tasks."""
    connections = 0

    async def connect(*args: Any, **kwargs: Any) -> _Passive:
        nonlocal connections
        connections += 1
        return _Passive()

    up = asyncio.Event()

    async def connected(state: PeerState) -> None:
        up.set()

    monkeypatch.setattr(sender_module, "connect", connect)
    with Journal(tmp_path / "journal", segment_bytes=1 << 20) as journal:
        sender = _sender(journal, connected)
        task = asyncio.create_task(sender.run())
        async with asyncio.timeout(5):
            await up.wait()
        sender.abort()
        task.cancel()
        await asyncio.wait([task], timeout=5.0)
        stopped = task.done()
        if not stopped:
            task.cancel()
            await asyncio.wait([task], timeout=5.0)
    assert stopped, f"the sender went on after its cancellation ({connections} connections)"
    assert connections == 1


@pytest.mark.parametrize("tail_records", [True, False])
async def test_records_go_as_a_raw_tail_only_to_a_passive_that_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tail_records: bool
) -> None:
    passive = _Passive(tail_records)

    async def connect(*args: Any, **kwargs: Any) -> _Passive:
        return passive

    async def connected(state: PeerState) -> None:
        return None

    monkeypatch.setattr(sender_module, "connect", connect)
    with Journal(tmp_path / "journal", segment_bytes=1 << 20) as journal:
        sender = _sender(journal, connected)
        task = asyncio.create_task(sender.run())
        try:
            journal.append(1, [Entry(Op.FILE, "/srv", name, data=b"x", size=1) for name in "ab"])
            async with asyncio.timeout(5):
                sent = await passive.records.get()
        finally:
            task.cancel()
            await asyncio.wait([task], timeout=5.0)
    assert sent.as_tail is tail_records
    assert [seq for seq, _ in sent.records] == [1, 2]
    assert [decode_record(payload)[1].path for _, payload in sent.records] == ["a", "b"]
