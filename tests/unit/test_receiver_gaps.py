"""The passive's apply path never skips a record silently.

Records wait in memory or in the receive queue; the applier must always continue at
applied + 1. If the next record is in the queue, it goes first even when later ones sit in
memory; if it is nowhere, the passive flags itself out of sync (the active then runs a full
check) instead of pretending it applied it.
"""

from __future__ import annotations

from pathlib import Path

from stead.config.schema import ClusterConfig
from stead.replication.applier import Applier
from stead.replication.entries import Entry, Op
from stead.replication.journal import ReceiveQueue, encode_record
from stead.replication.receiver import Receiver
from stead.store.db import StateStore


def _receiver(tmp_path: Path, receive_memory: str = "64MiB") -> Receiver:
    root = tmp_path / "root"
    root.mkdir()
    cluster = ClusterConfig.model_validate(
        {
            "cluster": {"name": "t", "id": "0123456789", "active": "a"},
            "replication": {"receive_memory": receive_memory},
            "protected": [{"path": "/srv"}],
            "nodes": [
                {"name": "a", "addresses": ["198.18.0.1"]},
                {"name": "b", "addresses": ["198.18.0.2"]},
            ],
        }
    )
    applier = Applier({"/srv": root})
    applier.recover()

    async def no_requests(kind: str, body: dict[str, object]) -> dict[str, object]:
        return {}

    return Receiver(
        me="b",
        cluster=cluster,
        queue=ReceiveQueue(tmp_path / "queue", fsync="always"),
        applier=applier,
        store=StateStore(tmp_path / "state.db"),
        epoch=lambda: 1,
        handle_request=no_requests,  # type: ignore[arg-type]
    )


def _record(seq: int) -> tuple[int, bytes]:
    entry = Entry(op=Op.FILE, root="/srv", path=f"f{seq}", size=1, data=b"x")
    return seq, encode_record(1, entry)


def test_the_queue_goes_first_when_memory_holds_later_records(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path)
    receiver.queue.append([_record(1), _record(2)])
    receiver._memory.extend([_record(3), _record(4)])
    for _ in range(4):
        receiver._apply_some()
    assert receiver.applied == 4
    assert sorted(p.name for p in (tmp_path / "root").iterdir() if p.name != ".stead") == [
        "f1",
        "f2",
        "f3",
        "f4",
    ]
    assert not receiver.out_of_sync


def test_a_record_held_nowhere_makes_the_passive_out_of_sync(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path)
    receiver._memory.extend([_record(3), _record(4)])  # 1 and 2 never arrived
    receiver._apply_some()
    assert receiver.out_of_sync
    assert receiver.applied == 4


async def test_records_beyond_the_receive_memory_spill_and_are_counted(tmp_path: Path) -> None:
    receiver = _receiver(tmp_path, receive_memory="1KiB")
    small = [_record(1)]
    await receiver._hold(small)  # fits: held in memory, not written
    assert receiver.status()["spilled_bytes"] == 0
    assert receiver.queue.head < 1
    big = [(seq, encode_record(1, Entry(Op.FILE, "/srv", f"f{seq}", size=600, data=b"y" * 600)))
           for seq in (2, 3)]  # fmt: skip
    await receiver._hold(big)  # over the bound: through the queue
    spilled = sum(len(payload) for _, payload in big)
    assert receiver.status()["spilled_bytes"] == spilled
    assert receiver.queue.head == 3
    await receiver._hold([_record(4)])  # behind the queue: spills too, although it would fit
    assert receiver.status()["spilled_bytes"] == spilled + len(_record(4)[1])
