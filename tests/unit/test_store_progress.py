"""Local state survives reopening; lag and queue figures follow the journal."""

from __future__ import annotations

from pathlib import Path

from stead.agent.progress import AppendLog
from stead.store.db import StateStore


def test_state_store_round_trip_and_events(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db")
    store.set_many({"applied_seq": 42, "role": "passive"})
    store.event("start", "hello", node="x")
    store.close()
    again = StateStore(tmp_path / "state.db")
    assert again.get("applied_seq") == 42
    assert again.get("role") == "passive"
    assert again.get("missing", "d") == "d"
    events = again.events()
    assert [e["message"] for e in events] == ["hello"]
    assert events[0]["data"] == {"node": "x"}
    again.close()


def test_append_log_lag_and_bytes() -> None:
    log = AppendLog()
    log.record(10, 1000, at=100.0)
    log.record(20, 500, at=101.0)
    log.record(30, 250, at=102.0)
    assert log.bytes_after(30, 30) == 0
    assert log.bytes_after(20, 30) == 250
    assert log.bytes_after(5, 30) == 1750
    assert log.age_after(30, now=105.0) == 0.0
    assert log.age_after(15, now=105.0) == 4.0
    log.forget_through(20)
    assert log.bytes_after(20, 30) == 250
    assert log.age_after(25, now=105.0) == 3.0
